"""Continuous batching: ragged decode is exact, and a seeded request's text does not depend on its company.

A real tiny model with the current architecture (sliding windows, value embeddings, smear) and random
weights; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from eval_helpers import one_thread, tiny_tokenizer
from nanoctl.engine import Engine, SamplingParams
from nanoctl.model import kv_cache
from nanoctl.model.gpt import GPT, GPTConfig, build_model
from nanoctl.serve.scheduler import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    QueueFull,
    Router,
    Scheduler,
    TokenEvent,
)


def _model(seq: int = 512) -> GPT:
    tok = tiny_tokenizer()
    cfg = GPTConfig(
        sequence_len=seq, vocab_size=tok.get_vocab_size(), n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
        window_pattern="SSSL",
    )
    torch.manual_seed(0)
    m = build_model(cfg, "cpu", torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    m = _model()
    assert m.is_current and min(m.window_sizes) < 300  # windows really bite at these prompt lengths
    return m


def _prompts(n: int, lo: int = 20, hi: int = 300, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = tiny_tokenizer().get_vocab_size()
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


async def _collect(sched: Scheduler | Router, reqs: list[GenerationRequest]) -> list[tuple[dict[int, list[int]], dict[int, str]]]:
    loop = asyncio.get_running_loop()

    async def one(req: GenerationRequest) -> tuple[dict[int, list[int]], dict[int, str]]:
        h = sched.submit(req, loop)
        toks: dict[int, list[int]] = {i: [] for i in range(req.n)}
        done: dict[int, str] = {}
        while len(done) < req.n:
            ev = await asyncio.wait_for(h.events.get(), 60)
            if isinstance(ev, TokenEvent):
                toks[ev.index].append(ev.token)
            elif isinstance(ev, FinishEvent):
                done[ev.index] = ev.reason
            else:
                raise AssertionError(ev)
        return toks, done

    return await asyncio.gather(*(one(r) for r in reqs))


def _engine_text(engine: Engine, prompt: list[int], params: SamplingParams, n: int = 1) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for column, _ in engine.generate(prompt, params, num_samples=n):
        for i, t in enumerate(column):
            if done[i]:
                continue
            if t in engine.stop_tokens:
                done[i] = True
            else:
                rows[i].append(t)
        if all(done):
            break
    return rows


@pytest.mark.parametrize(
    "slots",
    [
        [0, 1, 2, 3],  # contiguous: a view of the cache
        [4, 0, 2, 7],  # holes (slots 1, 3, 5, 6 not decoding) in an 8-slot span: they ride along masked
        [11, 0, 9, 1],  # a 12-slot span for 4 rows: the rows are gathered
    ],
)
@pytest.mark.parametrize("native", [True, False], ids=["native", "sdpa-span"])
@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_ragged_decode_equals_full_recompute(
    model: GPT, slots: list[int], native: bool, kv: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ragged attention paths (the native CPU per-row kernel, SDPA over the padded span as on
    CUDA) equal a full recompute, with sliding windows, GQA, holes and gathered rows; also from an fp16
    cache (`serve --kv-dtype float16`), within fp16's rounding of K/V."""
    from nanoctl.model import kernels

    monkeypatch.setattr(kv_cache, "NATIVE_ATTENTION", native)
    calls = []
    real = kernels.ragged_decode_attention
    monkeypatch.setattr(kernels, "ragged_decode_attention", lambda *a: calls.append(1) or real(*a))
    prompts = _prompts(4, 5, 320)
    nexts = _prompts(4, 6, 7, seed=2)
    with torch.inference_mode(), one_thread():
        cache = model.new_slot_cache(12, kv_dtype=getattr(torch, kv))
        assert cache.k_cache.dtype == cache.v_cache.dtype == getattr(torch, kv)
        for s in range(12):  # stale rows in the holes must not leak into anyone's attention
            model(torch.tensor([_prompts(1, 30, 31, seed=s + 10)[0]]), kv_cache=cache.row(s))
            cache.free(s)
        view = cache.decode_view(sorted(slots))
        holes = view.span is not None and view._local is not None
        assert (view.span is None, holes) == {0: (False, False), 4: (False, True), 11: (True, False)}[slots[0]]
        for s, p in zip(slots, prompts, strict=True):
            for i in range(0, len(p), 64):  # chunked prefill through the row view
                model(torch.tensor([p[i : i + 64]]), kv_cache=cache.row(s))
        got: list[list[torch.Tensor]] = [[] for _ in slots]
        for t in range(6):
            ids = torch.tensor([[q[t]] for q in nexts])
            logits = model(ids, kv_cache=cache.decode_view(slots))[:, 0]
            for r in range(len(slots)):
                got[r].append(logits[r])
        for r, (p, q) in enumerate(zip(prompts, nexts, strict=True)):
            want = model(torch.tensor([p + q[:6]]))[0, -6:]
            atol = 1e-4 if kv == "float32" else 1e-2  # fp16 K/V: ~1e-3 relative; a wrong read is O(1)
            assert torch.allclose(torch.stack(got[r]), want, atol=atol), (len(p), (torch.stack(got[r]) - want).abs().max())
        assert (len(calls) > 0) == native  # the path under test really ran


