"""Pretraining shards: nanochat's parquet format, discovery, the embedded sample corpus, text iteration.

Format (as nanochat's `dev/repackage_data_reference.py`): `shard_NNNNN.parquet`, one `text` column
(string), zstd, no dictionary, no statistics, row groups of up to 1024 documents. In sorted order the
last shard is the validation split and the others are train. Shards we write also carry
`{"documents", "characters"}` in the schema metadata under b"nanoctl", so listing them reads only the
footer; downloaded nanochat shards lack it and are listed from their footer's row counts.

pyarrow is imported inside functions: `nanoctl.data` is imported by light modules (the CLI).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl.atomic import atomic_path, atomic_write_json
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

if TYPE_CHECKING:
    import pyarrow.parquet as pq

SHARD_GLOB = "shard_*.parquet"
MAX_ROW_GROUP_SIZE = 1024  # nanochat's row group size; auto sizing never exceeds it
TARGET_ROW_GROUPS = 16  # auto sizing aims for this many row groups per shard (DDP ranks read r, r+W, ...)
METADATA_KEY = b"nanoctl"
FIX_HINT = "delete it and run `nanoctl data download`, or `nanoctl data ingest PATH` for your own text"

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "sample_data" / "sample.jsonl.gz"
DATASET_MARKER = "dataset.json"  # written by ingest/download: {"source": "ingest" | "download", ...}
SAMPLE_MARKER = "sample.json"  # written last: its presence marks a complete sample materialization
SAMPLE_SHARD_CHARS = 1_000_000
SAMPLE_VAL_FRACTION = 0.05
SAMPLE_SEED = 42
SAMPLE_FORMAT = 1  # bump when the sample's sharding changes so existing homes are rebuilt


def shard_filename(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """Sorted `shard_*.parquet` files in `directory` (empty when it does not exist); last = val."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(SHARD_GLOB) if p.is_file())


@dataclass(frozen=True)
class ShardSet:
    """The shards a stage reads. `is_sample` means the embedded corpus (callers should say so)."""

    directory: Path
    paths: tuple[Path, ...]
    is_sample: bool = False

    @property
    def train_paths(self) -> list[Path]:
        return list(self.paths[:-1])

    @property
    def val_path(self) -> Path:
        return self.paths[-1]

    def split_paths(self, split: str) -> list[Path]:
        if split == "train":
            return self.train_paths
        if split == "val":
            return [self.val_path]
        raise UsageError(f"split must be 'train' or 'val', got {split!r}")


@dataclass
class ShardInfo:
    path: str
    documents: int
    row_groups: int
    characters: int | None  # exact when written by nanoctl, else None
    text_bytes: int  # uncompressed size of the text column from the footer (≈ UTF-8 bytes)
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Reading


