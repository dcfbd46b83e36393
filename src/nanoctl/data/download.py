"""`nanoctl data download`: nanochat's pretraining shards from the Hugging Face hub.

As nanochat's `nanochat/dataset.py`: shards 0..N-1 plus the validation shard (the last index), parallel,
existing files skipped, 5 attempts with exponential backoff. Beyond it: downloads go to `<name>.part`
and resume with an HTTP Range request when the server honours it; every file is checked (non-empty,
parquet footer readable, a `text` column) before it is renamed into place; and when the server cannot
be reached at all (no response yet) we stop at once with one line instead of retrying 5 x N times.
urllib only (no requests dependency).
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.atomic import atomic_write_json
from nanoctl.data.shards import DATASET_MARKER, shard_filename
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

# name -> (Hugging Face dataset repo, MAX_SHARD: the last index, which is the validation shard)
DATASETS: dict[str, tuple[str, int]] = {
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542),  # nanochat HEAD (since 2026-03)
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822),  # nanochat OLD
}
CHUNK = 1 << 20  # 1 MiB, as nanochat
OFFLINE_HINT = "check your network, or build shards from local text with `nanoctl data ingest PATH`"


@dataclass
class DownloadOptions:
    shards: int = 8  # train shards 0..N-1 (-1: all); the validation shard is always added
    workers: int = 4
    dataset: str = "climbmix"
    base_url: str | None = None  # default https://huggingface.co/datasets/<repo>/resolve/main
    out: Path | None = None  # default <home>/data/base
    timeout: float = 30.0  # seconds per connect/read
    attempts: int = 5
    retry_wait: float = 2.0  # seconds before retry k is retry_wait * 2**(k-1)


@dataclass
class DownloadResult:
    directory: str
    dataset: str
    requested: int
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and valid
    resumed: list[str] = field(default_factory=list)  # continued from a .part file
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_indices(num: int, max_shard: int) -> list[int]:
    """nanochat's list: 0..num-1 (all train shards when num == -1), plus max_shard for validation."""
    if num < -1:
        raise UsageError(f"--shards must be >= 1, or -1 for all, got {num}")
    n = max_shard if num == -1 else min(num, max_shard)
    return list(range(n)) + [max_shard]


def base_url_for(dataset: str) -> str:
    return f"https://huggingface.co/datasets/{DATASETS[dataset][0]}/resolve/main"


def validate_parquet(path: Path) -> str | None:
    """None when `path` is a usable shard, else why not (non-empty, footer readable, a `text` column)."""
    import pyarrow.parquet as pq

    try:
        if path.stat().st_size == 0:
            return "empty file"
        pf = pq.ParquetFile(path)
        try:
            if "text" not in pf.schema_arrow.names:
                return "no `text` column"
        finally:
            pf.close()
    except Exception as e:
        return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return None


class _Corrupt(Exception):
    pass


class _Stop(Exception):
    pass


