"""Continuous batching: one thread owns the model and decodes every running request's rows together.

Each request's samples are rows of one `SlotKVCache` (`--max-batch` rows, each with its own length).
A request waits in a bounded queue until it has rows; its prompt is then prefilled *between* decode steps,
at most `prefill_chunk` tokens per turn (several short prompts share a turn; a long one takes several),
so a long prompt never stalls the streams already running. Once prefilled, its
rows join the decode batch; a row leaves when it emits a stop token, reaches its token budget or the
context, or its request is cancelled (a client disconnect or a matched stop string), freeing the row
within one decode step.

Sampling is `engine.sample_logits` with each request's own `SamplingParams` and per-row generators
seeded `seed + i`, so a seeded request gets the same tokens whether it runs alone or beside others
(rows never mix: the decode step is row-independent). The calculator tool runs as in `Engine`
(`Engine.next_token`): tool-output tokens are forced and reported with `forced=True`.

With a LoRA bank (`nanoctl.model.lora_bank`, several `--lora` adapters) every request names its adapter
(`GenerationRequest.adapter`, -1 = the base) and rows of different adapters still decode together: each
forward runs inside `bank.select(...)` with the prefill's row or the decode rows' adapters in row order.

Events go to each request's `asyncio.Queue`, a turn's events together (`deliver`: one
`loop.call_soon_threadsafe` per event loop); the HTTP layer turns them into text (UTF-8 safe) and SSE
chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nanoctl.engine import Engine, RowState, SamplingParams, row_generators, sample_logits

if TYPE_CHECKING:
    import torch

    from nanoctl.model.gpt import GPT
    from nanoctl.model.lora_bank import LoRABank


@dataclass
class GenerationRequest:
    prompt: list[int]  # rendered token ids
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1  # parallel samples; sample i uses seed params.seed + i
    adapter: int = -1  # the LoRA bank's adapter every row uses (-1: the base model)


@dataclass
class TokenEvent:
    index: int  # which sample
    token: int
    forced: bool  # a calculator-tool token the model did not sample


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" | "length" | "cancelled"


@dataclass
class ErrorEvent:
    message: str  # the request failed; no more events follow


Event = TokenEvent | FinishEvent | ErrorEvent


class QueueFull(Exception):
    """`max_queue` requests are already waiting: answer 429 and let the client retry."""


class RequestHandle:
    """A submitted request: its events, and a thread-safe cancel."""

    _ids = itertools.count()

    def __init__(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.id = f"req-{next(self._ids)}"
        self.request = req
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


def deliver(batch: list[tuple[RequestHandle, Event]]) -> None:
    """Put events into their requests' queues with one wake-up per event loop, in order.

    A decode step makes one event per row: waking the loop once per event cost a self-pipe write on the
    scheduler thread and a read on the loop's, each holding the GIL (about 4% of an engine thread's time
    at 32 streams on a 2-core box, py-spy), a cost that grows with the batch.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
    for handle, event in batch:
        by_loop.setdefault(handle.loop, []).append((handle, event))
    for loop, events in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down)
            loop.call_soon_threadsafe(_put_all, events)


def _put_all(events: list[tuple[RequestHandle, Event]]) -> None:
    for handle, event in events:
        handle.events.put_nowait(event)


@dataclass
class _Row:
    handle: RequestHandle
    index: int
    slot: int
    state: RowState
    budget: int  # tokens this row may still produce
    generator: Any  # torch.Generator | None
    seen: Any = None  # (V,) bool mask for the repetition penalty
    last: int = 0  # the token to feed next
    done: bool = False


@dataclass
class _Prefill:
    handle: RequestHandle
    slots: list[int]
    pos: int = 0  # prompt tokens already in the cache