def open_shard(path: str | os.PathLike[str]) -> pq.ParquetFile:
    """Open a shard and check it has a `text` column; a missing or corrupt file is a one-line error."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise NanoctlError(f"shard {p} does not exist", _fix_hint(p))
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # ArrowInvalid / OSError: truncated download, not parquet, ...
        raise NanoctlError(f"shard {p} is not a readable parquet file ({_short(e)})", _fix_hint(p)) from None
    if "text" not in pf.schema_arrow.names:
        names = ", ".join(pf.schema_arrow.names)
        pf.close()
        raise NanoctlError(f"shard {p} has no `text` column (columns: {names})", _fix_hint(p))
    return pf


def _fix_hint(shard: Path) -> str:
    if (shard.parent / SAMPLE_MARKER).exists():  # the sample is ours to rebuild
        return f"remove {shard.parent}; the embedded sample is written again on next use"
    return FIX_HINT


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def num_row_groups(path: str | os.PathLike[str]) -> int:
    pf = open_shard(path)
    try:
        return pf.num_row_groups
    finally:
        pf.close()


def iter_row_group_texts(
    path: str | os.PathLike[str], start: int = 0, step: int = 1
) -> Iterator[tuple[int, list[str]]]:
    """Yield `(row_group_index, texts)` for row groups start, start+step, ... of one shard.

    This is nanochat's distributed read pattern (rank r of W reads r, r+W, ...); the index lets a
    loader record `{pq_idx, rg_idx}` for resume. Null texts are skipped.
    """
    if start < 0 or step < 1:
        raise UsageError(f"row group start must be >= 0 and step >= 1, got start={start} step={step}")
    pf = open_shard(path)
    try:
        for rg in range(start, pf.num_row_groups, step):
            try:
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise NanoctlError(
                    f"shard {path} row group {rg} is unreadable ({_short(e)})", _fix_hint(Path(path))
                ) from None
            yield rg, [t for t in texts if t is not None]
    finally:
        pf.close()


def iter_shard_texts(paths: Iterable[str | os.PathLike[str]], start: int = 0, step: int = 1) -> Iterator[str]:
    """Every document of the given shards in order (row groups start, start+step, ... of each)."""
    for p in paths:
        for _, texts in iter_row_group_texts(p, start, step):
            yield from texts


def iter_texts(
    split: str,
    home: Home,
    doc_cap: int | None = None,
    max_chars: int | None = None,
) -> Iterator[str]:
    """Documents of the pretraining split, as nanochat's tok_train reads them.

    Each document is cropped to `doc_cap` chars; iteration stops after the document that takes the
    running total past `max_chars`.
    """
    shards = resolve_pretrain_shards(home)
    nchars = 0
    for text in iter_shard_texts(shards.split_paths(split)):
        if doc_cap is not None and len(text) > doc_cap:
            text = text[:doc_cap]
        nchars += len(text)
        yield text
        if max_chars is not None and nchars > max_chars:
            return


def shard_info(path: str | os.PathLike[str]) -> ShardInfo:
    """Counts from the footer only (cheap even for 100 MB nanochat shards)."""
    p = Path(path)
    pf = open_shard(p)
    try:
        md = pf.metadata
        text_col = pf.schema_arrow.get_field_index("text")
        text_bytes = sum(
            md.row_group(i).column(text_col).total_uncompressed_size for i in range(md.num_row_groups)
        )
        characters = None
        kv = md.metadata or {}
        if METADATA_KEY in kv:
            try:
                characters = int(json.loads(kv[METADATA_KEY])["characters"])
            except (ValueError, KeyError, TypeError):
                characters = None
        return ShardInfo(str(p), md.num_rows, md.num_row_groups, characters, text_bytes, p.stat().st_size)
    finally:
        pf.close()


# ---------------------------------------------------------------------------------------------------------
# Writing


def auto_row_group_size(num_docs: int) -> int:
    """~TARGET_ROW_GROUPS row groups per shard, capped at nanochat's 1024 rows."""
    return max(1, min(MAX_ROW_GROUP_SIZE, math.ceil(num_docs / TARGET_ROW_GROUPS)))