@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_a_rows_logits_are_bit_identical_alone_or_beside_others(model: GPT, kv: str) -> None:
    """CPU fp32 decode is batch-invariant: the native head, linears and attention give every row the
    same operations whatever else shares the step, so a row's logits are equal bit for bit (from an
    fp16 cache too)."""
    prompts = _prompts(5, 5, 320, seed=4)
    with torch.inference_mode():
        cache = model.new_slot_cache(5, kv_dtype=getattr(torch, kv))
        for s, p in enumerate(prompts):
            model(torch.tensor([p]), kv_cache=cache.row(s))
        ids = torch.tensor([[7], [8], [9], [10], [11]])
        prev = cache.prev.clone()  # smear's previous embeddings, which a step overwrites
        together = model(ids, kv_cache=cache.decode_view([0, 1, 2, 3, 4]))[:, 0]
        for s in range(5):
            cache.lengths[s] -= 1  # rewind: decode the same step again
        cache.prev.copy_(prev)
        for s in (0, 3):
            alone = model(ids[s : s + 1], kv_cache=cache.decode_view([s]))[0, 0]
            assert torch.equal(alone, together[s]), (s, (alone - together[s]).abs().max())


def test_32_concurrent_seeded_requests_equal_their_solo_runs_and_the_engine(model: GPT) -> None:
    prompts = _prompts(32)
    params = [
        SamplingParams(temperature=0.9, top_k=50 if i % 3 else None, top_p=0.9 if i % 4 == 0 else None,
                       repetition_penalty=1.3 if i % 5 == 0 else 1.0, max_tokens=24, seed=100 + i)
        for i in range(32)
    ]
    params[7] = SamplingParams(temperature=0.0, max_tokens=24)  # greedy beside sampled rows
    reqs = [GenerationRequest(p, sp) for p, sp in zip(prompts, params, strict=True)]
    with one_thread():
        sched = Scheduler(model, tiny_tokenizer(), max_batch=32, prefill_chunk=64)
        sched.start()
        try:
            solo = [asyncio.run(_collect(sched, [r]))[0] for r in reqs]
            together = asyncio.run(_collect(sched, reqs))
        finally:
            sched.close()
        engine = Engine(model, tiny_tokenizer())
        for i, (a, b) in enumerate(zip(solo, together, strict=True)):
            assert a == b, f"request {i} changed next to 31 others"
            assert a[0][0] == _engine_text(engine, prompts[i], params[i])[0], f"request {i} != Engine.generate"
            assert a[1][0] in ("stop", "length")
    assert sched.active_rows == 0 and sched.queue_depth == 0


def test_parallel_samples_match_the_engine_rows(model: GPT) -> None:
    prompt = _prompts(1)[0]
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=16, seed=5)
    with one_thread():
        sched = Scheduler(model, tiny_tokenizer(), max_batch=8)
        sched.start()
        try:
            (toks, reasons), = asyncio.run(_collect(sched, [GenerationRequest(prompt, params, n=3)]))
        finally:
            sched.close()
        want = _engine_text(Engine(model, tiny_tokenizer()), prompt, params, n=3)
    assert [toks[i] for i in range(3)] == want
    assert len(set(map(tuple, want))) > 1  # different seeds, different samples


