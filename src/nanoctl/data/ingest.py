"""`nanoctl data ingest`: local text files -> pretraining shards in nanochat's format.

Inputs:
- plain text (.txt/.md, also gzipped, and stdin as `-`): split at blank lines into paragraphs, grouped
  into documents of up to `doc_chars` characters (default 8,000, under `tok train`'s 10,000-character
  document cap). A paragraph is never cut unless it alone is longer than `doc_chars`; then it is cut at
  a line break, else a space, else hard. `one_doc_per_file=True` keeps one document per file.
- .jsonl: one JSON object a line, the string field `text_field` (default `text`).
- .parquet: the string column `column` (default `text`).
- directories: read recursively, in sorted order; hidden entries and other suffixes are skipped and
  counted, and so are empty files found there (an empty file named on the command line is an error).

Parquet files already in nanochat's shard format (a string `text` column, as `nanoctl data download`
writes) are taken as they are, unless `reshard=True`: hard-linked (copied across file systems) in input
order as shard_00000.parquet ..., the last one the validation split, as nanochat does.

Everything else is re-sharded. The validation split is a fraction of the documents (`val_fraction`,
at least one, at most one shard's worth): the documents with the smallest seeded hash of their text,
so re-ingesting the same files gives the same split. Train documents are shuffled (seeded).

Text is decoded strictly (`encoding`, default UTF-8): a byte that does not decode is a one-line error
naming the file and byte offset, unless `encoding_errors="replace"` (U+FFFD, counted). A file holding a
NUL byte is refused as binary. All documents are held in memory (fine for the local corpora this is
meant for, up to a few GB of text). Shards are written to a staging directory next to the output and
swapped in at the end: a failed or interrupted ingest leaves the old shards, or nothing, never a mix.
Existing shards are replaced only with `force=True`.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.atomic import atomic_write_json
from nanoctl.data.shards import (
    DATASET_MARKER,
    ShardInfo,
    list_shards,
    plan_shards,
    shard_filename,
    shard_info,
    write_shards,
)
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
STDIN = "-"
ENCODING_ERRORS = ("strict", "replace")
MAX_VAL_FRACTION = 0.5
SHARD_TEXT_COLUMN = "text"  # nanochat's shard format
COUNT_CHARS_LIMIT = 4_000_000_000  # shards taken as they are: count characters up to this many text bytes
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


@dataclass
class IngestOptions:
    paths: list[Path]  # files, directories, or "-" for stdin (plain text)
    out: Path | None = None  # default: <home>/data/base
    doc_chars: int = 8_000  # plain text: paragraphs grouped into documents of up to this many characters
    one_doc_per_file: bool = False  # plain text: one document per file (no grouping, no cutting)
    min_chars: int = 1  # documents shorter than this (after stripping) are skipped
    text_field: str = "text"  # JSONL field holding the text
    column: str = "text"  # parquet column holding the text
    encoding: str = "utf-8"  # of text and JSONL files
    encoding_errors: str = "strict"  # strict: undecodable bytes are an error; replace: U+FFFD, counted
    shard_chars: int = 250_000_000  # nanochat's shard size (~100 MB of parquet)
    val_fraction: float = 0.01  # share of documents in the validation shard (>= 1 doc, <= 1 shard)
    seed: int = 42  # of the validation hash and the train shuffle
    row_group_size: int | None = None  # None: ~16 row groups per shard, at most 1024 rows each
    reshard: bool = False  # re-shard parquet files already in nanochat's shard format
    force: bool = False  # replace shards already in the output directory


@dataclass
class IngestResult:
    directory: str
    mode: str = "documents"  # documents: read and re-sharded | shards: nanochat shards taken as they are
    files: int = 0
    text_files: int = 0  # of them plain text (split into paragraphs and grouped, or one document each)
    skipped_files: list[str] = field(default_factory=list)  # unsupported suffixes found in directories
    empty_files: list[str] = field(default_factory=list)  # empty files found in directories (skipped)
    documents: int = 0
    characters: int | None = 0  # None: shards taken as they are, too large to count
    skipped_short: int = 0  # documents under min_chars
    cut_paragraphs: int = 0  # plain-text paragraphs longer than doc_chars, cut into pieces
    replaced_chars: int = 0  # undecodable bytes replaced by U+FFFD (encoding_errors="replace")
    files_with_replacements: int = 0
    shards: int = 0
    train_documents: int = 0
    train_characters: int | None = 0
    val_documents: int = 0
    val_characters: int | None = 0
    linked: int = 0  # shards taken as they are: hard links
    copied: int = 0  # ... and copies (another file system)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Finding the inputs


def _kind(path: Path) -> str | None:
    if str(path) == STDIN:
        return "text"
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _display(path: Path) -> str:
    return "<stdin>" if str(path) == STDIN else str(path)


def expand_inputs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Files to read (sorted within each directory; `-` is stdin) and the files skipped for their suffix."""
    if not paths:
        raise UsageError("no input paths given", "example: nanoctl data ingest ./books/ notes.txt")
    files: list[Path] = []
    skipped: list[str] = []
    for p in paths:
        if str(p) == STDIN:
            if any(str(f) == STDIN for f in files):
                raise UsageError("`-` (stdin) given twice", "pass `-` once")
            files.append(Path(STDIN))
            continue
        p = Path(p).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if any(part.startswith(".") for part in rel) or not f.is_file():
                    continue
                (files.append(f) if _kind(f) else skipped.append(str(f)))
        elif p.is_file():
            if _kind(p) is None:
                raise UsageError(
                    f"{p}: unsupported file type",
                    "expected .txt, .md, .jsonl, .parquet (or .txt.gz/.jsonl.gz) files, a directory, or - for stdin",
                )
            files.append(p)
        elif p.exists():
            raise NanoctlError(f"{p} is neither a file nor a directory", "pass text files or directories")
        else:
            raise NanoctlError(f"{p} does not exist", "check the path")
    return files, skipped