def write_shard(
    path: str | os.PathLike[str],
    texts: Sequence[str],
    row_group_size: int | None = None,
    compression_level: int = 3,
) -> ShardInfo:
    """Write one shard atomically (temp file + rename). `row_group_size=None` picks one automatically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not texts:
        raise UsageError(f"refusing to write an empty shard {path}")
    rgs = row_group_size or auto_row_group_size(len(texts))
    chars = sum(len(t) for t in texts)
    table = pa.table({"text": pa.array(list(texts), type=pa.string())})
    table = table.replace_schema_metadata(
        {METADATA_KEY: json.dumps({"documents": len(texts), "characters": chars})}
    )
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=rgs,
            compression="zstd",
            compression_level=compression_level,
            use_dictionary=False,
            write_statistics=False,
        )
    return shard_info(path)


def plan_shards(
    docs: Sequence[str], shard_chars: int, val_fraction: float | None = None, *, n_val: int | None = None
) -> list[list[str]]:
    """Split docs (already in final order) into train shards of ~shard_chars plus one val shard, last.

    The val shard takes the last `n_val` docs, or max(1, round(n * val_fraction)); there is always
    >= 1 train shard.
    """
    if len(docs) < 2:
        raise NanoctlError(
            f"need at least 2 documents (1 train + 1 validation), got {len(docs)}",
            "add more text, or lower --doc-chars so plain text makes several documents",
        )
    if shard_chars < 1:
        raise UsageError(f"--shard-chars must be positive, got {shard_chars}")
    if n_val is None:
        if val_fraction is None or not 0.0 < val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        n_val = round(len(docs) * val_fraction)
    n_val = min(len(docs) - 1, max(1, n_val))
    train, val = docs[: len(docs) - n_val], docs[len(docs) - n_val :]
    # Even sizes, no small tail shard: round(total / shard_chars) shards, closed at cumulative targets.
    total = sum(len(d) for d in train)
    target = total / max(1, round(total / shard_chars))
    shards: list[list[str]] = []
    cur: list[str] = []
    done = 0
    for d in train:
        cur.append(d)
        done += len(d)
        if done >= target * (len(shards) + 1) - 0.5:
            shards.append(cur)
            cur = []
    if cur:
        shards.append(cur)
    shards.append(list(val))
    return shards


def write_shards(
    directory: str | os.PathLike[str],
    planned: Sequence[Sequence[str]],
    row_group_size: int | None = None,
    on_shard: Any = None,
) -> list[ShardInfo]:
    """Write planned shards as shard_00000.parquet ... into `directory` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, texts in enumerate(planned):
        info = write_shard(d / shard_filename(i), texts, row_group_size)
        infos.append(info)
        if on_shard is not None:
            on_shard(info)
    return infos


# ---------------------------------------------------------------------------------------------------------
# The embedded sample corpus


def sample_corpus_path() -> Path:
    if not SAMPLE_CORPUS.is_file():
        raise NanoctlError(
            f"the embedded sample corpus {SAMPLE_CORPUS} is missing (broken install)",
            "reinstall nanoctl, or provide data with `nanoctl data ingest PATH`",
        )
    return SAMPLE_CORPUS


def sample_documents() -> Iterator[dict[str, str]]:
    """The embedded corpus: `{"title", "text"}` docs of ~2-6k chars (see sample_data/SOURCES.md)."""
    import gzip

    with gzip.open(sample_corpus_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _sample_fingerprint() -> str:
    h = hashlib.sha256(sample_corpus_path().read_bytes())
    h.update(f"format={SAMPLE_FORMAT}".encode())
    return h.hexdigest()


def _sample_complete(directory: Path, fingerprint: str) -> bool:
    marker = directory / SAMPLE_MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("fingerprint") != fingerprint:
        return False
    names = meta.get("shards") or []
    return len(names) >= 2 and [p.name for p in list_shards(directory)] == names


def materialize_sample(directory: str | os.PathLike[str]) -> list[Path]:
    """Write the embedded corpus as shards under `directory` unless an identical copy is there.

    Atomic as a whole: shards go to a staging dir renamed into place, so concurrent callers (DDP ranks)
    and interrupted runs never leave a half-written set; the loser of a race uses the winner's copy.
    """
    d = Path(directory)
    fingerprint = _sample_fingerprint()
    if _sample_complete(d, fingerprint):
        return list_shards(d)
    docs = [doc["text"] for doc in sample_documents()]
    random.Random(SAMPLE_SEED).shuffle(docs)  # train and val both span every book
    planned = plan_shards(docs, SAMPLE_SHARD_CHARS, SAMPLE_VAL_FRACTION)
    d.parent.mkdir(parents=True, exist_ok=True)
    staging = d.parent / f".{d.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        infos = write_shards(staging, planned)
        atomic_write_json(
            staging / SAMPLE_MARKER,
            {
                "fingerprint": fingerprint,
                "source": "nanoctl embedded sample corpus (public domain; see sample_data/SOURCES.md)",
                "shards": [Path(i.path).name for i in infos],
                "documents": sum(i.documents for i in infos),
                "characters": sum(i.characters or 0 for i in infos),
            },
        )
        _swap_in(staging, d, lambda: _sample_complete(d, fingerprint))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _sample_complete(d, fingerprint):
        raise NanoctlError(f"could not materialize the sample corpus under {d}", f"remove {d} and retry")
    return list_shards(d)


def _swap_in(staging: Path, target: Path, target_ok: Any) -> None:
    """Rename staging -> target; an existing target is moved aside first unless it is already good."""
    for _ in range(3):
        try:
            os.rename(staging, target)
            return
        except OSError:
            if target_ok():
                return  # another process finished first
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, old)
            except FileNotFoundError:
                continue
            shutil.rmtree(old, ignore_errors=True)
    os.rename(staging, target)


