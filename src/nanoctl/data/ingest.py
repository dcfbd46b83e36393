"""`nanoctl data ingest`: local text files -> pretraining shards in nanochat's format.

Inputs: .txt/.md (one document per file, or per blank-line-separated block with `split="paragraph"`),
.jsonl (one JSON object a line, a string field, default `text`), .parquet (a string column, default
`text`), any of .txt/.md/.jsonl also gzipped (`.gz`), and directories (recursive; hidden entries and
other suffixes are skipped and counted). Bytes that are not UTF-8 are decoded with U+FFFD replacement
and counted in the result, never fatal: one bad byte should not stop a corpus build.

All documents are held in memory to shuffle them (deterministic for a given `seed`); fine for the
local corpora this is meant for (up to a few GB of text). Existing shards are replaced only with
`force=True`; there is no append mode, because a new validation shard would have to move: rerun with
every input instead (the result is deterministic).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.atomic import atomic_write_json
from nanoctl.data.shards import DATASET_MARKER, ShardInfo, list_shards, plan_shards, write_shards
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SPLITS = ("file", "paragraph")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")


@dataclass
class IngestOptions:
    paths: list[Path]
    out: Path | None = None  # default: <home>/data/base
    split: str = "file"  # file | paragraph (text files only)
    min_chars: int = 1  # documents shorter than this (after stripping) are skipped
    text_field: str = "text"  # JSONL field / parquet column holding the text
    shard_chars: int = 250_000_000  # nanochat's shard size (~100 MB of parquet)
    val_fraction: float = 0.05  # share of documents in the validation shard (always >= 1 document)
    seed: int = 42
    row_group_size: int | None = None  # None: ~16 row groups per shard, at most 1024 rows each
    force: bool = False  # replace shards already in the output directory


@dataclass
class IngestResult:
    directory: str
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)  # unsupported suffixes found in directories
    documents: int = 0
    characters: int = 0
    skipped_short: int = 0  # documents under min_chars
    replaced_chars: int = 0  # undecodable bytes replaced by U+FFFD
    files_with_replacements: int = 0
    shards: int = 0
    val_documents: int = 0
    val_characters: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_inputs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Files to read (sorted within each directory) and the files skipped for their suffix."""
    if not paths:
        raise UsageError("no input paths given", "example: nanoctl data ingest ./books/ notes.txt")
    files: list[Path] = []
    skipped: list[str] = []
    for p in paths:
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
                    "expected .txt, .md, .jsonl, .parquet (or .txt.gz/.jsonl.gz) files or a directory",
                )
            files.append(p)
        elif p.exists():
            raise NanoctlError(f"{p} is neither a file nor a directory", "pass text files or directories")
        else:
            raise NanoctlError(f"{p} does not exist", "check the path")
    return files, skipped


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise NanoctlError(
            f"cannot read {path} ({e.strerror or e})", "check the file and its permissions"
        ) from None


def _decode(data: bytes, stats: IngestResult) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        strict_count = data.decode("utf-8", errors="ignore").count("\ufffd")  # U+FFFD already in the file
        text = data.decode("utf-8", errors="replace")
        stats.replaced_chars += text.count("\ufffd") - strict_count
        stats.files_with_replacements += 1
    return text.lstrip("\ufeff").replace("\r\n", "\n")


def _text_docs(path: Path, split: str, stats: IngestResult) -> Iterator[str]:
    text = _decode(_read_bytes(path), stats)
    if split == "paragraph":
        yield from _PARAGRAPH_RE.split(text)
    else:
        yield text