def test_cancel_frees_the_row_within_a_step_and_queue_overflow_is_refused(model: GPT) -> None:
    steps: list[int] = []
    with one_thread():
        sched = Scheduler(model, tiny_tokenizer(), max_batch=2, max_queue=1, on_step=steps.append)
        # This test is about cancelling: rows must not end by themselves (a random model's greedy text
        # may hit a stop token early, and which one depends on the torch build).
        sched.engine.stop_tokens = frozenset()
        sched.start()

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            long = SamplingParams(temperature=0.0, max_tokens=400)
            a = sched.submit(GenerationRequest([1, 2, 3], long), loop)
            assert isinstance(await asyncio.wait_for(a.events.get(), 30), TokenEvent)
            b = sched.submit(GenerationRequest([4, 5, 6], long), loop)
            assert isinstance(await asyncio.wait_for(b.events.get(), 30), TokenEvent)
            c = sched.submit(GenerationRequest([7, 8], long), loop)  # both rows busy: it waits
            with pytest.raises(QueueFull):
                sched.submit(GenerationRequest([9], long), loop)
            assert sched.active_rows == 2 and sched.queue_depth == 1
            a.cancel()
            before = len(steps)
            while True:  # drain a: it ends "cancelled"
                ev = await asyncio.wait_for(a.events.get(), 30)
                if isinstance(ev, FinishEvent):
                    assert ev.reason == "cancelled"
                    break
            assert len(steps) - before <= 1, "a cancelled row must leave within one decode step"
            # c takes the freed row and starts streaming while b keeps going
            assert isinstance(await asyncio.wait_for(c.events.get(), 30), TokenEvent)
            b.cancel()
            c.cancel()

        try:
            asyncio.run(scenario())
            deadline = time.monotonic() + 10
            while sched.active_rows and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sched.active_rows == 0
        finally:
            sched.close()


def test_a_long_prompt_is_prefilled_between_decode_steps(model: GPT) -> None:
    # While a 500-token prompt prefills in 32-token chunks, a running stream keeps getting tokens.
    order: list[tuple[str, Any]] = []
    lock = threading.Lock()
    with one_thread():
        sched = Scheduler(model, tiny_tokenizer(), max_batch=4, prefill_chunk=32)
        sched.start()

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            run = sched.submit(GenerationRequest([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=200)), loop)
            assert isinstance(await asyncio.wait_for(run.events.get(), 30), TokenEvent)
            big = sched.submit(GenerationRequest(_prompts(1, 500, 501)[0], SamplingParams(temperature=0.0, max_tokens=2)), loop)

            async def watch(h: Any, name: str) -> None:
                while True:
                    ev = await asyncio.wait_for(h.events.get(), 60)
                    with lock:
                        order.append((name, ev))
                    if isinstance(ev, FinishEvent | ErrorEvent):
                        return

            t = asyncio.create_task(watch(run, "run"))
            await watch(big, "big")
            run.cancel()
            await t

        try:
            asyncio.run(scenario())
        finally:
            sched.close()
    first_big = next(i for i, (n, _) in enumerate(order) if n == "big")
    # 500 tokens / 32 per chunk = 16 chunks: the running stream decoded between them
    assert sum(1 for n, _ in order[:first_big] if n == "run") >= 10


def test_calculator_tool_tokens_are_forced_and_reported(model: GPT) -> None:
    tok = tiny_tokenizer()
    engine = Engine(model, tok)
    sched = Scheduler(model, tok, max_batch=2)
    # Drive the row state machine the scheduler shares with the engine: an expression then its result.
    from nanoctl.engine import RowState

    row = RowState()
    for t in [engine.python_start, *tok.encode("2+3"), engine.python_end]:
        sched.engine.next_token(row, t)
    forced = [sched.engine.next_token(row, 0) for _ in range(len(row.forced))]
    assert all(f for _, f in forced)
    assert tok.decode([t for t, _ in forced[1:-1]]) == "5"


def test_router_sends_work_to_the_least_loaded(model: GPT) -> None:
    with one_thread():
        a = Scheduler(model, tiny_tokenizer(), max_batch=2, name="a")
        b = Scheduler(model, tiny_tokenizer(), max_batch=2, name="b")
        router = Router([a, b])
        router.start()

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            long = SamplingParams(temperature=0.0, max_tokens=300)
            hs = [router.submit(GenerationRequest([1, 2, 3], long), loop) for _ in range(3)]
            assert (a.load, b.load) in ((2, 1), (1, 2))  # spread, never 3 on one
            for h in hs:
                h.cancel()
            out = await _collect(router, [GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=8))
                                          for p in _prompts(4, 5, 20)])
            assert all(r[1][0] in ("stop", "length") for r in out)

        try:
            asyncio.run(scenario())
            assert router.max_batch == 4
        finally:
            router.close()