def resolve_pretrain_shards(home: Home) -> ShardSet:
    """`<home>/data/base` when it holds >= 2 shards, else the embedded sample under `<home>/data/sample`."""
    base = list_shards(home.data_dir)
    if len(base) >= 2:
        return ShardSet(home.data_dir, tuple(base), is_sample=False)
    paths = materialize_sample(home.sample_data_dir)
    return ShardSet(home.sample_data_dir, tuple(paths), is_sample=True)


# ---------------------------------------------------------------------------------------------------------
# Listing (`nanoctl data ls`, `nanoctl cache ls`)


@dataclass
class ShardDirSummary:
    name: str  # base | sample
    directory: str
    source: str  # download | ingest | sample | unknown | none
    shards: int = 0
    train_documents: int = 0
    val_documents: int = 0
    train_characters: int | None = 0  # None when some shard lacks nanoctl's counts (downloaded shards)
    val_characters: int | None = 0
    text_bytes: int = 0  # uncompressed text size from the footers (≈ UTF-8 bytes)
    size_bytes: int = 0
    active: bool = False  # what pretraining and `tok train` would read
    problems: list[str] | None = None  # unreadable shards, named

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def documents(self) -> int:
        return self.train_documents + self.val_documents

    @property
    def characters(self) -> int | None:
        if self.train_characters is None or self.val_characters is None:
            return None
        return self.train_characters + self.val_characters


def _dir_source(directory: Path) -> str:
    if (directory / SAMPLE_MARKER).exists():
        return "sample"
    try:
        return str(json.loads((directory / DATASET_MARKER).read_text()).get("source", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def summarize_shard_dir(name: str, directory: str | os.PathLike[str]) -> ShardDirSummary:
    """Counts per split from the shard footers; unreadable shards are reported, not raised."""
    d = Path(directory)
    paths = list_shards(d)
    s = ShardDirSummary(name, str(d), _dir_source(d) if paths else "none", shards=len(paths))
    problems: list[str] = []
    for i, p in enumerate(paths):
        try:
            info = shard_info(p)
        except NanoctlError as e:
            problems.append(e.message)
            continue
        is_val = i == len(paths) - 1
        if is_val:
            s.val_documents += info.documents
        else:
            s.train_documents += info.documents
        attr = "val_characters" if is_val else "train_characters"
        cur = getattr(s, attr)
        setattr(s, attr, None if cur is None or info.characters is None else cur + info.characters)
        s.text_bytes += info.text_bytes
        s.size_bytes += info.size_bytes
    s.problems = problems or None
    return s


def list_data(home: Home | str | os.PathLike[str] | None = None) -> list[ShardDirSummary]:
    """The base and sample shard directories; `active` marks the one `resolve_pretrain_shards` picks
    (the sample counts as active before it is materialized, since it would be). An entry point
    (`nanoctl data ls`): `home` is resolved here."""
    h = Home.resolve(home)
    base = summarize_shard_dir("base", h.data_dir)
    sample = summarize_shard_dir("sample", h.sample_data_dir)
    if base.shards >= 2:
        base.active = True
    else:
        sample.active = True
    return [base, sample]