# ---------------------------------------------------------------------------------------------------------
# Reading and decoding


class DecodeError(NanoctlError):
    """Bytes that do not decode in the chosen encoding (the message names the file and byte offset)."""


class _Empty(Exception):
    """An input with no text; fatal for a file named on the command line, skipped in a directory."""


def _read_bytes(path: Path) -> bytes:
    if str(path) == STDIN:
        stream = getattr(sys.stdin, "buffer", None)
        return stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise NanoctlError(f"cannot read {path} ({reason})", "check the file and its permissions") from None


def _nul_is_a_zero_byte(encoding: str) -> bool:
    return "\x00".encode(encoding, errors="replace") == b"\x00"


def _where(path: Path) -> str:
    gz = path.name.lower().endswith(".gz")
    return f"{_display(path)}{' (decompressed)' if gz else ''}"


def decode_text(data: bytes, path: Path, opts: IngestOptions, stats: IngestResult) -> str:
    """Decoded text of one input: binary data and undecodable bytes are one-line errors by default."""
    codec = codecs.lookup(opts.encoding).name
    if codec == "utf-8" and data.startswith(_UTF16_BOMS):
        raise NanoctlError(
            f"{_where(path)} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8",
            "pass --encoding utf-16",
        )
    if _nul_is_a_zero_byte(codec):
        nul = data.find(b"\x00")
        if nul >= 0:
            raise NanoctlError(
                f"{_where(path)} looks like a binary file (a NUL byte at byte offset {nul}), not text",
                "pass text files (.txt .md .jsonl) or parquet; if it is UTF-16 text, pass --encoding utf-16",
            )
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        if opts.encoding_errors != "replace":
            bad = data[e.start : min(e.end, e.start + 4)].hex(" ")
            raise DecodeError(
                f"{_where(path)} is not valid {'UTF-8' if codec == 'utf-8' else opts.encoding} at byte offset "
                f"{e.start} (bytes {bad})",
                "pass --encoding NAME for the file's encoding (e.g. --encoding latin-1 or cp1252), or "
                "--encoding-errors replace to replace undecodable bytes with U+FFFD",
            ) from None
        before = data.decode(codec, errors="ignore").count("\ufffd")  # U+FFFD already in the file
        text = data.decode(codec, errors="replace")
        stats.replaced_chars += text.count("\ufffd") - before
        stats.files_with_replacements += 1
    text = text.lstrip("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise _Empty()
    return text


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs: the text between blank lines (lines holding only spaces/tabs count as blank)."""
    return [p.strip() for p in _BLANK_LINE_RE.split(text) if p.strip()]


def _cut(paragraph: str, cap: int) -> list[str]:
    """Pieces of at most `cap` characters: cut at the last line break in the window, else the last space
    (either in the window's second half), else hard."""
    pieces = []
    rest = paragraph
    while len(rest) > cap:
        window = rest[: cap + 1]
        at = window.rfind("\n")
        if at < cap // 2:
            at = window.rfind(" ")
        if at >= cap // 2 and at > 0:
            piece, rest = rest[:at], rest[at + 1 :]
        else:
            piece, rest = rest[:cap], rest[cap:]
        piece = piece.rstrip()
        if piece:
            pieces.append(piece)
        rest = rest.lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def group_paragraphs(paragraphs: list[str], cap: int, stats: IngestResult | None = None) -> list[str]:
    """Documents of whole paragraphs joined by a blank line, each at most `cap` characters; a paragraph
    longer than `cap` is cut (`_cut`) and its last piece starts the next document."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        pieces = [p]
        if len(p) > cap:
            pieces = _cut(p, cap)
            if stats is not None:
                stats.cut_paragraphs += 1
        for piece in pieces:
            if cur and size + 2 + len(piece) > cap:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
            size += len(piece) + (2 if cur else 0)
            cur.append(piece)
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _text_docs(path: Path, opts: IngestOptions, stats: IngestResult) -> list[str]:
    text = decode_text(_read_bytes(path), path, opts, stats)
    stats.text_files += 1
    if opts.one_doc_per_file:
        return [text]
    return group_paragraphs(split_paragraphs(text), opts.doc_chars, stats)


def _lone_surrogate(s: str) -> int | None:
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _jsonl_docs(path: Path, opts: IngestOptions, stats: IngestResult) -> list[str]:
    text = decode_text(_read_bytes(path), path, opts, stats)
    name = _display(path)
    field_name = opts.text_field
    docs = []
    replaced = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoctlError(
                f"{name}:{lineno}: invalid JSON ({e.msg})", "each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict) or field_name not in obj:
            found = ", ".join(obj) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
            raise NanoctlError(
                f"{name}:{lineno}: no {field_name!r} field (found: {found or 'no fields'})",
                "pass --text-field NAME to pick the field holding the text",
            )
        value = obj[field_name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise NanoctlError(
                f"{name}:{lineno}: field {field_name!r} is a {type(value).__name__}, expected a string",
                "pass --text-field NAME to pick the field holding the text",
            )
        at = _lone_surrogate(value)
        if at is not None:
            if opts.encoding_errors != "replace":
                raise NanoctlError(
                    f"{name}:{lineno}: field {field_name!r} holds a lone surrogate escape at character {at} "
                    "(not encodable as UTF-8)",
                    "fix the line, or pass --encoding-errors replace to replace it with U+FFFD",
                )
            value, n = _SURROGATE_RE.subn("\ufffd", value)
            replaced += n
        docs.append(value)
    if replaced:
        stats.replaced_chars += replaced
        stats.files_with_replacements += 1
    return docs


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoctlError(
            f"{path} is not a readable parquet file ({msg})", "check or re-create the file"
        ) from None


def _is_string(pf: Any, name: str) -> bool:
    import pyarrow as pa

    names = pf.schema_arrow.names
    if name not in names:
        return False
    t = pf.schema_arrow.field(name).type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _parquet_docs(path: Path, column: str) -> list[str]:
    pf = _open_parquet(path)
    try:
        names = pf.schema_arrow.names
        if column not in names:
            raise NanoctlError(
                f"{path}: no {column!r} column (columns: {', '.join(names)})",
                "pass --column NAME to pick the column holding the text",
            )
        if not _is_string(pf, column):
            raise NanoctlError(
                f"{path}: column {column!r} has type {pf.schema_arrow.field(column).type}, expected string",
                "pass --column NAME to pick the column holding the text",
            )
        if pf.metadata.num_rows == 0:
            raise _Empty()
        docs = []
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            docs.extend(t for t in batch.column(0).to_pylist() if t is not None)
        return docs
    finally:
        pf.close()


def read_documents(path: Path, opts: IngestOptions, stats: IngestResult) -> list[str]:
    """Documents of one input file, stripped, without the ones under `min_chars`.

    An input with no text raises NanoctlError "... is empty" (callers walking a directory may skip it:
    `ingest` does, through `_read_input`)."""
    try:
        return _read(path, opts, stats)
    except _Empty:
        raise NanoctlError(
            f"{_display(path)} is empty (no text)", "remove it from the inputs, or check what wrote it"
        ) from None


def _read(path: Path, opts: IngestOptions, stats: IngestResult) -> list[str]:
    kind = _kind(path)
    if kind == "text":
        raw = _text_docs(path, opts, stats)
    elif kind == "jsonl":
        raw = _jsonl_docs(path, opts, stats)
    elif kind == "parquet":
        raw = _parquet_docs(path, opts.column)
    else:  # expand_inputs filters these out
        raise UsageError(f"{path}: unsupported file type")
    docs = []
    for d in raw:
        d = d.strip()
        if len(d) >= max(1, opts.min_chars):
            docs.append(d)
        elif d:
            stats.skipped_short += 1
    if not docs and not any(d.strip() for d in raw):
        raise _Empty()
    return docs


# ---------------------------------------------------------------------------------------------------------
# The validation split


def val_key(doc: str, seed: int) -> bytes:
    """The seeded hash that orders documents for the validation split (smallest first)."""
    salt = seed.to_bytes(16, "little", signed=True)
    return hashlib.blake2b(doc.encode("utf-8"), digest_size=8, salt=salt).digest()


def split_validation(
    docs: list[str], val_fraction: float, shard_chars: int, seed: int
) -> tuple[list[str], list[str]]:
    """(train, val): val is the max(1, round(n * val_fraction)) documents with the smallest `val_key`,
    fewer if they would exceed one shard (`shard_chars`); train keeps at least one document."""
    n = len(docs)
    want = min(n - 1, max(1, round(n * val_fraction)))
    order = sorted(range(n), key=lambda i: val_key(docs[i], seed))
    val_idx: list[int] = []
    chars = 0
    for i in order[:want]:
        if val_idx and chars + len(docs[i]) > shard_chars:
            break
        val_idx.append(i)
        chars += len(docs[i])
    chosen = set(val_idx)
    train = [d for i, d in enumerate(docs) if i not in chosen]
    return train, [docs[i] for i in val_idx]


# ---------------------------------------------------------------------------------------------------------
# The command


def _check_options(opts: IngestOptions) -> None:
    if opts.doc_chars < 1:
        raise UsageError(f"--doc-chars must be positive, got {opts.doc_chars}")
    if opts.min_chars < 0:
        raise UsageError(f"--min-chars must be >= 0, got {opts.min_chars}")
    if opts.shard_chars < 1:
        raise UsageError(f"--shard-chars must be positive, got {opts.shard_chars}")
    if not 0.0 < opts.val_fraction <= MAX_VAL_FRACTION:
        raise UsageError(
            f"--val-fraction must be in (0, {MAX_VAL_FRACTION}], got {opts.val_fraction}",
            "e.g. --val-fraction 0.01 puts 1% of the documents in the validation shard",
        )
    if opts.row_group_size is not None and opts.row_group_size < 1:
        raise UsageError(f"--row-group-size must be positive, got {opts.row_group_size}")
    if opts.encoding_errors not in ENCODING_ERRORS:
        raise UsageError(
            f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {opts.encoding_errors!r}"
        )
    check_encoding(opts.encoding)


def check_encoding(name: str) -> None:
    """UsageError naming --encoding unless Python knows `name` (ingest's and tok train's check)."""
    try:
        codecs.lookup(name)
    except LookupError:
        raise UsageError(
            f"--encoding {name!r} is not a known text encoding", "e.g. utf-8, latin-1, cp1252, utf-16"
        ) from None


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NanoctlError(f"--out {out} is a file, expected a directory", "pick a directory path")
    existing = list_shards(out)
    if existing and not force:
        raise NanoctlError(
            f"{out} already holds {len(existing)} shard(s)",
            "pass --force to replace them, or --out DIR to write elsewhere",
        )


def _shard_format(files: list[Path], opts: IngestOptions) -> bool:
    """Whether every input is a parquet file with a string `text` column (nanochat's shard format)."""
    if opts.reshard or opts.column != SHARD_TEXT_COLUMN or not files:
        return False
    if any(_kind(f) != "parquet" for f in files):
        return False
    for f in files:
        pf = _open_parquet(f)
        try:
            if not _is_string(pf, SHARD_TEXT_COLUMN):
                return False
        finally:
            pf.close()
    return True


def _count_chars(path: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    try:
        total = 0
        for rg in range(pf.num_row_groups):
            col = pf.read_row_group(rg, columns=[SHARD_TEXT_COLUMN]).column(0)
            total += int(pc.sum(pc.utf8_length(col)).as_py() or 0)
        return total
    finally:
        pf.close()


def _take_shards(
    files: list[Path],
    staging: Path,
    result: IngestResult,
    on_file: Callable[[Path, int], None] | None,
    explicit: set[Path],
) -> list[ShardInfo]:
    """Link (or copy) shard-format parquet files into `staging` in order; empty ones named on the
    command line are errors, empty ones found in a directory are skipped."""
    infos = []
    kept: list[tuple[Path, ShardInfo]] = []
    for f in files:
        try:
            info = shard_info(f)
        except NanoctlError as e:
            raise NanoctlError(
                e.message, "check or re-create the file, or remove it from the inputs"
            ) from None
        if info.documents == 0:
            if f in explicit:
                raise NanoctlError(f"{f} is empty (no rows)", "remove it from the inputs")
            result.empty_files.append(str(f))
            continue
        kept.append((f, info))
    if len(kept) < 2:
        return []
    staging.mkdir(parents=True, exist_ok=True)
    count = sum(i.text_bytes for _, i in kept) <= COUNT_CHARS_LIMIT
    for index, (f, info) in enumerate(kept):
        dest = staging / shard_filename(index)
        try:
            os.link(f, dest)
            result.linked += 1
        except OSError:
            shutil.copyfile(f, dest)
            result.copied += 1
        if info.characters is None and count:
            info.characters = _count_chars(dest)
        infos.append(info)
        result.files += 1
        if on_file:
            on_file(f, info.documents)
    return infos


def ingest(
    opts: IngestOptions,
    on_file: Callable[[Path, int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardInfo], None] | None = None,
    *,
    home: Home | str | os.PathLike[str] | None = None,
) -> IngestResult:
    """Read and shard the inputs into `opts.out`, else `<home>/data/base`; see the module docstring.

    Callbacks feed a progress display (files total, per file, per shard). An entry point: `home` is
    resolved here.
    """
    t0 = time.time()
    _check_options(opts)
    home = Home.resolve(home)
    out = Path(opts.out).expanduser().resolve() if opts.out else home.data_dir
    _prepare_out(out, opts.force)  # fail before reading gigabytes
    files, skipped = expand_inputs(opts.paths)
    # never re-read our own output shards
    files = [f for f in files if str(f) == STDIN or out not in f.resolve().parents]
    explicit = {Path(STDIN) if str(p) == STDIN else Path(p).expanduser() for p in opts.paths}
    result = IngestResult(directory=str(out), skipped_files=skipped)
    if not files:
        raise NanoctlError(
            f"no .txt/.md/.jsonl/.parquet files found in {', '.join(str(p) for p in opts.paths)}",
            "point to files or directories holding text",
        )
    if on_start:
        on_start(len(files))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.ingest-{uuid.uuid4().hex[:8]}"
    try:
        infos: list[ShardInfo] = []
        if _shard_format(files, opts):
            infos = _take_shards(files, staging, result, on_file, explicit)
            if infos:
                result.mode = "shards"
            else:  # fewer than 2 non-empty shards: split their documents instead
                shutil.rmtree(staging, ignore_errors=True)
                result.files, result.text_files, result.empty_files = 0, 0, []
                result.notes.append(
                    "one shard cannot hold both splits: its documents were re-sharded into train + validation"
                )
        elif (
            not opts.reshard
            and any(_kind(f) == "parquet" for f in files)
            and any(_kind(f) != "parquet" for f in files)
        ):
            result.notes.append(
                "parquet files mixed with other inputs: every document was re-sharded "
                "(ingest nanochat-format shards alone to take them as they are)"
            )
        if not infos:
            infos = _reshard(files, opts, staging, result, on_file, on_shard, explicit)
        atomic_write_json(
            staging / DATASET_MARKER,
            {
                "source": "ingest",
                "mode": result.mode,
                "inputs": [
                    _display(Path(p)) if str(p) == STDIN else str(Path(p).expanduser().resolve())
                    for p in opts.paths
                ],
                "files": result.files,
                "documents": sum(i.documents for i in infos),
                "characters": _sum_chars(infos),
                "val_documents": infos[-1].documents,
                "doc_chars": None if opts.one_doc_per_file else opts.doc_chars,
                "val_fraction": opts.val_fraction,
                "seed": opts.seed,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    result.shards = len(infos)
    result.train_documents = sum(i.documents for i in infos[:-1])
    result.train_characters = _sum_chars(infos[:-1])
    result.val_documents = infos[-1].documents
    result.val_characters = infos[-1].characters
    result.documents = result.train_documents + result.val_documents
    result.characters = _sum_chars(infos)
    result.seconds = round(time.time() - t0, 3)
    return result


def _sum_chars(infos: list[ShardInfo]) -> int | None:
    if any(i.characters is None for i in infos):
        return None
    return sum(i.characters or 0 for i in infos)


def _reshard(
    files: list[Path],
    opts: IngestOptions,
    staging: Path,
    result: IngestResult,
    on_file: Callable[[Path, int], None] | None,
    on_shard: Callable[[ShardInfo], None] | None,
    explicit: set[Path],
) -> list[ShardInfo]:
    docs: list[str] = []
    for f in files:
        try:
            got = _read(f, opts, result)
        except _Empty:
            if f in explicit:
                raise NanoctlError(
                    f"{_display(f)} is empty (no text)", "remove it from the inputs, or check what wrote it"
                ) from None
            result.empty_files.append(str(f))
            got = []
        docs.extend(got)
        result.files += 1
        if on_file:
            on_file(f, len(got))
    if len(docs) < 2:
        raise NanoctlError(
            f"found {len(docs)} document(s) in {result.files} file(s); need at least 2 (1 train + 1 validation)",
            "add more text, or lower --doc-chars so plain text makes several documents",
        )
    train, val = split_validation(docs, opts.val_fraction, opts.shard_chars, opts.seed)
    del docs
    random.Random(opts.seed).shuffle(train)
    planned = plan_shards(train + val, opts.shard_chars, n_val=len(val))
    del train, val
    return write_shards(staging, planned, opts.row_group_size, on_shard)


_OURS = re.compile(r"^(shard_\d+\.parquet(\.part)?|dataset\.json)$")


def _install(staging: Path, out: Path) -> None:
    """Swap the staged shards in. The whole directory is swapped when `out` holds only shard files
    (the usual <home>/data/base); otherwise (an --out directory holding other files) the staged files
    replace ours one by one and old shards beyond the new set are removed."""
    if not out.exists():
        os.rename(staging, out)
        return
    entries = list(out.iterdir())
    if all(p.is_file() and _OURS.match(p.name) for p in entries):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    new = sorted(staging.iterdir())
    names = {p.name for p in new}
    for p in new:
        os.replace(p, out / p.name)
    for old_shard in list_shards(out):
        if old_shard.name not in names:
            old_shard.unlink()