class Scheduler:
    """Owns one model on one device; `submit` from any thread (the event loop), decode on its own."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        name: str = "cpu",
        on_step: Callable[[int], None] | None = None,
        bank: LoRABank | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.bank = bank  # several adapters mounted unmerged, chosen per row (None: the model as loaded)
        self.engine = Engine(model, tokenizer)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.name = name
        self.on_step = on_step  # called with the decode batch size after every step (metrics)
        self.context_len = int(model.config.sequence_len)
        self._cache = model.new_slot_cache(max_batch, kv_dtype=kv_dtype)
        self._free = list(range(max_batch))
        self._waiting: deque[RequestHandle] = deque()
        self._prefills: deque[_Prefill] = deque()
        self._rows: list[_Row] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[RequestHandle, Event]] = []  # this turn's events, delivered together

    # -- called from other threads -------------------------------------------------------------------

    @property
    def kv_dtype(self) -> str:
        return str(self._cache.k_cache.dtype).removeprefix("torch.")

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._prefills)

    @property
    def active_rows(self) -> int:
        # A finished row is marked done before its finish event goes out, but leaves `_rows` only after
        # the whole step: not counting it, a client that has its reply never reads a stale count.
        return sum(not r.done for r in self._rows)

    @property
    def load(self) -> int:
        return self.queue_depth + self.active_rows

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        if not req.prompt:
            raise ValueError("empty prompt")
        if len(req.prompt) > self.context_len:
            raise ValueError(
                f"a {len(req.prompt)}-token prompt does not fit the {self.context_len}-token context"
            )
        if req.n > self.max_batch:
            raise ValueError(f"n={req.n} is more than the server's {self.max_batch} rows")
        adapters = 0 if self.bank is None else self.bank.size
        if not -1 <= req.adapter < adapters:
            raise ValueError(f"adapter {req.adapter} is not loaded ({adapters} adapter(s))")
        handle = RequestHandle(req, loop)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"nanoctl-scheduler-{self.name}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not (self._waiting or self._prefills or self._rows):
                        self._wake.wait()
                    if self._stop:
                        break
                    self._admit()
                try:
                    self._drop_cancelled()
                    self._flush()  # a cancelled request hears so before the next step, not after it
                    if self._prefills:
                        self._prefill_turn()
                        self._flush()  # first tokens go out before the decode step
                    if self._rows:
                        self._decode_step()
                except Exception as e:  # a bug or OOM: fail the requests in flight, keep serving
                    self._fail_all(f"{type(e).__name__}: {e}")
                self._flush()
        self._fail_all("the server is shutting down")
        self._flush()

    def _emit(self, handle: RequestHandle, event: Event) -> None:
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            deliver(batch)

    def _admit(self) -> None:
        """Move waiting requests to prefill while rows are free (FIFO: a big n waits its turn)."""
        while self._waiting and len(self._free) >= self._waiting[0].request.n:
            handle = self._waiting.popleft()
            if handle.cancelled.is_set():
                for i in range(handle.request.n):
                    self._emit(handle, FinishEvent(i, "cancelled"))
                continue
            slots = [self._free.pop(0) for _ in range(handle.request.n)]
            for s in slots:
                self._cache.free(s)
            self._prefills.append(_Prefill(handle, slots))

    def _release(self, slot: int) -> None:
        self._cache.free(slot)
        with self._lock:
            self._free.append(slot)
            self._free.sort()  # lowest first keeps the running rows contiguous (no gather in decode)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [h for h in self._waiting if h.cancelled.is_set()]
            for h in gone:
                self._waiting.remove(h)
        for h in gone:
            for i in range(h.request.n):
                self._emit(h, FinishEvent(i, "cancelled"))
        for p in [p for p in self._prefills if p.handle.cancelled.is_set()]:
            self._prefills.remove(p)
            for i, s in enumerate(p.slots):
                self._release(s)
                self._emit(p.handle, FinishEvent(i, "cancelled"))
        for row in self._rows:
            if not row.done and row.handle.cancelled.is_set():
                self._finish(row, "cancelled")
        self._rows = [r for r in self._rows if not r.done]

    def _prefill_turn(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, across as many newcomers as fit, then return.

        Short prompts no longer wait one decode step each (32 arrivals used to mean 32 turns before the
        last first token). Chunks keep fixed boundaries (multiples of `prefill_chunk` in each prompt),
        so a seeded request's prefill is the same computation alone or in a crowd.
        """
        budget = self.prefill_chunk
        while self._prefills:
            p = self._prefills[0]
            prompt = p.handle.request.prompt
            end = min(len(prompt), (p.pos // self.prefill_chunk + 1) * self.prefill_chunk)
            if end - p.pos > budget and budget < self.prefill_chunk:
                return  # the next chunk would overrun this turn's budget: decode first
            budget -= end - p.pos
            if not self._prefill_chunk(p, prompt[p.pos : end], last=end >= len(prompt)) or budget <= 0:
                return

    def _prefill_chunk(self, p: _Prefill, chunk: list[int], last: bool) -> bool:
        """Run one chunk of `p`'s prompt; True when the prompt is done and its rows have started."""
        from nanoctl.engine import last_position_logits

        ids = self._tensor([chunk])
        view = self._cache.row(p.slots[0])
        with self._adapters([p.handle.request.adapter]):
            # Only the last chunk's last position is sampled; a middle chunk still runs the head on one
            # position instead of chunk x vocab logits that nobody reads (once 40% of prefill time).
            with last_position_logits(self.model):
                logits = self.model(ids, kv_cache=view, softcap=False)[:, -1, :]
        p.pos += len(chunk)
        if not last:
            return False  # the running rows decode before this prompt's next chunk
        self._prefills.popleft()
        self._start_rows(p, logits)
        return True

    def _start_rows(self, p: _Prefill, logits: torch.Tensor) -> None:
        import torch

        req = p.handle.request
        for s in p.slots[1:]:
            self._cache.copy_row(p.slots[0], s)
        gens = row_generators(req.params, req.n, self.model.get_device())
        room = self.context_len - len(req.prompt) + 1  # the last sampled token is never fed back
        budget = room if req.params.max_tokens is None else min(room, req.params.max_tokens)
        vocab = logits.size(-1)
        rows = []
        for i, s in enumerate(p.slots):
            seen = None
            if req.params.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                seen[self._tensor(req.prompt)] = True
            rows.append(_Row(p.handle, i, s, RowState(), budget, gens[i] if gens else None, seen))
        # Rows count as active before their first token goes out, so a client that has seen it never
        # reads a stale `active_rows` (the metric and the tests read it from other threads).
        self._rows = self._rows + rows
        self._sample(rows, logits.expand(len(rows), -1))
        self._rows = [r for r in self._rows if not r.done]

    def _decode_step(self) -> None:
        rows = sorted(self._rows, key=lambda r: r.slot)
        view = self._cache.decode_view([r.slot for r in rows])
        ids = self._tensor([[r.last] for r in rows])
        with self._adapters([r.handle.request.adapter for r in rows]):
            logits = self.model(ids, kv_cache=view, softcap=False)[:, -1, :]
        self._sample(rows, logits)
        self._rows = [r for r in rows if not r.done]
        if self.on_step is not None:
            self.on_step(len(rows))

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Draw one token per row (rows grouped by identical sampling settings), then advance each."""
        import torch

        groups: dict[SamplingParams, list[int]] = {}
        for i, r in enumerate(rows):
            key = dataclasses.replace(r.handle.request.params, seed=0, max_tokens=None)
            groups.setdefault(key, []).append(i)
        tokens = [0] * len(rows)
        for params, idx in groups.items():
            sub = logits[idx] if len(idx) < len(rows) else logits
            gens = None if params.greedy else [rows[i].generator for i in idx]
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.stack([rows[i].seen for i in idx])
            for i, t in zip(idx, sample_logits(sub, gens, params, seen).tolist(), strict=True):
                tokens[i] = t
        for r, sampled in zip(rows, tokens, strict=True):
            self._advance(r, sampled)

    def _advance(self, row: _Row, sampled: int) -> None:
        token, forced = self.engine.next_token(row.state, sampled)
        if token in self.engine.stop_tokens:
            self._finish(row, "stop")
            return
        self._emit(row.handle, TokenEvent(row.index, token, forced))
        row.budget -= 1
        row.last = token
        if row.seen is not None:
            row.seen[token] = True
        # The cache must hold this token when it is fed back; a full row ends here.
        if row.budget <= 0 or self._cache.lengths[row.slot] >= self.context_len:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        self._release(row.slot)
        self._emit(row.handle, FinishEvent(row.index, reason))

    def _fail_all(self, message: str) -> None:
        handles = {r.handle for r in self._rows} | {p.handle for p in self._prefills}
        with self._lock:
            handles |= set(self._waiting)
            self._waiting.clear()
        for r in self._rows:
            self._release(r.slot)
        for p in self._prefills:
            for s in p.slots:
                self._release(s)
        self._rows, self._prefills = [], deque()
        for h in handles:
            self._emit(h, ErrorEvent(message))

    def _adapters(self, adapters: list[int]) -> contextlib.AbstractContextManager[None]:
        """The rows of the next forward use these adapters (a no-op without a bank)."""
        return contextlib.nullcontext() if self.bank is None else self.bank.select(adapters)

    def _tensor(self, data: list[Any]) -> torch.Tensor:
        import torch

        return torch.tensor(data, dtype=torch.long, device=self.model.get_device())


class Router:
    """Several schedulers (one per GPU) behind one `submit`: each request goes to the least loaded."""

    def __init__(self, schedulers: list[Scheduler]) -> None:
        if not schedulers:
            raise ValueError("a router needs at least one scheduler")
        self.schedulers = schedulers
        self.max_batch = sum(s.max_batch for s in schedulers)
        self.context_len = schedulers[0].context_len

    @property
    def queue_depth(self) -> int:
        return sum(s.queue_depth for s in self.schedulers)

    @property
    def active_rows(self) -> int:
        return sum(s.active_rows for s in self.schedulers)

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        order = sorted(self.schedulers, key=lambda s: s.load)
        for s in order:
            try:
                return s.submit(req, loop)
            except QueueFull:
                continue
        raise QueueFull("every engine's queue is full")

    def start(self) -> None:
        for s in self.schedulers:
            s.start()

    def close(self, timeout: float = 10.0) -> None:
        for s in self.schedulers:
            s.close(timeout)