def _request(url: str, offset: int = 0) -> urllib.request.Request:
    from nanoctl import __version__

    headers = {"User-Agent": f"nanoctl/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


class _Downloader:
    def __init__(self, opts: DownloadOptions, out: Path, on_bytes: Callable[[int], None] | None) -> None:
        self.opts = opts
        self.out = out
        self.on_bytes = on_bytes
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.retries = 0
        self.bytes = 0
        self.connected = False  # set once any response arrives: until then a connect failure means offline

    def _count(self, n: int) -> None:
        with self.lock:
            self.bytes += n
        if self.on_bytes:
            self.on_bytes(n)

    def fetch(self, url: str, dest: Path) -> str:
        """Download url -> dest; returns "downloaded" or "resumed". Raises NanoctlError when it gives up."""
        part = dest.with_name(dest.name + ".part")
        resumed = False
        last = ""
        for attempt in range(1, self.opts.attempts + 1):
            if self.stop.is_set():
                raise _Stop()
            offset = part.stat().st_size if part.exists() else 0
            try:
                with urllib.request.urlopen(_request(url, offset), timeout=self.opts.timeout) as r:
                    self.connected = True
                    if (
                        offset
                        and r.status == 206
                        and (r.headers.get("Content-Range") or "").startswith(f"bytes {offset}-")
                    ):
                        mode, resumed = "ab", True
                    else:  # the server ignored the Range header: start over
                        mode = "wb"
                    expected = int(r.headers.get("Content-Length") or -1)
                    got = 0
                    with open(part, mode) as f:
                        while True:
                            if self.stop.is_set():
                                raise _Stop()
                            try:
                                chunk = r.read(CHUNK)
                            except http.client.IncompleteRead as e:  # keep what arrived, resume after it
                                f.write(e.partial)
                                self._count(len(e.partial))
                                raise
                            if not chunk:
                                break
                            f.write(chunk)
                            got += len(chunk)
                            self._count(len(chunk))
                        f.flush()
                        if 0 <= got < expected:  # the connection closed early: resume from what arrived
                            raise http.client.IncompleteRead(b"", expected - got)
                        os.fsync(f.fileno())
                problem = validate_parquet(part)
                if problem:
                    raise _Corrupt(problem)
                os.replace(part, dest)
                return "resumed" if resumed else "downloaded"
            except _Stop:
                raise
            except _Corrupt as e:
                last = f"downloaded file is not a valid shard: {e}"
                part.unlink(missing_ok=True)
            except urllib.error.HTTPError as e:
                self.connected = True
                last = _reason(e)
                if e.code == 404:
                    raise NanoctlError(
                        f"{url} not found (HTTP 404)", "check --dataset / --base-url"
                    ) from None
                if e.code == 416:  # our .part is not a prefix the server can continue: start over
                    part.unlink(missing_ok=True)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                if isinstance(e, urllib.error.URLError) and not self.connected:
                    # Never reached the server (offline, DNS, refused): one line now, not N x 5 retries.
                    raise NanoctlError(f"cannot reach {url} ({_reason(e)})", OFFLINE_HINT) from None
                # resets, timeouts, truncated bodies: keep the .part and resume from it
                last = _reason(e)
            if attempt < self.opts.attempts:
                with self.lock:
                    self.retries += 1
                if self.stop.wait(self.opts.retry_wait * 2 ** (attempt - 1)):
                    raise _Stop()
        raise NanoctlError(
            f"could not download {url} after {self.opts.attempts} attempts ({last})",
            "rerun the same command to resume; " + OFFLINE_HINT,
        )


def _check_marker(out: Path, dataset: str) -> None:
    import json

    marker = out / DATASET_MARKER
    if not marker.exists():
        return
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if meta.get("source") == "ingest":
        raise NanoctlError(
            f"{out} holds shards ingested from local files; downloaded shards would mix with them",
            "download elsewhere with --out DIR, or remove them first: `nanoctl cache rm data`",
        )
    if meta.get("source") == "download" and meta.get("dataset") not in (None, dataset):
        raise NanoctlError(
            f"{out} holds {meta.get('dataset')} shards, not {dataset}",
            f"pass --dataset {meta.get('dataset')}, or --out DIR for a separate directory",
        )


def download(
    opts: DownloadOptions,
    on_start: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_file: Callable[[str, str], None] | None = None,
    *,
    home: Home | str | os.PathLike[str] | None = None,
) -> DownloadResult:
    """Download the shards (into `opts.out`, else `<home>/data/base`).

    Callbacks: on_start(total, already_present), on_bytes(n), on_file(name, status).
    """
    t0 = time.time()
    home = Home.resolve(home)
    if opts.dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {opts.dataset!r}")
    if opts.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {opts.workers}")
    if opts.attempts < 1:
        raise UsageError(f"--attempts must be >= 1, got {opts.attempts}")
    if opts.shards == 0:
        raise UsageError("--shards must be >= 1, or -1 for all")
    indices = shard_indices(opts.shards, DATASETS[opts.dataset][1])
    out = Path(opts.out).expanduser().resolve() if opts.out else home.data_dir
    if out.exists() and not out.is_dir():
        raise NanoctlError(f"--out {out} is a file, expected a directory", "pick a directory path")
    _check_marker(out, opts.dataset)
    base = (opts.base_url or base_url_for(opts.dataset)).rstrip("/")
    result = DownloadResult(str(out), opts.dataset, len(indices))

    todo: list[tuple[str, Path]] = []
    for i in indices:
        dest = out / shard_filename(i)
        if dest.exists() and validate_parquet(dest) is None:
            result.skipped.append(dest.name)
        else:
            todo.append((f"{base}/{dest.name}", dest))
    if on_start:
        on_start(len(indices), len(result.skipped))
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / DATASET_MARKER).exists():
            atomic_write_json(
                out / DATASET_MARKER, {"source": "download", "dataset": opts.dataset, "base_url": base}
            )
        dl = _Downloader(opts, out, on_bytes)
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="nanoctl-dl") as pool:
            futures = {pool.submit(dl.fetch, url, dest): dest for url, dest in todo}
            try:
                for f in as_completed(futures):
                    status = f.result()  # re-raises the first failure
                    name = futures[f].name
                    (result.resumed if status == "resumed" else result.downloaded).append(name)
                    if on_file:
                        on_file(name, status)
            except BaseException:
                # A failure or Ctrl+C: other workers stop at their next chunk; .part files stay for resume.
                dl.stop.set()
                for f in futures:
                    f.cancel()
                raise
        result.retries = dl.retries
        result.bytes = dl.bytes
    result.seconds = round(time.time() - t0, 3)
    return result
