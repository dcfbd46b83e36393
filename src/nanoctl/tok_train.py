"""`nanoctl tok train`: train the BPE tokenizer on the pretraining text, as nanochat's tok_train.

Reads the train shards (or the embedded sample when the home has none, or `--input` files), crops
each document to `doc_cap` chars, stops after `max_chars`, trains `vocab_size - 9` ranks in Rust and
saves `<home>/tokenizer/{tokenizer.pkl,token_bytes.pt}` atomically.

The result says what was used: characters read, characters kept after the per-document cap, documents
cropped. When the cap drops more than `CAP_WARN_FRACTION` of the text, or the text holds fewer merges
than the vocabulary asks for, a warning says why and which flag changes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.tokenizer import MIN_VOCAB_SIZE, PICKLE_NAME, SPLIT_PATTERN, Tokenizer

CAP_WARN_FRACTION = 0.10  # warn when --doc-cap drops more than this share of the characters read

ROUNDTRIP_TEXT = "Hello world! This is a test.\nNumbers: 123, 4567, 89\nContractions: I'm, you're, it's\n" \
    "Special chars: @#$%^&*()\nUnicode: 你好世界 🌍"  # fmt: skip


@dataclass
class TokTrainOptions:
    vocab_size: int = 32768  # nanochat HEAD (2^15); OLD used 65536
    max_chars: int = 2_000_000_000  # stop after the document that passes this many characters
    doc_cap: int = 10_000  # crop each document to this many characters
    inputs: list[Path] = field(default_factory=list)  # local files/dirs instead of the home's shards
    text_field: str = "text"  # JSONL field / parquet column for `inputs`
    encoding: str = "utf-8"  # of text and JSONL `inputs`
    force: bool = False  # retrain even if the home already has a tokenizer
    pattern: str = SPLIT_PATTERN
    # progress(stage, done, total): ("read", chars, chars_expected) then ("merge", merges, merges_total)
    progress: Callable[[str, int, int], None] | None = field(default=None, repr=False)


@dataclass
class TokTrainResult:
    directory: str
    skipped: bool = False  # a tokenizer was already there and --force was not given
    source: str = ""  # "shards" | "sample" | "input"
    source_directory: str | None = None
    vocab_size: int = 0
    requested_vocab_size: int = 0
    documents: int = 0
    characters: int = 0  # characters trained on: after the per-document cap
    characters_read: int = 0  # characters of the documents read, before the cap
    documents_capped: int = 0  # documents longer than doc_cap (cropped)
    longest_document: int = 0  # characters, before the cap
    doc_cap: int = 0
    stopped_at_max_chars: bool = False  # reading stopped at max_chars with text left
    bytes: int = 0
    unique_words: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0  # reading + splitting + counting (overlapped)
    merge_seconds: float = 0.0
    chars_per_second: float = 0.0
    token_bytes_min: int = 0
    token_bytes_max: int = 0
    token_bytes_mean: float = 0.0
    token_bytes_std: float = 0.0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the cap dropped text; the vocabulary fell short

    @property
    def capped_fraction(self) -> float:
        """Share of the characters read that the per-document cap dropped."""
        return 1 - self.characters / self.characters_read if self.characters_read else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(opts: TokTrainOptions) -> None:
    if opts.vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(
            f"--vocab-size {opts.vocab_size} is too small: the tokenizer needs at least {MIN_VOCAB_SIZE} "
            "(256 byte tokens + 9 special tokens)",
            f"use --vocab-size {MIN_VOCAB_SIZE} or more (nanochat: 32768)",
        )
    if opts.vocab_size > 2**31 - 1:
        raise UsageError(f"--vocab-size {opts.vocab_size} is too large", "nanochat uses 32768")
    if opts.max_chars <= 0:
        raise UsageError(f"--max-chars must be positive, got {opts.max_chars}")
    if opts.doc_cap <= 0:
        raise UsageError(f"--doc-cap must be positive, got {opts.doc_cap}")
    from nanoctl.data.ingest import check_encoding

    check_encoding(opts.encoding)


def _warnings(r: TokTrainResult, vocab: int, opts: TokTrainOptions) -> list[str]:
    """Why the tokenizer saw less text than it was given, or fell short of the vocabulary, and the flag
    that changes it."""
    out = []
    capped = r.capped_fraction > CAP_WARN_FRACTION
    if capped:
        out.append(
            f"--doc-cap {opts.doc_cap:,} dropped {r.capped_fraction:.0%} of the text: read {r.characters_read:,} "
            f"characters, trained on {r.characters:,} ({r.documents_capped:,} of {r.documents:,} documents were "
            f"cropped; the longest has {r.longest_document:,} characters). Raise --doc-cap (e.g. --doc-cap "
            f"{r.longest_document}), or re-ingest plain text with `nanoctl data ingest --force` (documents of up "
            "to 8,000 characters)"
        )
    if vocab < opts.vocab_size:
        if capped:
            fix = "raise --doc-cap to train on all of the text read"
        elif r.stopped_at_max_chars:
            fix = "raise --max-chars to read more of the text"
        else:
            fix = "train on more text (more files, or `nanoctl data download`), or ask for a smaller --vocab-size"
        out.append(
            f"vocabulary {vocab:,} of the {opts.vocab_size:,} asked: {r.characters:,} characters hold only "
            f"{vocab - MIN_VOCAB_SIZE:,} distinct merges (every pair was merged); {fix}"
        )
    return out


class _Reader:
    """nanochat's reading rule: crop each doc to doc_cap; stop once max_chars is exceeded. Counts what
    was read and what was kept."""

    def __init__(self, docs: Iterator[str], doc_cap: int, max_chars: int) -> None:
        self.docs, self.doc_cap, self.max_chars = docs, doc_cap, max_chars
        self.read = self.used = self.capped = self.longest = self.documents = 0
        self.stopped = False

    def __iter__(self) -> Iterator[str]:
        for d in self.docs:
            n = len(d)
            self.read += n
            self.documents += 1
            self.longest = max(self.longest, n)
            if n > self.doc_cap:
                d = d[: self.doc_cap]
                self.capped += 1
            self.used += len(d)
            yield d
            if self.used > self.max_chars:
                self.stopped = True  # there may be text left; not peeked (that could read another file)
                return


def _input_docs(paths: list[Path], text_field: str, encoding: str) -> Iterator[str]:
    """Documents of local files, with `data ingest`'s readers (plain text grouped into documents of up
    to 8,000 characters); undecodable bytes are an error."""
    from nanoctl.data.ingest import DecodeError, IngestOptions, IngestResult, expand_inputs, read_documents

    files, _skipped = expand_inputs(paths)
    if not files:
        raise NanoctlError(
            f"no .txt/.md/.jsonl/.parquet files under {', '.join(map(str, paths))}",
            "point --input at text files",
        )
    opts = IngestOptions(paths=paths, text_field=text_field, column=text_field, encoding=encoding)
    for f in files:
        try:
            docs = read_documents(f, opts, IngestResult(directory=""))
        except DecodeError as e:
            raise NanoctlError(
                e.message,
                f"pass --encoding NAME for its encoding (e.g. latin-1), convert it (`iconv -f latin1 -t utf-8 "
                f"{f.name}`), or ingest it with `nanoctl data ingest --encoding-errors replace`",
            ) from None
        yield from docs


def _expected_chars(paths: list[Path], max_chars: int) -> int:
    """Characters the progress bar expects: max_chars, or less for a smaller corpus (footers only)."""
    from nanoctl.data.shards import shard_info

    total = 0
    for p in paths:
        try:
            info = shard_info(p)
        except NanoctlError:
            return max_chars  # reading will report the bad shard by name
        total += info.characters if info.characters is not None else info.text_bytes
        if total >= max_chars:
            return max_chars
    return total


def train_tokenizer(
    opts: TokTrainOptions, *, home: Home | str | os.PathLike[str] | None = None
) -> TokTrainResult:
    """Train and save the home's tokenizer; see the module docstring. `home` is resolved here."""
    _check(opts)
    home = Home.resolve(home)
    target = home.tokenizer_dir
    result = TokTrainResult(directory=str(target), requested_vocab_size=opts.vocab_size)
    if (target / PICKLE_NAME).exists() and not opts.force:
        existing = Tokenizer.from_directory(target)
        result.skipped = True
        result.vocab_size = existing.get_vocab_size()
        result.notes.append(f"a tokenizer already exists in {target}; pass --force to train a new one")
        return result

    expected = opts.max_chars
    if opts.inputs:
        result.source = "input"
        result.source_directory = ", ".join(str(p) for p in opts.inputs)
        docs = _input_docs(list(opts.inputs), opts.text_field, opts.encoding)
    else:
        from nanoctl.data.shards import iter_shard_texts, resolve_pretrain_shards

        shards = resolve_pretrain_shards(home)
        result.source = "sample" if shards.is_sample else "shards"
        result.source_directory = str(shards.directory)
        if shards.is_sample:
            result.notes.append(
                "no shards in <home>/data/base: training on the embedded public-domain sample "
                "(run `nanoctl data download` or `nanoctl data ingest PATH` for real data)"
            )
        expected = _expected_chars(shards.train_paths, opts.max_chars)
        docs = iter_shard_texts(shards.train_paths)

    progress = opts.progress

    def on_progress(stage: str, done: int, total: int) -> None:
        if progress is None:
            return
        if stage == "read":  # the trainer reports (docs, chars); the expected total is an estimate
            progress("read", total, max(expected, total))
        else:
            progress(stage, done, total)

    reader = _Reader(iter(docs), opts.doc_cap, opts.max_chars)
    t0 = time.perf_counter()
    try:
        tok = Tokenizer.train_from_iterator(
            reader,
            opts.vocab_size,
            pattern=opts.pattern,
            progress=on_progress,
        )
    except ValueError as e:  # a document the Rust side cannot take (lone surrogates)
        raise NanoctlError(
            f"cannot train on {result.source_directory}: {e}", "re-create the shards from valid UTF-8 text"
        ) from None
    except OSError as e:
        raise NanoctlError(
            f"cannot read {result.source_directory} ({e})", "check the path and permissions"
        ) from None
    seconds = time.perf_counter() - t0
    stats = tok.train_stats
    if stats.get("docs", 0) == 0 or stats.get("chars", 0) == 0:
        raise NanoctlError(
            f"no text to train on: {result.source_directory} holds no documents",
            "add text with `nanoctl data ingest PATH` (or remove the empty shards to use the embedded sample)",
        )
    result.documents = int(stats["docs"])
    result.characters_read = reader.read
    result.characters = int(stats["chars"])
    result.documents_capped = reader.capped
    result.longest_document = reader.longest
    result.doc_cap = opts.doc_cap
    result.stopped_at_max_chars = reader.stopped
    result.warnings.extend(_warnings(result, tok.get_vocab_size(), opts))
    if tok.decode(tok.encode(ROUNDTRIP_TEXT)) != ROUNDTRIP_TEXT:  # nanochat's sanity check
        raise NanoctlError("trained tokenizer failed the encode/decode round trip", "please report this bug")
    tok.save(target)

    tb = [b for b in tok.token_bytes() if b > 0]
    mean = sum(tb) / len(tb)
    result.vocab_size = tok.get_vocab_size()
    result.bytes = int(stats["bytes"])
    result.unique_words = int(stats["unique_words"])
    result.seconds = seconds
    result.read_seconds = float(stats["count_seconds"])
    result.merge_seconds = float(stats["merge_seconds"])
    result.chars_per_second = result.characters / seconds if seconds > 0 else 0.0
    result.token_bytes_min, result.token_bytes_max = min(tb), max(tb)
    result.token_bytes_mean = mean
    result.token_bytes_std = (sum((b - mean) ** 2 for b in tb) / len(tb)) ** 0.5
    return result