def _jsonl_docs(path: Path, text_field: str, stats: IngestResult) -> Iterator[str]:
    text = _decode(_read_bytes(path), stats)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoctlError(
                f"{path}:{lineno}: invalid JSON ({e.msg})", "each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict) or text_field not in obj:
            fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise NanoctlError(
                f"{path}:{lineno}: no {text_field!r} field (found: {fields})",
                "pass --text-field NAME to pick the field holding the text",
            )
        value = obj[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise NanoctlError(
                f"{path}:{lineno}: field {text_field!r} is a {type(value).__name__}, expected a string",
                "pass --text-field NAME to pick the field holding the text",
            )
        yield value


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoctlError(
            f"{path} is not a readable parquet file ({msg})", "check or re-create the file"
        ) from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise NanoctlError(
            f"{path}: no {text_field!r} column (columns: {', '.join(names)})",
            "pass --text-field NAME to pick the column holding the text",
        )
    import pyarrow as pa

    ftype = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise NanoctlError(
            f"{path}: column {text_field!r} has type {ftype}, expected string",
            "pass --text-field NAME to pick the column holding the text",
        )
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if t is not None:
                    yield t
    finally:
        pf.close()


def read_documents(path: Path, opts: IngestOptions, stats: IngestResult) -> list[str]:
    """Documents of one input file, stripped, without the ones under `min_chars`."""
    kind = _kind(path)
    if kind == "text":
        raw: Iterator[str] = _text_docs(path, opts.split, stats)
    elif kind == "jsonl":
        raw = _jsonl_docs(path, opts.text_field, stats)
    elif kind == "parquet":
        raw = _parquet_docs(path, opts.text_field)
    else:  # expand_inputs filters these out
        raise UsageError(f"{path}: unsupported file type")
    docs = []
    for d in raw:
        d = d.strip()
        if len(d) >= max(1, opts.min_chars):
            docs.append(d)
        elif d:
            stats.skipped_short += 1
    return docs


def _check_options(opts: IngestOptions) -> None:
    if opts.split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {opts.split!r}")
    if opts.min_chars < 0:
        raise UsageError(f"--min-chars must be >= 0, got {opts.min_chars}")
    if opts.shard_chars < 1:
        raise UsageError(f"--shard-chars must be positive, got {opts.shard_chars}")
    if not 0.0 < opts.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {opts.val_fraction}")
    if opts.row_group_size is not None and opts.row_group_size < 1:
        raise UsageError(f"--row-group-size must be positive, got {opts.row_group_size}")


def _prepare_out(out: Path, force: bool) -> None:
    existing = list_shards(out)
    if existing and not force:
        raise NanoctlError(
            f"{out} already holds {len(existing)} shard(s)",
            "pass --force to replace them, or --out DIR to write elsewhere",
        )
    if out.exists() and not out.is_dir():
        raise NanoctlError(f"--out {out} is a file, expected a directory", "pick a directory path")


def ingest(
    opts: IngestOptions,
    on_file: Callable[[Path, int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardInfo], None] | None = None,
    *,
    home: Home | str | os.PathLike[str] | None = None,
) -> IngestResult:
    """Read, shuffle and shard the inputs into `opts.out`, else `<home>/data/base`.

    Callbacks feed a progress display (files total, per file, per shard).
    """
    t0 = time.time()
    _check_options(opts)
    home = Home.resolve(home)
    out = Path(opts.out).expanduser().resolve() if opts.out else home.data_dir
    _prepare_out(out, opts.force)  # fail before reading gigabytes
    files, skipped = expand_inputs(opts.paths)
    files = [f for f in files if out not in f.resolve().parents]  # never re-read our own output shards
    result = IngestResult(directory=str(out), skipped_files=skipped)
    if not files:
        raise NanoctlError(
            f"no .txt/.md/.jsonl/.parquet files found in {', '.join(str(p) for p in opts.paths)}",
            "point to files or directories holding text",
        )
    if on_start:
        on_start(len(files))
    docs: list[str] = []
    for f in files:
        got = read_documents(f, opts, result)
        docs.extend(got)
        result.files += 1
        if on_file:
            on_file(f, len(got))
    if len(docs) < 2:
        raise NanoctlError(
            f"found {len(docs)} document(s) in {result.files} file(s); need at least 2 (1 train + 1 validation)",
            "add more text, lower --min-chars, or use --split paragraph",
        )
    random.Random(opts.seed).shuffle(docs)
    planned = plan_shards(docs, opts.shard_chars, opts.val_fraction)
    del docs

    # Write to a staging dir next to the output, then move the shards in: an interrupted ingest
    # leaves the old shards (or nothing), never a mix.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.ingest-{uuid.uuid4().hex[:8]}"
    try:
        infos = write_shards(staging, planned, opts.row_group_size, on_shard)
        atomic_write_json(
            staging / DATASET_MARKER,
            {
                "source": "ingest",
                "inputs": [str(Path(p).expanduser().resolve()) for p in opts.paths],
                "files": result.files,
                "documents": sum(i.documents for i in infos),
                "characters": sum(i.characters or 0 for i in infos),
                "seed": opts.seed,
                "split": opts.split,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    result.shards = len(infos)
    result.documents = sum(i.documents for i in infos)
    result.characters = sum(i.characters or 0 for i in infos)
    result.val_documents = infos[-1].documents
    result.val_characters = infos[-1].characters or 0
    result.seconds = round(time.time() - t0, 3)
    return result


def _install(staging: Path, out: Path) -> None:
    try:
        os.rename(staging, out)  # the common case: a fresh output directory
        return
    except OSError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    for old in list_shards(out):
        old.unlink()
    for p in sorted(staging.iterdir()):
        os.replace(p, out / p.name)
