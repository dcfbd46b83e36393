"""Pretraining data loader: parquet shards -> tokens -> BOS-aligned best-fit rows of T+1 tokens.

Pipeline (one background thread, so tokenization overlaps the training step):
  1. Rank r of W reads row groups r, r+W, r+2W, ... of each file, cycling over the files forever
     (`epoch` counts passes). Every document has a position (epoch, file, row_group, row).
  2. Documents are tokenized in batches with BOS prepended (`tokenizer.encode(list, prepend=bos,
     num_threads=...)`) into a buffer of `buffer_size` docs.
  3. Each row of T+1 tokens is filled by repeatedly placing the *largest buffered doc that fits*; when
     none fits, the *shortest* doc is cropped to fill the row exactly (nanochat's best-fit packing:
     every row starts with BOS, no padding). Ties go to the earliest doc in stream order, as nanochat.
  4. The main thread copies the (B, T+1) rows to the device (pinned memory + non_blocking on CUDA)
     and splits them into inputs/targets.

Exact resume (nanochat's is approximate: it skips ahead to the next row-group block): the state after
each batch is the stream cursor (next unread doc) plus the positions of the docs still in the buffer.
Packing is deterministic, so re-reading those docs and continuing from the cursor yields exactly the
batches the uninterrupted run would have produced.
"""

from __future__ import annotations

import bisect
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

STATE_VERSION = 1


class EncodesBatches(Protocol):
    def get_bos_token_id(self) -> int: ...

    def encode(self, text: Any, prepend: Any = None, append: Any = None, num_threads: int = 8) -> Any: ...


Pos = tuple[int, int, int, int]  # (epoch, file index, row group, row); ordering == stream order


