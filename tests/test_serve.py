"""`nanoctl serve`: the OpenAI API over the continuous-batching scheduler, driven by the official SDK.

Two tiny real models: the trained chat model of tiny_chat.py (memorized replies: "hi" -> "hello there",
"what is 2+3?" -> a calculator call), and a "long runner" (random weights whose special-token output rows
are zero, so greedy decoding never stops by itself: a request runs exactly max_tokens, or until
cancelled), saved as a base checkpoint.

In-process tests build the FastAPI app over a real Scheduler and talk to it through
`httpx.ASGITransport` (no sockets): protocol, validation and error objects, auth, limits, metrics,
logging. ASGITransport buffers whole responses, so real streaming, client disconnects, 429 under load
and the SIGTERM drain run against `python -m nanoctl serve` subprocesses on free ports (--port 0, the
URL read from the --json events), each in its own process group, killed by group at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from nanoctl.cli import app as cli_app
from nanoctl.engine import SamplingParams
from nanoctl.model.gpt import GPT
from nanoctl.serve.api import AppConfig, ServedModel, ServerState, create_app
from nanoctl.serve.protocol import (
    ApiError,
    ChatMessage,
    Limits,
    StopMatcher,
    chat_turns,
    parse_chat,
    render_prompt,
)
from nanoctl.serve.scheduler import GenerationRequest, Scheduler
from nanoctl.tokenizer import SPECIAL_TOKENS
from tiny_chat import prompt_for, random_model, save_model, tiny_config, tiny_tokenizer, trained_chat_model

LABEL = "sft/d2@100"
BASE_LABEL = "base/d2@5"
KEY = "s3cret-key"
HI = [{"role": "user", "content": "hi"}]
CALC_REPLY = "let me see `2+3` → `5` so 5"
WAIT_S = 120  # bound on a server start (torch import + load) on a busy 2-core box

runner = CliRunner()


@functools.cache
def long_runner() -> GPT:
    """Random weights, an 8192-token context, zero output rows for every special token: greedy decoding
    never picks them (some ordinary logit is always > 0), so no stop, no calculator, exactly max_tokens.
    The long context lets a request outlast whatever a test does meanwhile, even on a fast machine."""
    tok = tiny_tokenizer()
    model = random_model(tiny_config(sequence_len=8192), seed=1)
    with torch.no_grad():
        for name in SPECIAL_TOKENS:
            model.lm_head.weight[tok.encode_special(name)] = 0.0
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads; on a busy 2-core box spinning threads cost a lot.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_sched() -> Iterator[Scheduler]:
    s = Scheduler(trained_chat_model(), tiny_tokenizer(), max_batch=4, max_queue=8)
    s.start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def base_sched() -> Iterator[Scheduler]:
    s = Scheduler(long_runner(), tiny_tokenizer(), max_batch=2, max_queue=1)
    s.start()
    yield s
    s.close()


def served(sched: Scheduler, label: str = LABEL, base: bool = False) -> ServedModel:
    return ServedModel(
        label, tiny_tokenizer(), sched, base, sched.context_len, rows_per_engine=sched.max_batch
    )


def make_app(sched: Scheduler | None, *, base: bool = False, **config: Any) -> Any:
    state = ServerState()
    if sched is not None:
        state.set_ready(served(sched, BASE_LABEL if base else LABEL, base))
    return create_app(AppConfig(**config), state)


@contextlib.asynccontextmanager
async def clients(
    app: Any, key: str = "unused"
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)
    sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
    async with http:
        yield sdk, http


def sse_events(body: str) -> list[Any]:
    """`data: ...` events of an SSE body, JSON-decoded ("[DONE]" kept as the string)."""
    assert body.endswith("\n\n"), body[-200:]
    out: list[Any] = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ----------------------------------------------------------------------------------------------------------
# Pure protocol pieces


def test_cpu_engines_split_the_rows_and_the_threads() -> None:
    """--workers 0 on a CPU: two single-threaded engines when torch has 2+ threads, one otherwise (or
    for a single row, or weights over 1 GiB); the rows split into shares that differ by one at most and
    sum to --max-batch."""
    from nanoctl.serve.server import ServeOptions, _engines_per_device, _rows

    assert [_rows(33, 2, i) for i in range(2)] == [17, 16] and [_rows(32, 3, i) for i in range(3)] == [11, 11, 10]
    before = torch.get_num_threads()
    try:
        for threads, max_batch, workers, want, threads_after in [
            (2, 32, 0, 2, 1), (4, 32, 0, 2, 2), (1, 32, 0, 1, 1), (2, 1, 0, 1, 2), (4, 32, 1, 1, 4), (4, 8, 4, 4, 1),
        ]:  # fmt: skip
            torch.set_num_threads(threads)
            assert _engines_per_device(ServeOptions(max_batch=max_batch, workers=workers), "cpu") == want
            assert torch.get_num_threads() == threads_after
        torch.set_num_threads(2)
        assert _engines_per_device(ServeOptions(), "cpu", weight_bytes=2 << 30) == 1  # a d20: one copy
        assert _engines_per_device(ServeOptions(workers=2), "cpu", weight_bytes=2 << 30) == 2  # asked for
        assert _engines_per_device(ServeOptions(workers=0), "cuda:0") == 1
    finally:
        torch.set_num_threads(before)


def test_stop_matcher_any_split_never_leaks_the_stop_string() -> None:
    text = "hello there, general kenobi"
    for stops, expected in [
        (("there",), "hello "),
        (("ral", "o t"), "hell"),
        (("zz",), text),
        (("i",), text[:-1]),
    ]:
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                m = StopMatcher(stops)
                out = m.push(text[:i]) + m.push(text[i:j]) + m.push(text[j:]) + m.finish()
                assert out == expected, (stops, i, j)
                assert m.stopped == (expected != text)


def test_chat_turns_merge_system_and_repeated_roles_like_render_conversation() -> None:
    tok = tiny_tokenizer()
    msgs = (ChatMessage("system", "be brief"), ChatMessage("user", "hi"), ChatMessage("user", "there"))
    assert chat_turns(msgs) == [{"role": "user", "content": "be brief\n\nhi\n\nthere"}]
    gen = parse_chat(json.dumps({"messages": [{"role": "system", "content": "S"}, *HI]}).encode(), Limits())
    # The tokenizer's own system merge gives the same prompt as ours.
    expected = tok.render_for_completion(
        {"messages": [{"role": "system", "content": "S"}, *HI, {"role": "assistant", "content": ""}]}
    )
    assert render_prompt(gen, tok, tok.get_vocab_size()) == expected
    for bad, param in [
        (
            (ChatMessage("user", "a"), ChatMessage("system", "b"), ChatMessage("user", "c")),
            "messages[1].role",
        ),
        ((ChatMessage("assistant", "a"), ChatMessage("user", "b")), "messages[0].role"),
        ((ChatMessage("system", "a"),), "messages"),
        ((ChatMessage("user", "a"), ChatMessage("assistant", "b")), "messages[1].role"),
    ]:
        with pytest.raises(ApiError) as e:
            chat_turns(bad)
        assert e.value.status == 400 and e.value.param == param


# ----------------------------------------------------------------------------------------------------------
# In-process: the app over a real scheduler


@pytest.mark.asyncio
async def test_chat_completion_reply_and_usage(chat_sched: Scheduler) -> None:
    async with clients(make_app(chat_sched)) as (sdk, _):
        r = await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == LABEL
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == "hello there" and r.choices[0].finish_reason == "stop"
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_for("hi")), 2)
        assert r.usage.total_tokens == r.usage.prompt_tokens + 2
        # content as text parts, the model omitted, and the bare path nanochat's page used
        r = await sdk.chat.completions.create(
            model=LABEL, messages=[{"role": "user", "content": [{"type": "text", "text": "what is 2+3?"}]}],
            temperature=0, max_completion_tokens=60,
        )  # fmt: skip
        assert r.choices[0].message.content == CALC_REPLY  # the calculator call shown inline


@pytest.mark.asyncio
async def test_chat_stream_format(chat_sched: Scheduler) -> None:
    async with clients(make_app(chat_sched)) as (sdk, http):
        body = {
            "messages": HI,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 2,
        }
        res = await http.post("/chat/completions", json=body)  # bare alias, no model field
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        events = sse_events(res.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert {(c["id"], c["created"], c["object"], c["model"]) for c in chunks} == {
            (chunks[0]["id"], chunks[0]["created"], "chat.completion.chunk", LABEL)
        }
        *choice_chunks, usage_chunk = chunks
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
        for i in range(2):
            mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == i]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "stop"
            assert all(c["finish_reason"] is None for c in mine[:-1])
            assert "".join(c["delta"].get("content", "") for c in mine) == "hello there"
        # the same through the SDK's stream reader
        stream = await sdk.chat.completions.create(
            model=LABEL, messages=HI, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        text, reasons, usages = "", [], []
        async for chunk in stream:
            if chunk.usage is not None:
                usages.append(chunk.usage)
            for c in chunk.choices:
                text += c.delta.content or ""
                reasons.append(c.finish_reason)
        assert text == "hello there" and reasons[-1] == "stop" and usages[0].completion_tokens == 2


@pytest.mark.asyncio
async def test_stop_strings_cut_the_text_and_finish_with_stop(chat_sched: Scheduler) -> None:
    async with clients(make_app(chat_sched)) as (sdk, http):
        r = await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0, stop=" there", n=2)
        assert [(c.message.content, c.finish_reason) for c in r.choices] == [("hello", "stop")] * 2
        assert r.usage is not None and r.usage.completion_tokens <= 4
        r = await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0, stop=["zzz", "o th"])
        assert r.choices[0].message.content == "hell"
        res = await http.post(
            "/v1/chat/completions", json={"messages": HI, "temperature": 0, "stream": True, "stop": ["lo t"]}
        )
        deltas = [e["choices"][0]["delta"].get("content", "") for e in sse_events(res.text)[:-1]]
        assert "".join(deltas) == "hel" and not any("lo" in d for d in deltas)
        r = await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0, stop="never there")
        assert r.choices[0].message.content == "hello there"  # a stop string that never appears


@pytest.mark.asyncio
async def test_completions_seeds_and_n(base_sched: Scheduler) -> None:
    async with clients(make_app(base_sched, base=True)) as (sdk, http):
        r = await sdk.completions.create(model=BASE_LABEL, prompt="the quick", max_tokens=5, temperature=0)
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert (
            r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 5
        )
        assert r.usage.prompt_tokens == 1 + len(tiny_tokenizer().encode("the quick"))  # BOS + the text

        async def sample(seed: int, n: int) -> list[str]:
            r = await sdk.completions.create(
                model=BASE_LABEL, prompt="the", max_tokens=12, temperature=1.0, n=n, seed=seed,
                extra_body={"top_k": 0},
            )  # fmt: skip
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

        two = await sample(7, 2)
        assert two == await sample(7, 2)  # reproducible
        assert two[0] != two[1]  # choice i samples with seed + i
        assert [two[1]] == await sample(8, 1)
        ids = [tiny_tokenizer().get_bos_token_id(), *tiny_tokenizer().encode("the quick")]
        r2 = await sdk.completions.create(model=BASE_LABEL, prompt=ids, max_tokens=5, temperature=0)
        assert r2.choices[0].text == r.choices[0].text  # a token-id prompt is the same prompt
        res = await http.post(
            "/v1/completions",
            json={"prompt": "the quick", "max_tokens": 5, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}},
        )  # fmt: skip
        events = sse_events(res.text)
        assert (
            events[-1] == "[DONE]"
            and events[-2]["choices"] == []
            and events[-2]["usage"]["completion_tokens"] == 5
        )
        texts = [e["choices"][0] for e in events[:-2]]
        assert {e["object"] for e in events[:-1]} == {"text_completion"}
        assert (
            "".join(t["text"] for t in texts) == r.choices[0].text and texts[-1]["finish_reason"] == "length"
        )
        with pytest.raises(openai.BadRequestError) as e:  # a base model has no chat template
            await sdk.chat.completions.create(model=BASE_LABEL, messages=HI)
        assert e.value.body["param"] == "model" and "/v1/completions" in e.value.body["message"]


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 9}, "n"),
    ({"n": True}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"extra_body": {"top_k": 201}}, "top_k"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"modalities": ["audio"]}}, "modalities"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "x"}] * 501}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    (
        {"messages": [{"role": r, "content": "x" * 7000} for r in ["user", "assistant"] * 2 + ["user"]]},
        "messages",
    ),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
    ),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": [*HI, {"role": "assistant", "content": "hello"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
]


@pytest.mark.asyncio
async def test_bad_requests_are_400_naming_the_field(chat_sched: Scheduler) -> None:
    async with clients(make_app(chat_sched)) as (sdk, _):
        for change, param in BAD_CHAT:
            kwargs: dict[str, Any] = {"model": LABEL, "messages": HI, **change}
            with pytest.raises(openai.BadRequestError) as e:
                await sdk.chat.completions.create(**kwargs)
            err = e.value.body
            assert e.value.status_code == 400 and err["param"] == param, (change, err)
            assert err["type"] == "invalid_request_error" and err["message"], err
        # accepted and ignored: fields that ask for nothing different
        r = await sdk.chat.completions.create(
            model=LABEL, messages=[{"role": "developer", "content": "be nice"}, *HI], temperature=0, user="u1",
            presence_penalty=0, frequency_penalty=0, logit_bias={}, logprobs=False, response_format={"type": "text"},
            store=False, parallel_tool_calls=False, extra_body={"top_k": 0, "repetition_penalty": 1.0},
        )  # fmt: skip
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError) as e:  # a prompt over --max-prompt-tokens
            async with clients(make_app(chat_sched, limits=Limits(max_prompt_tokens=5))) as (small, _):
                await small.chat.completions.create(model=LABEL, messages=HI)
        assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.asyncio
async def test_raw_error_objects_everywhere(chat_sched: Scheduler) -> None:
    async with clients(make_app(chat_sched, max_body_bytes=2000)) as (sdk, http):

        def error_of(res: httpx.Response) -> dict[str, Any]:
            body = res.json()
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
            return body["error"]

        res = await http.post("/v1/chat/completions", content=b'{"messages": [')
        assert res.status_code == 400 and error_of(res)["code"] == "invalid_json"
        res = await http.post("/v1/chat/completions", content=b"[1, 2]")
        assert res.status_code == 400 and "object" in error_of(res)["message"]
        res = await http.get("/v1/nowhere")
        assert res.status_code == 404 and error_of(res)["type"] == "invalid_request_error"
        res = await http.get("/v1/chat/completions")
        assert res.status_code == 405 and error_of(res)
        with pytest.raises(openai.NotFoundError) as e:
            await sdk.chat.completions.create(model="gpt-4o", messages=HI)
        assert e.value.body["code"] == "model_not_found" and LABEL in e.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("base/d9@1")
        assert (await sdk.models.retrieve(LABEL)).id == LABEL
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode()
        res = await http.post("/v1/chat/completions", content=big)  # refused on Content-Length
        assert res.status_code == 413 and error_of(res)["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(4):
                yield b" " * 800

        res = await http.post("/v1/chat/completions", content=chunked())
        assert res.status_code == 413 and error_of(res)["code"] == "request_too_large"


@pytest.mark.asyncio
async def test_api_key_guards_every_route_but_health(chat_sched: Scheduler) -> None:
    app = make_app(chat_sched, api_key=KEY)
    async with clients(app, key=KEY) as (sdk, http):
        assert (await http.get("/health")).status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")]:
            res = await http.request(method, path, json={"messages": HI})
            assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key", path
            assert res.headers["www-authenticate"] == "Bearer"
        r = await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0)
        assert r.choices[0].message.content == "hello there"
    async with clients(app, key=KEY + "x") as (wrong, _):
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
    async with clients(app, key=KEY[:-1]) as (prefix, _):
        with pytest.raises(openai.AuthenticationError):
            await prefix.chat.completions.create(model=LABEL, messages=HI)


@pytest.mark.asyncio
async def test_full_queue_is_429_with_retry_after(base_sched: Scheduler) -> None:
    loop = asyncio.get_running_loop()
    tok = tiny_tokenizer()
    long = GenerationRequest(
        [tok.get_bos_token_id(), 70, 71], SamplingParams(temperature=0, max_tokens=None), n=2
    )
    a = base_sched.submit(long, loop)  # takes both rows ...
    try:
        await _until(lambda: base_sched.active_rows == 2, "the first request to get the rows")
        b = base_sched.submit(long, loop)  # ... and this one the only queue place
        async with clients(make_app(base_sched, base=True)) as (sdk, _):
            with pytest.raises(openai.RateLimitError) as e:
                await sdk.completions.create(model=BASE_LABEL, prompt="x", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "rate_limit_exceeded"
    finally:
        a.cancel()
        b.cancel()
    await _until(lambda: base_sched.active_rows == 0 and base_sched.queue_depth == 0, "the rows to be freed")


@pytest.mark.asyncio
async def test_a_failure_inside_a_stream_is_one_error_event(tmp_path: Path) -> None:
    sched = Scheduler(long_runner(), tiny_tokenizer(), max_batch=2, max_queue=2)
    sched.start()
    async with clients(make_app(sched, base=True, limits=Limits(max_tokens=8000))) as (_, http):
        body = {"prompt": "the", "max_tokens": 8000, "temperature": 0}
        streamed = asyncio.ensure_future(http.post("/v1/completions", json={**body, "stream": True}))
        plain = asyncio.ensure_future(http.post("/v1/completions", json=body))
        await _until(lambda: sched.active_rows == 2, "both requests to decode")
        await asyncio.to_thread(sched.close)  # the engine goes away mid-generation
        events = sse_events((await streamed).text)
        assert "[DONE]" not in events and "error" in events[-1], events[-3:]
        assert (
            events[-1]["error"]["code"] == "generation_failed"
            and events[-1]["error"]["type"] == "server_error"
        )
        assert all("choices" in e for e in events[:-1])
        res = await plain
        assert res.status_code == 500 and res.json()["error"]["code"] == "generation_failed"


async def _until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_health_while_loading_ready_and_draining(chat_sched: Scheduler) -> None:
    state = ServerState()
    app = create_app(AppConfig(), state)
    async with clients(app) as (sdk, http):
        res = await http.get("/health")
        assert res.status_code == 503
        assert res.json()["error"] == {
            "message": "Loading model", "type": "unavailable_error", "param": None, "code": "loading"
        }  # fmt: skip
        with pytest.raises(openai.InternalServerError) as e:  # the SDK's class for 5xx
            await sdk.chat.completions.create(model=LABEL, messages=HI)
        assert e.value.status_code == 503
        assert _metric(await _scrape(http), "nanoctl_ready") == 0
        state.set_ready(served(chat_sched))
        res = await http.get("/health")
        assert res.status_code == 200 and res.json()["status"] == "ok" and res.json()["model"] == LABEL
        assert _metric(await _scrape(http), "nanoctl_ready") == 1
        state.begin_drain()
        assert (await http.get("/health")).status_code == 503
        res = await http.post("/v1/chat/completions", json={"messages": HI})
        assert res.status_code == 503 and res.json()["error"]["code"] == "shutting_down"


async def _scrape(http: httpx.AsyncClient) -> dict[str, Any]:
    res = await http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(res.text)}


def _metric(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    family = families[name]
    return sum(
        s.value
        for s in family.samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.asyncio
async def test_metrics_parse_and_count(chat_sched: Scheduler) -> None:
    async with clients(make_app(chat_sched)) as (sdk, http):
        await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0)
        await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0, stream=True)
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model=LABEL, messages=[])
        m = await _scrape(http)
        assert _metric(m, "nanoctl_requests", "_total", endpoint="/v1/chat/completions", status="200") == 2
        assert _metric(m, "nanoctl_requests", "_total", endpoint="/v1/chat/completions", status="400") == 1
        assert _metric(m, "nanoctl_prompt_tokens", "_total") == 2 * len(prompt_for("hi"))
        assert _metric(m, "nanoctl_generated_tokens", "_total") == 4
        assert _metric(m, "nanoctl_choices_finished", "_total", reason="stop") == 2
        assert _metric(m, "nanoctl_time_to_first_token_seconds", "_count") == 2
        assert _metric(m, "nanoctl_inter_token_latency_seconds", "_count") == 2  # one gap per 2-token reply
        assert _metric(m, "nanoctl_active_rows") == 0 and _metric(m, "nanoctl_queue_depth") == 0
        assert _metric(m, "nanoctl_max_rows") == chat_sched.max_batch
        # one registry per app: a second app starts from zero
        async with clients(make_app(chat_sched)) as (_, other):
            fresh = await _scrape(other)
            assert (
                _metric(fresh, "nanoctl_requests", "_total") == 0
                and _metric(fresh, "nanoctl_prompt_tokens", "_total") == 0
            )


@pytest.mark.asyncio
async def test_log_conversations_appends_one_private_line_per_request(
    chat_sched: Scheduler, tmp_path: Path
) -> None:
    path = tmp_path / "logs" / "chats.jsonl"
    async with clients(make_app(chat_sched, log_conversations=path)) as (sdk, _):
        await sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0)
        stream = await sdk.chat.completions.create(
            model=LABEL, messages=[{"role": "user", "content": "what is 2+3?"}], temperature=0, stream=True
        )
        async for _ in stream:
            pass
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(x["messages"][-1]["content"], x["choices"][0]["text"]) for x in lines] == [
        ("hi", "hello there"), ("what is 2+3?", CALC_REPLY)
    ]  # fmt: skip
    assert all(x["model"] == LABEL and x["usage"]["completion_tokens"] > 0 for x in lines)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # users' conversations: owner only


@pytest.mark.asyncio
async def test_cors_only_when_asked(chat_sched: Scheduler) -> None:
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    async with clients(make_app(chat_sched, api_key=KEY, cors_origins=["http://app.example"])) as (_, http):
        res = await http.options("/v1/chat/completions", headers=preflight)
        assert res.status_code == 200 and res.headers["access-control-allow-origin"] == "http://app.example"
        res = await http.get("/v1/models", headers={"Origin": "http://app.example"})  # 401, still readable
        assert res.status_code == 401 and res.headers["access-control-allow-origin"] == "http://app.example"
    async with clients(make_app(chat_sched)) as (_, http):
        res = await http.get("/v1/models", headers={"Origin": "http://app.example"})
        assert res.status_code == 200 and "access-control-allow-origin" not in res.headers


# ----------------------------------------------------------------------------------------------------------
# The CLI (in-process: validation, checkpoint and port errors happen before any server starts)


@pytest.fixture(scope="module")
def serve_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("serve") / "home"
    home.mkdir()
    save_model(home, trained_chat_model(), stage="sft", tag="d2", step=100)
    save_model(home, long_runner(), stage="base", tag="d2", step=5, with_tokenizer=False)
    return home


def test_cli_errors_are_one_line(serve_home: Path, tmp_path: Path) -> None:
    cases = [
        (["serve", "--gpus", "2", "--device", "cpu"], 2, "--gpus 2"),
        (["serve", "--port", "70000"], 2, "--port 70000"),
        (["serve", "--max-batch", "0"], 2, "--max-batch 0"),
        (["serve", "--workers", "3", "--max-batch", "2"], 2, "--workers 3"),
        (["serve", "--workers", "-1"], 2, "--workers -1"),
        (["serve", "--kv-dtype", "int4"], 2, "--kv-dtype 'int4' is not one of bfloat16, float16, float32"),
        (["serve", "--stage", "dpo"], 2, "--stage"),
        (["--home", str(tmp_path), "serve"], 1, "checkpoint"),
    ]
    if torch.cuda.device_count() < 2:
        cases.append((["--home", str(serve_home), "serve", "--gpus", "2"], 2, "--gpus 2"))
    for args, code, needle in cases:
        res = runner.invoke(cli_app, args)
        assert res.exit_code == code, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output, res.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = runner.invoke(
            cli_app, ["--home", str(serve_home), "serve", "--port", str(port), "--device", "cpu"]
        )
        assert res.exit_code == 1 and f"port {port} is already in use" in res.output, res.output
        assert res.output.startswith("error:") and "Traceback" not in res.output


def test_a_checkpoint_that_fails_to_load_is_one_line_exit_1(serve_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(serve_home, home)
    next((home / "checkpoints" / "sft" / "d2").glob("model_*.pt")).write_bytes(b"not a checkpoint")
    # in-process: the port is bound, the load fails in the background, the server stops by itself
    args = [
        "--home",
        str(home),
        "serve",
        "--stage",
        "sft",
        "--port",
        "0",
        "--device",
        "cpu",
        "--host",
        "0.0.0.0",
    ]
    res = runner.invoke(cli_app, args)
    assert res.exit_code == 1, res.output
    assert "error: loading sft/d2@100 failed:" in res.output and "Traceback" not in res.output, res.output
    # every interface and no key: one warning line
    assert [line for line in res.output.splitlines() if line.startswith("warning:")] == [
        next(line for line in res.output.splitlines() if "without --api-key" in line)
    ]


def test_serve_cli_import_stays_light() -> None:
    code = (
        "import sys, nanoctl.cli.main; print(','.join(m for m in ('torch', 'fastapi', 'uvicorn', 'starlette', "
        "'prometheus_client', 'pydantic', 'nanoctl.serve.api') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


# ----------------------------------------------------------------------------------------------------------
# Live servers: python -m nanoctl serve, the SDK over TCP


class LiveServer:
    """`python -m nanoctl serve --port 0 --json ...` in its own process group; the URL from its events."""

    def __init__(self, home: Path, log: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NANOCTL_API_KEY"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # a tiny model: threads only spin
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanoctl", "--home", str(home), "serve", "--port", "0", "--device", "cpu",
             "--json", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, start_new_session=True,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8")[-3000:]

    def wait_ready(self) -> str:
        deadline = time.monotonic() + WAIT_S
        while not any(e["event"] == "ready" for e in self.events):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nanoctl serve did not become ready (exit {self.proc.poll()}):\n{self.log()}")
            time.sleep(0.05)
        self.url = next(e["url"] for e in self.events if e["event"] == "ready")
        return self.url

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def live(serve_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    """A chat server (sft, API key) and a long-runner base server (1 row, 1 queue place), started
    together so their slow starts (torch import) overlap."""
    logs = tmp_path_factory.mktemp("logs")
    servers = {
        "chat": LiveServer(
            serve_home, logs / "chat.log", "--stage", "sft", "--api-key", KEY, "--max-batch", "4"
        ),
        "base": LiveServer(
            serve_home,
            logs / "base.log",
            "--stage",
            "base",
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--max-tokens-limit",
            "8192",
        ),  # fmt: skip
    }
    try:
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.kill()


def _live_metrics(url: str, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    res = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert res.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(res.text)}


def test_live_chat_streams_over_tcp_with_auth(live: dict[str, LiveServer]) -> None:
    s = live["chat"]
    sdk = s.client(KEY)
    assert [m.id for m in sdk.models.list()] == [LABEL]
    r = sdk.chat.completions.create(model=LABEL, messages=HI, temperature=0)
    assert (
        r.choices[0].message.content == "hello there"
        and r.usage is not None
        and r.usage.completion_tokens == 2
    )
    stream = sdk.chat.completions.create(
        model=LABEL, messages=[{"role": "user", "content": "what is 2+3?"}], temperature=0, stream=True,
        stream_options={"include_usage": True}, n=2,
    )  # fmt: skip
    texts, reasons, usage, ids = ["", ""], [None, None], None, set()
    for chunk in stream:
        ids.add((chunk.id, chunk.created))
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [CALC_REPLY] * 2 and reasons == ["stop"] * 2 and len(ids) == 1
    assert usage is not None and usage.completion_tokens > 10
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    res = httpx.post(s.url + "/v1/chat/completions", json={"messages": HI}, timeout=10)  # no key at all
    assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
    health = httpx.get(s.url + "/health", timeout=10)  # the probe needs no key
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == LABEL
    m = _live_metrics(s.url, KEY)
    assert _metric(m, "nanoctl_requests", "_total", endpoint="/v1/chat/completions", status="200") == 2
    assert _metric(m, "nanoctl_time_to_first_token_seconds", "_count") == 2


def test_live_base_server_completions_429_disconnects_and_sigterm_drain(live: dict[str, LiveServer]) -> None:
    s = live["base"]
    sdk = s.client()
    r = sdk.completions.create(model=BASE_LABEL, prompt="the quick", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=BASE_LABEL, messages=HI)
    body = {"prompt": "the", "max_tokens": 8000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=s.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as a:  # holds the only row
            lines = a.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating
            with http.stream("POST", "/v1/completions", json=body) as b:  # waits in the only queue place
                assert b.status_code == 200
                _wait(lambda: _metric(_live_metrics(s.url), "nanoctl_queue_depth") == 1, "the queued request")
                with pytest.raises(openai.RateLimitError) as e:
                    sdk.completions.create(model=BASE_LABEL, prompt="x", max_tokens=2)
                assert e.value.response.headers["retry-after"] == "1"
            # the queued client hung up: it is dropped from the queue; then the streaming one hangs up
        t0 = time.monotonic()

        def idle() -> bool:
            m = _live_metrics(s.url)
            return _metric(m, "nanoctl_active_rows") == 0 and _metric(m, "nanoctl_queue_depth") == 0

        _wait(idle, "the rows of the disconnected clients to be freed", timeout=10)
        freed_s = time.monotonic() - t0
        generated = _metric(_live_metrics(s.url), "nanoctl_generated_tokens", "_total")
        assert generated < 5 + 8000, "the abandoned stream ran to its end"
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(30, read=0.5))
        _wait(idle, "the row of the timed-out client to be freed", timeout=10)
        assert _metric(_live_metrics(s.url), "nanoctl_generated_tokens", "_total") < generated + 8000
    assert freed_s < 10
    r = sdk.completions.create(model=BASE_LABEL, prompt="the quick", max_tokens=5, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 5  # the freed row serves again
    _sigterm_drains(s)


def _sigterm_drains(s: LiveServer) -> None:
    """SIGTERM with a stream in flight: new requests get 503, the stream runs to its end, exit 0."""
    # A stream of about 2 s at this machine's decode speed: long enough to outlast the /health and
    # 503 probes below, short enough that a slow, busy box does not wait long for its end.
    t0 = time.monotonic()
    probe = httpx.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 100, "temperature": 0},
                       timeout=60)  # fmt: skip
    assert probe.status_code == 200
    per_s = 100 / (time.monotonic() - t0)
    tokens = int(min(8000, max(50, 2.0 * per_s)))
    body = {"prompt": "the", "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with (
        httpx.Client(base_url=s.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as a,
    ):
        lines = a.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        s.proc.send_signal(signal.SIGTERM)
        _wait(
            lambda: httpx.get(s.url + "/health", timeout=5).status_code == 503, "/health to report the drain"
        )
        res = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        assert res.status_code == 503 and res.json()["error"]["code"] == "shutting_down"
        rest = [first, *(line for line in lines if line.startswith("data: "))]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    events = [json.loads(line[len("data: ") :]) for line in rest[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == tokens  # the stream in flight ran to its end
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(timeout=30) == 0, s.log()
    log = s.log()
    assert "shutting down: 1 request(s) in flight" in log and "stopped" in log and "Traceback" not in log


def _wait(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_live_drain_timeout_ends_long_streams_with_an_error_event(serve_home: Path, tmp_path: Path) -> None:
    s = LiveServer(
        serve_home, tmp_path / "serve.log", "--stage", "base", "--shutdown-timeout", "0.3", "--max-batch", "1",
        "--max-tokens-limit", "8192",
    )  # fmt: skip
    try:
        s.wait_ready()
        body = {"prompt": "the", "max_tokens": 8000, "temperature": 0, "stream": True}
        with (
            httpx.Client(base_url=s.url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as a,
        ):
            lines = a.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        last = json.loads(rest[-1][len("data: ") :])
        assert last["error"]["code"] == "shutting_down", rest[-3:]  # one error event, then the end
        assert s.proc.wait(timeout=30) == 0, s.log()
    finally:
        s.kill()


@pytest.mark.slow
def test_live_32_concurrent_streams_complete_and_equal_their_seeded_solo_runs(
    serve_home: Path, tmp_path: Path
) -> None:
    """32 httpx async streaming clients at once: 0 errors, and each text is what the same seeded
    request gives when it runs alone (continuous batching never mixes rows), with the rows split over
    two engines (--workers 2: two model copies, least-loaded routing) and an fp16 KV cache."""
    s = LiveServer(
        serve_home, tmp_path / "many.log", "--stage", "base", "--max-batch", "32", "--workers", "2",
        "--max-tokens-limit", "8192", "--kv-dtype", "float16",
    )  # fmt: skip
    try:
        url = s.wait_ready()
        health = httpx.get(url + "/health", timeout=10).json()
        assert (health["workers"], health["max_rows"], health["kv_dtype"]) == (2, 32, "float16")
        prompts = [f"the {i} quick brown fox " * (1 + i % 7) for i in range(32)]

        async def one(http: httpx.AsyncClient, i: int) -> str:
            body = {"model": BASE_LABEL, "prompt": prompts[i], "max_tokens": 24, "temperature": 1.0,
                    "top_k": 40, "seed": 1000 + i, "stream": True}
            text = ""
            async with http.stream("POST", url + "/v1/completions", json=body) as res:
                assert res.status_code == 200, await res.aread()
                async for line in res.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["text"] if chunk["choices"] else ""
            return text

        async def solo_then_together() -> tuple[list[str], list[str]]:
            async with httpx.AsyncClient(timeout=120) as http:
                solo = [await one(http, i) for i in range(32)]
                together = await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(32))), 300)
            return solo, list(together)

        solo, together = asyncio.run(solo_then_together())
        assert all(solo) and len(set(solo)) > 16  # real, varied samples
        assert together == solo
        m = _live_metrics(url)
        assert _metric(m, "nanoctl_requests", "_total", endpoint="/v1/completions", status="200") == 64
    finally:
        s.kill()