@dataclass
class LoaderState:
    """Where the next batch comes from. JSON-serializable via to_dict/from_dict."""

    epoch: int = 0
    file: int = 0
    rg: int = -1  # row group index within `file`; -1 = not started (the first one is `rank`)
    row: int = 0  # next row to read inside `rg`
    buffer: list[Pos] | None = None  # positions of docs held in the packing buffer, stream order
    batches: int = 0  # batches yielded so far (for progress/diagnostics)

    def to_dict(self) -> dict[str, Any]:
        # Group buffered rows by row group: compact, and the JSON stays readable.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for e, f, g, r in self.buffer or []:
            groups.setdefault((e, f, g), []).append(r)
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "file": self.file,
            "rg": self.rg,
            "row": self.row,
            "batches": self.batches,
            "buffer": [[e, f, g, rows] for (e, f, g), rows in groups.items()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {d.get('version')!r}")
        buf: list[Pos] = []
        for e, f, g, rows in d.get("buffer", []):
            buf.extend((e, f, g, r) for r in rows)
        buf.sort()
        return cls(
            epoch=d["epoch"],
            file=d["file"],
            rg=d["rg"],
            row=d["row"],
            buffer=buf,
            batches=d.get("batches", 0),
        )


class _ShardReader:
    """Row-group access with a small cache (resume re-reads row groups of buffered docs)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        import pyarrow.parquet as pq

        self.paths = [Path(p) for p in paths]
        self._pq = pq
        self._files: dict[int, Any] = {}
        self.num_row_groups = [self._file(i).num_row_groups for i in range(len(self.paths))]

    def _file(self, i: int) -> Any:
        f = self._files.get(i)
        if f is None:
            f = self._pq.ParquetFile(self.paths[i])
            self._files[i] = f
        return f

    def read(self, file: int, rg: int) -> list[str]:
        return self._file(file).read_row_group(rg, columns=["text"]).column("text").to_pylist()


class _Packer:
    """The deterministic core: stream cursor + doc buffer + best-fit packing. Runs in the worker thread."""

    def __init__(
        self,
        tokenizer: EncodesBatches,
        paths: Sequence[Path],
        B: int,
        T: int,
        rank: int,
        world_size: int,
        buffer_size: int,
        tokenizer_batch_size: int,
        tokenizer_threads: int,
        cycle: bool,
        state: LoaderState | None,
    ) -> None:
        self.tok = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.reader = _ShardReader(paths)
        self.B, self.T = B, T
        self.rank, self.world = rank, world_size
        self.buffer_size = buffer_size
        self.tok_batch = tokenizer_batch_size
        self.threads = tokenizer_threads
        self.cycle = cycle
        # sorted by (length, position): largest-fit and shortest are bisect lookups
        self.keys: list[tuple[int, Pos]] = []
        self.docs: list[np.ndarray] = []
        # documents read from the shards but not yet in the buffer (texts, positions)
        self.pending: list[tuple[str, Pos]] = []
        self.exhausted = False  # a non-cycling (validation) stream ran out of row groups
        st = state or LoaderState()
        self.epoch, self.file, self.rg, self.row = st.epoch, st.file, st.rg, st.row
        self.batches = st.batches
        if self.rg < 0:
            self.rg = rank
            self._skip_to_valid_rg()
        if st.buffer:
            self._restore_buffer(st.buffer)

    # ---- stream -------------------------------------------------------------------------------
    def _skip_to_valid_rg(self) -> None:
        """Advance (file, rg) until it names an existing row group for this rank."""
        nfiles = len(self.reader.paths)
        if not any(n > self.rank for n in self.reader.num_row_groups):
            raise ValueError(f"no row group for rank {self.rank}: each shard has fewer row groups than that")
        while self.rg >= self.reader.num_row_groups[self.file]:
            self.file += 1
            self.rg = self.rank
            self.row = 0
            if self.file >= nfiles:
                if not self.cycle:
                    self.exhausted = True
                    raise StopIteration
                self.file = 0
                self.epoch += 1

    def _read_more(self) -> None:
        """Move the next row group's remaining rows (from `row`) into `pending`."""
        if self.exhausted:
            raise StopIteration
        texts = self.reader.read(self.file, self.rg)
        start = self.row
        for r in range(start, len(texts)):
            self.pending.append((texts[r], (self.epoch, self.file, self.rg, r)))
        self.rg += self.world
        self.row = 0
        self._skip_to_valid_rg()

    def _refill(self) -> None:
        """Tokenize the next batch of docs into the buffer (cursor = first doc not yet buffered)."""
        while len(self.pending) < self.tok_batch:
            try:
                self._read_more()
            except StopIteration:
                break
        if not self.pending:
            raise StopIteration
        take, self.pending = self.pending[: self.tok_batch], self.pending[self.tok_batch :]
        self._insert([t for t, _ in take], [p for _, p in take])

    def _insert(self, texts: list[str], positions: list[Pos]) -> None:
        ids = self.tok.encode(texts, prepend=self.bos, num_threads=self.threads)
        for toks, pos in zip(ids, positions, strict=True):
            key = (len(toks), pos)
            i = bisect.bisect_left(self.keys, key)
            self.keys.insert(i, key)
            self.docs.insert(i, np.asarray(toks, dtype=np.int32))

    def _restore_buffer(self, positions: list[Pos]) -> None:
        by_rg: dict[tuple[int, int, int], list[int]] = {}
        for e, f, g, r in positions:
            by_rg.setdefault((e, f, g), []).append(r)
        for (e, f, g), rows in sorted(by_rg.items()):
            texts = self.reader.read(f, g)
            self._insert([texts[r] for r in rows], [(e, f, g, r) for r in rows])

    def cursor(self) -> Pos:
        """Position of the first doc not yet in the buffer (pending docs count as unread)."""
        if self.pending:
            return self.pending[0][1]
        return (self.epoch, self.file, self.rg, self.row)

    def state(self) -> LoaderState:
        e, f, g, r = self.cursor()
        return LoaderState(
            epoch=e, file=f, rg=g, row=r, buffer=sorted(k[1] for k in self.keys), batches=self.batches
        )

    # ---- packing ------------------------------------------------------------------------------
    def next_batch(self) -> np.ndarray:
        cap = self.T + 1
        rows = np.empty((self.B, cap), dtype=np.int64)
        for b in range(self.B):
            pos = 0
            while pos < cap:
                while len(self.docs) < self.buffer_size:
                    try:
                        self._refill()
                    except StopIteration:
                        if not self.docs:
                            raise
                        break
                remaining = cap - pos
                # largest length <= remaining; among equal lengths, the earliest doc
                j = bisect.bisect_right(self.keys, (remaining, (1 << 62,) * 4)) - 1
                if j >= 0:
                    j = bisect.bisect_left(self.keys, (self.keys[j][0],))
                    doc = self.docs.pop(j)
                    self.keys.pop(j)
                    rows[b, pos : pos + len(doc)] = doc
                    pos += len(doc)
                else:  # nothing fits: crop the shortest (index 0) to fill the row exactly
                    doc = self.docs.pop(0)
                    self.keys.pop(0)
                    rows[b, pos:] = doc[:remaining]
                    pos = cap
        self.batches += 1
        return rows


class DataLoader:
    """Iterator of (inputs, targets) on `device`, each (B, T) int64; `state_dict()` after each batch.

    A background thread tokenizes and packs up to `prefetch` batches ahead; the state returned by
    `state_dict()` always describes what the *consumer* has taken, so checkpoints are exact.
    """

    def __init__(
        self,
        tokenizer: EncodesBatches,
        paths: Sequence[str | os.PathLike[str]],
        B: int,
        T: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: Any = "cpu",
        state: dict[str, Any] | LoaderState | None = None,
        buffer_size: int = 1000,
        tokenizer_batch_size: int = 128,
        tokenizer_threads: int = 4,
        prefetch: int = 4,
        cycle: bool = True,
    ) -> None:
        import torch

        if not paths:
            raise ValueError("DataLoader needs at least one parquet shard")
        self.B, self.T = B, T
        self.device = torch.device(device)
        if isinstance(state, dict):
            state = LoaderState.from_dict(state)
        self._state = state or LoaderState()
        self._packer = _Packer(
            tokenizer,
            [Path(p) for p in paths],
            B,
            T,
            rank,
            world_size,
            buffer_size,
            tokenizer_batch_size,
            tokenizer_threads,
            cycle,
            state,
        )
        if state is None:
            self._state = self._packer.state()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="nanoctl-loader", daemon=True)
        self._thread.start()
        # two pinned host buffers alternate so a non_blocking copy is never overwritten in flight
        self._cuda = self.device.type == "cuda"
        self._host = (
            [torch.empty((B, T + 1), dtype=torch.int64, pin_memory=True) for _ in range(2)]
            if self._cuda
            else []
        )
        self._events: list[Any] = [None, None]
        self._flip = 0

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                rows = self._packer.next_batch()
                item = (rows, self._packer.state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            self._queue.put(None)
        except BaseException as e:  # surface worker errors in the consumer
            self._queue.put(e)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def next_rows(self) -> tuple[np.ndarray, LoaderState]:
        """The next (B, T+1) numpy batch and the state after it (no device transfer)."""
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("data loader thread died") from None
        if item is None:
            self._queue.put(None)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        rows, state = item
        self._state = state
        return rows, state

    def __next__(self) -> tuple[Any, Any]:
        import torch

        rows, _ = self.next_rows()
        if self._cuda:
            host = self._host[self._flip]
            ev = self._events[self._flip]
            if ev is not None:
                ev.synchronize()  # the copy that last used this buffer has finished
            host.copy_(torch.from_numpy(rows))
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._events[self._flip] = ev
            self._flip ^= 1
        else:
            dev = torch.from_numpy(rows)  # a fresh array per batch: no copy needed
        return dev[:, :-1].contiguous(), dev[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """State after the last batch handed out: a loader built with it yields the next batch."""
        return self._state.to_dict()

    def close(self) -> None:
        self._stop.set()
        # drain so a blocked put() returns
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass


def val_loader(
    tokenizer: EncodesBatches,
    val_path: str | os.PathLike[str],
    B: int,
    T: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: Any = "cpu",
    **kw: Any,
) -> DataLoader:
    """A fresh loader from the start of the validation shard (rebuilt for every eval, as nanochat)."""
    return DataLoader(tokenizer, [val_path], B, T, rank=rank, world_size=world_size, device=device, **kw)
