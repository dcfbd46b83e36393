"""`nanoctl chat --url`: the OpenAI-compatible client (nanoctl.remote) behind the session, the CLI and the
TUI, against a scripted stand-in server.

The unit under test is our client, so its peer is a small OpenAI-compatible ASGI app written here and
served by uvicorn on 127.0.0.1 (a free port, in a thread). It streams exactly per the OpenAI contract
(one id/created for every chunk, the role in the first delta, finish_reason in the last, a usage chunk
when asked, `data: [DONE]`), records every request it gets (path, headers, JSON body), checks Bearer
auth when given a key, and can be scripted to fail, stall or cut a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from nanoctl.chat import ChatSession, collect, run_command, run_once
from nanoctl.cli import app
from nanoctl.engine import SamplingParams
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.remote import RemoteBackend, connect, identity_of, iter_sse_data, normalize_url

runner = CliRunner()
MODEL = "sft/d2@100"  # nanoctl serve's model ids are checkpoint labels
REPLIES = {"hi": "hello there", "bye": "see you soon", "what is 2+3?": "let me see `2+3` → `5` so 5"}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


# -- the stand-in server ---------------------------------------------------------------------------------


@dataclass
class Stall:
    """Send nothing for `seconds` (noting a client disconnect meanwhile)."""

    seconds: float


@dataclass
class Status:
    """Answer the request with this HTTP status and an OpenAI error object (before any stream)."""

    code: int
    message: str


@dataclass
class ErrorEvent:
    """An error event inside the stream (vLLM's create_streaming_error_response), then the end."""

    message: str


CUT = "cut"  # end the stream here: no finish_reason, no [DONE]

Script = Callable[[dict[str, Any]], list[Any]]


def default_script(body: dict[str, Any]) -> list[Any]:
    """The reply to the last user message, in 3-character pieces; unknown text is echoed."""
    last = body["messages"][-1]["content"]
    text = REPLIES.get(last, f"you said: {last}")
    return [text[i : i + 3] for i in range(0, len(text), 3)]


@dataclass
class StandIn:
    script: Script = default_script
    api_key: str | None = None
    model: str = MODEL
    whole: bool = False  # answer in one JSON body even when asked to stream
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def chats(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/chat/completions"]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = json.loads(raw) if raw else None
        self.requests.append(
            {"method": scope["method"], "path": scope["path"], "headers": headers, "body": body}
        )
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return await self._json(send, 401, _error("Invalid API key", "authentication_error", 401))
        route = (scope["method"], scope["path"])
        if route == ("GET", "/v1/models"):
            models = {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "owned_by": "nanoctl"}],
            }
            return await self._json(send, 200, models)
        if route != ("POST", "/v1/chat/completions"):
            return await self._json(send, 404, _error(f"no route {scope['path']}", "not_found", 404))
        steps = self.script(body)
        if steps and isinstance(steps[0], Status):
            return await self._json(
                send, steps[0].code, _error(steps[0].message, "invalid_request_error", 400)
            )
        if self.whole:
            return await self._json(send, 200, _completion(body, steps))
        await self._stream(body, steps, receive, send)

    async def _json(self, send: Any, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def _stream(self, body: dict[str, Any], steps: list[Any], receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        ident, created = f"chatcmpl-{len(self.requests)}", int(time.time())

        async def event(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send(
                {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}
            )

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model,
                    "choices": [choice]}  # fmt: skip

        await event(chunk({"role": "assistant", "content": ""}))
        pieces = 0
        for step in steps:
            if isinstance(step, str) and step == CUT:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if isinstance(step, str):
                pieces += 1
                await event(chunk({"content": step}))
            elif isinstance(step, Stall):
                with contextlib.suppress(asyncio.TimeoutError):
                    message = await asyncio.wait_for(receive(), step.seconds)
                    if message["type"] == "http.disconnect":
                        self.disconnected.set()
                        return
            elif isinstance(step, ErrorEvent):
                await event(_error(step.message, "internal_error", 500))
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        max_tokens = body.get("max_tokens")
        await event(chunk({}, "length" if max_tokens is not None and pieces >= max_tokens else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = _usage(body, pieces)
            await event({"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model,
                         "choices": [], "usage": usage})  # fmt: skip
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _usage(body: dict[str, Any], pieces: int) -> dict[str, int]:
    prompt = sum(len(m["content"]) for m in body["messages"])  # scripted: a "token" is a character
    return {"prompt_tokens": prompt, "completion_tokens": pieces, "total_tokens": prompt + pieces}


def _completion(body: dict[str, Any], steps: list[Any]) -> dict[str, Any]:
    text = "".join(s for s in steps if isinstance(s, str))
    return {
        "id": "chatcmpl-whole",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": _usage(body, len(steps)),
    }


@contextlib.contextmanager
def serving(stand_in: StandIn) -> Iterator[str]:
    """Serve `stand_in` on 127.0.0.1 (a free port) in a thread; yields its URL."""
    config = uvicorn.Config(
        stand_in, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="stand-in", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stand-in server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def stand_in() -> StandIn:
    return StandIn()


@pytest.fixture
def url(stand_in: StandIn) -> Iterator[str]:
    with serving(stand_in) as address:
        yield address


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


def error_lines(res: Any) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


# -- pieces ----------------------------------------------------------------------------------------------


def test_normalize_url() -> None:
    assert normalize_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert normalize_url("http://gpu-box:8000/") == "http://gpu-box:8000"
    assert normalize_url("https://gpu-box/v1/") == "https://gpu-box"  # an OpenAI base_url works too
    assert normalize_url("http://proxy/llm/v1") == "http://proxy/llm"
    for bad in ("ftp://x", "", "http://", "http://x:notaport"):
        with pytest.raises(UsageError):
            normalize_url(bad)


def test_sse_parsing_follows_the_format() -> None:
    lines = [
        "data: a",
        "",
        ": a comment",
        "event: ping",
        "",
        "data: b",
        "data:c",
        "",
        "id: 7",
        "data: [DONE]",
    ]
    assert list(iter_sse_data(lines)) == ["a", "b\nc", "[DONE]"]


def test_model_ids_that_are_checkpoint_labels_name_stage_tag_step() -> None:
    assert identity_of("sft/d20@700") == identity_of("sft/d20@700")
    who = identity_of("rl/d26@1200")
    assert (who.model, who.stage, who.tag, who.step) == ("rl/d26@1200", "rl", "d26", 1200)
    other = identity_of("meta-llama/Llama-3-8B")
    assert (other.stage, other.tag, other.step) == (None, None, None)


# -- the session over a server ---------------------------------------------------------------------------


def test_session_sends_history_system_prompt_and_every_setting(stand_in: StandIn, url: str) -> None:
    settings = SamplingParams(
        temperature=0.3, top_k=7, top_p=0.9, repetition_penalty=1.1, max_tokens=20, seed=5
    )
    with connect(url) as backend:
        assert backend.label == MODEL and backend.context_len is None
        session = ChatSession(backend, settings, system="be brief")
        assert collect(session.send("hi")) == "hello there"
        assert collect(session.send("bye")) == "see you soon"
    first, second = stand_in.chats()
    assert first["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert second["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
    ]
    assert first["model"] == MODEL and first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    sent = {
        k: first[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_tokens", "seed")
    }
    assert sent == {"temperature": 0.3, "top_k": 7, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 20,
                    "seed": 5}  # fmt: skip
    assert second["seed"] == 6  # seed + the reply's index, as locally
    stats = session.last_stats
    assert stats is not None and stats.finish_reason == "stop"
    assert stats.completion_tokens == 4 and stats.prompt_tokens == len(
        "be briefhihello therebye"
    )  # the usage
    assert stats.elapsed_s >= stats.ttft_s > 0
    assert session.context_used() == stats.prompt_tokens + stats.completion_tokens


def test_settings_off_are_sent_as_off(stand_in: StandIn, url: str) -> None:
    with connect(url) as backend:
        session = ChatSession(backend, SamplingParams(top_k=None, top_p=None, max_tokens=None))
        collect(session.send("hi"))
    (body,) = stand_in.chats()
    assert body["top_k"] == 0 and body["top_p"] == 1.0 and "max_tokens" not in body  # the server's context


def test_regenerate_and_edit_resend_the_right_history(stand_in: StandIn, url: str) -> None:
    with connect(url) as backend:
        session = ChatSession(backend, GREEDY)
        collect(session.send("hi"))
        assert collect(session.regenerate()) == "hello there"
        assert [m.role for m in session.messages] == ["user", "assistant"]
        assert collect(session.edit_last("bye")) == "see you soon"
        assert [m.text for m in session.messages] == ["bye", "see you soon"]
        assert run_command(session, "/temp 0.5").message == "temperature set to 0.5"
        assert collect(session.send("what is 2+3?")) == "let me see `2+3` → `5` so 5"
    sent, regen, edited, third = stand_in.chats()
    assert regen["messages"] == sent["messages"] == [{"role": "user", "content": "hi"}]
    assert regen["seed"] == sent["seed"] + 1  # a regeneration draws a different sample
    assert edited["messages"] == [{"role": "user", "content": "bye"}]
    assert third["temperature"] == 0.5 and [m["content"] for m in third["messages"]] == [
        "bye",
        "see you soon",
        "what is 2+3?",
    ]


def test_bearer_key_is_sent_on_every_request(url: str, stand_in: StandIn) -> None:
    stand_in.api_key = "sekrit"
    with connect(url, api_key="sekrit") as backend:
        assert collect(ChatSession(backend, GREEDY).send("hi")) == "hello there"
    assert [r["path"] for r in stand_in.requests] == ["/v1/models", "/v1/chat/completions"]
    assert all(r["headers"]["authorization"] == "Bearer sekrit" for r in stand_in.requests)
    # the CLI resolves NANOCTL_API_KEY (the library never reads the environment)
    res = runner.invoke(app, ["chat", "--url", url, "-p", "hi"], env={"NANOCTL_API_KEY": "sekrit"})
    assert res.exit_code == 0, res.output
    assert res.stdout == "hello there\n"
    assert stand_in.requests[-1]["headers"]["authorization"] == "Bearer sekrit"


def test_cancel_cuts_a_silent_server_at_once(url: str, stand_in: StandIn) -> None:
    """Esc during a long wait (queue, prefill): the connection is shut at once, the server sees it."""
    stand_in.script = lambda body: ["thinking", Stall(30)]
    cancel = threading.Event()
    with connect(url) as backend:
        session = ChatSession(backend, GREEDY)
        threading.Timer(0.3, cancel.set).start()
        t0 = time.monotonic()
        reply = collect(session.send("hi", cancel))
        took = time.monotonic() - t0
    assert reply == "thinking" and took < 5, took
    assert session.last_stats is not None and session.last_stats.finish_reason == "cancelled"
    assert session.messages[-1].text == "thinking"  # a stopped reply is kept, as locally
    assert stand_in.disconnected.wait(5), "the server never saw the client go"


def test_closing_the_stream_closes_the_response(url: str, stand_in: StandIn) -> None:
    stand_in.script = lambda body: ["thinking", Stall(30)]
    with connect(url) as backend:
        session = ChatSession(backend, GREEDY)
        stream = session.send("hi")
        assert next(stream) == "thinking"
        stream.close()
        assert session.last_stats is not None and session.last_stats.finish_reason == "cancelled"
        assert stand_in.disconnected.wait(5)


def test_length_finish_and_a_server_that_does_not_stream(url: str, stand_in: StandIn) -> None:
    with connect(url) as backend:
        session = ChatSession(backend, SamplingParams(max_tokens=2))
        collect(session.send("hi"))
        assert session.last_stats is not None and session.last_stats.finish_reason == "length"
        stand_in.whole = True
        assert collect(session.send("bye")) == "see you soon"
        assert session.last_stats.completion_tokens == 4


def test_a_server_that_never_answers_times_out_in_one_line() -> None:
    with socket.socket() as listener:  # the kernel accepts the connection; nobody ever reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(NanoctlError) as e:
            connect(address, timeout=0.5)
        assert e.value.message == f"{address} sent nothing for 0.5 s; gave up" and time.monotonic() - t0 < 5


def test_transport_failures_read_as_one_line() -> None:
    backend = RemoteBackend("http://gpu-box:8000")
    try:
        cases = {
            httpx.ConnectError("[Errno -2] Name or service not known"): "cannot reach http://gpu-box:8000: "
            "name or service not known",
            httpx.ConnectTimeout("timed out"): "cannot reach http://gpu-box:8000: timed out after 10 s",
            httpx.RemoteProtocolError(
                "peer closed connection"
            ): "lost the connection to http://gpu-box:8000: peer closed connection",
        }
        for exc, message in cases.items():
            assert backend._transport_error(exc).message == message
    finally:
        backend.close()


def test_errors_are_one_line_naming_the_url(url: str, stand_in: StandIn) -> None:
    with connect(url) as backend:
        session = ChatSession(backend, GREEDY)
        stand_in.script = lambda body: [Status(400, "this is a base model: use /v1/completions")]
        with pytest.raises(NanoctlError) as e:
            collect(session.send("hi"))
        assert e.value.message == f"{url} answered 400: this is a base model: use /v1/completions"
        assert [m.role for m in session.messages] == ["user"]  # nothing came: no empty reply is kept
        stand_in.script = lambda body: ["hel", CUT]
        with pytest.raises(NanoctlError, match="ended the reply stream early"):
            collect(session.send("hi"))
        stand_in.script = default_script
        assert collect(session.send("hi")) == "hello there"  # the session carries on after errors


# -- the CLI ---------------------------------------------------------------------------------------------


def test_cli_prompt_prints_the_reply(url: str, stand_in: StandIn) -> None:
    res = runner.invoke(app, ["chat", "--url", url, "-p", "hi", "-t", "0"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "hello there\n"
    (body,) = stand_in.chats()
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["temperature"] == 0.0
    res = runner.invoke(app, ["chat", "--url", f"{url}/v1/", "-t", "0"], input="bye\n")  # stdin, base_url
    assert res.exit_code == 0 and res.stdout == "see you soon\n", res.output


def test_cli_json_has_the_local_one_shot_keys(url: str, home: Path) -> None:
    from tiny_chat import save_model, single_thread, trained_chat_model

    with single_thread():
        save_model(home, trained_chat_model())
        local = runner.invoke(app, ["chat", "-p", "hi", "--json", "-t", "0", "--device", "cpu"])
    assert local.exit_code == 0, local.output
    res = runner.invoke(app, ["chat", "--url", url, "-p", "hi", "--json", "-t", "0"])
    assert res.exit_code == 0, res.output
    remote = json.loads(res.stdout)
    assert list(remote) == list(json.loads(local.stdout))
    assert remote["reply"] == "hello there" and remote["model"] == MODEL and remote["mode"] == "chat"
    assert (remote["stage"], remote["tag"], remote["step"]) == ("sft", "d2", 100)
    assert (
        remote["finish_reason"] == "stop"
        and remote["completion_tokens"] == 4
        and remote["prompt_tokens"] == 2
    )
    assert remote["elapsed_s"] >= remote["ttft_s"] > 0 and remote["notices"] == []
    assert remote["sampling"] == asdict(SamplingParams(temperature=0.0))


def test_cli_plain_repl_over_a_server(url: str, stand_in: StandIn) -> None:
    res = runner.invoke(
        app, ["chat", "--url", url, "--plain", "-t", "0"], input="hi\n/regen\nclear\nbye\nquit\n"
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["hello there", "hello there", "see you soon"]
    assert f"{MODEL} at {url}" in res.stderr
    assert [len(b["messages"]) for b in stand_in.chats()] == [1, 1, 1]


def test_cli_unreachable_server_is_one_line() -> None:
    address = closed_port_url()
    res = runner.invoke(app, ["chat", "--url", address, "-p", "hi"])
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [f"error: cannot reach {address}: connection refused"]
    assert "Traceback" not in res.output


def test_cli_401_is_one_line_with_a_hint(url: str, stand_in: StandIn) -> None:
    stand_in.api_key = "sekrit"
    for extra in ([], ["--api-key", "wrong"]):
        res = runner.invoke(app, ["chat", "--url", url, "-p", "hi", *extra])
        assert res.exit_code == 1
        assert error_lines(res) == [f"error: {url} rejected the API key (401)"]
        assert res.stderr.splitlines()[1:] == ["hint: pass the server's key with --api-key KEY"]
        assert "Traceback" not in res.output


def test_cli_error_event_in_the_stream_is_one_line(url: str, stand_in: StandIn) -> None:
    stand_in.script = lambda body: ["hel", "lo", ErrorEvent("the scheduler stopped\nunexpectedly")]
    res = runner.invoke(app, ["chat", "--url", url, "-p", "hi"])
    assert res.exit_code == 1
    assert res.stdout == "hello"  # what came before the error was shown
    assert res.stderr.splitlines() == [f"error: {url} failed mid-reply: the scheduler stopped unexpectedly"]


def test_cli_url_excludes_the_local_model_options(url: str) -> None:
    res = runner.invoke(
        app, ["chat", "--url", url, "-p", "hi", "--stage", "sft", "--checkpoint", "x", "--dtype", "float32"]
    )
    assert res.exit_code == 2
    assert error_lines(res) == ["error: --url cannot be combined with --stage, --checkpoint, --dtype"]
    for flag in (["--tag", "d2"], ["--step", "3"], ["--device", "cpu"]):
        res = runner.invoke(app, ["chat", "--url", url, "-p", "hi", *flag])
        assert res.exit_code == 2 and flag[0] in res.stderr
    res = runner.invoke(app, ["chat", "-p", "hi", "--api-key", "k"])
    assert res.exit_code == 2 and "--api-key needs --url" in res.stderr


# -- the TUI ---------------------------------------------------------------------------------------------


def _texts(app_: Any, role: str) -> list[str]:
    from nanoctl.tui.app import ChatMessage

    return [m.text for m in app_.query(ChatMessage) if m.role == role]


async def _send(pilot: Any, text: str) -> None:
    """Type, press Enter, and wait until that reply is done (pilot.pause alone guesses "idle" from CPU
    time, which a loaded machine fools)."""
    app_ = pilot.app
    before = app_.session.last_stats
    await pilot.press(*text)
    await pilot.press("enter")
    deadline = time.monotonic() + 30
    while app_.session.last_stats is before or app_._generating:
        assert time.monotonic() < deadline, f"the reply never finished (generating: {app_._generating})"
        await app_.workers.wait_for_complete()
        await pilot.pause(0.01)
    await pilot.pause()


@pytest.mark.asyncio
async def test_tui_talks_to_the_server(url: str, stand_in: StandIn) -> None:
    from nanoctl.tui.app import ChatApp, Notice

    backend = RemoteBackend(url, model=MODEL)
    app_ = ChatApp(backend, GREEDY, system="be brief")
    try:
        async with app_.run_test(size=(80, 24)) as pilot:
            notices = [str(n.render()) for n in app_.query(Notice)]
            assert any(f"{MODEL} at {url}" in n for n in notices)
            status = str(app_.query_one("#status").render())
            assert MODEL in status and "ctx 0/?" in status  # the server keeps its own context
            await _send(pilot, "hi")
            assert _texts(app_, "user") == ["hi"] and _texts(app_, "assistant") == ["hello there"]
            status = str(app_.query_one("#status").render())
            assert "tok/s" in status and "ctx 14/?" in status, status  # the usage: 10 prompt + 4 reply
            await _send(pilot, "bye")
            assert _texts(app_, "assistant") == ["hello there", "see you soon"]
            await pilot.press("ctrl+o")  # the server picks the model: no picker
            await pilot.pause()
            assert not app_.screen.is_modal
    finally:
        backend.close()
    assert [m["content"] for m in stand_in.chats()[-1]["messages"]] == [
        "be brief",
        "hi",
        "hello there",
        "bye",
    ]


@pytest.mark.asyncio
async def test_tui_escape_stops_a_remote_reply(url: str, stand_in: StandIn) -> None:
    from nanoctl.tui.app import ChatApp, Notice

    stand_in.script = lambda body: ["thinking", Stall(30)]
    with connect(url) as backend:
        app_ = ChatApp(backend, GREEDY)
        async with app_.run_test(size=(80, 24)) as pilot:
            await pilot.press("h", "i", "enter")
            for _ in range(500):
                if app_._generating and _texts(app_, "assistant") == ["thinking"]:
                    break
                await pilot.pause(0.01)
            assert _texts(app_, "assistant") == ["thinking"]
            await pilot.press("escape")
            await app_.workers.wait_for_complete()
            await pilot.pause()
            assert any(str(n.render()) == "stopped" for n in app_.query(Notice))
            assert not app_._generating
            assert app_.session.messages[-1].text == "thinking"
        assert stand_in.disconnected.wait(5)


@pytest.mark.asyncio
async def test_tui_reply_finishes_when_its_stream_never_ran() -> None:
    """Text that reaches a reply just before it finishes (a fast server) is still rendered: Textual's
    MarkdownStream.stop re-raises the cancel of a task that never started."""
    from textual.app import App
    from textual.widgets import Markdown

    from nanoctl.tui.app import ChatMessage

    class One(App[None]):
        def compose(self):  # type: ignore[no-untyped-def]
            yield ChatMessage("assistant")

    async with One().run_test() as pilot:
        message = pilot.app.query_one(ChatMessage)
        message.text = "hello there"
        message._stream = Markdown.get_stream(message)  # created, and stopped before it ever runs
        await message.finish()
        assert message.source == "hello there" and message._stream is None


def test_run_once_reports_the_server_model(url: str) -> None:
    with connect(url) as backend:
        result = run_once(backend, "hi", GREEDY)
    assert (result.reply, result.model, result.stage, result.mode) == ("hello there", MODEL, "sft", "chat")


# -- against a real `nanoctl serve` ----------------------------------------------------------------------

SERVE_KEY = "chat-remote-key"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m nanoctl serve` over the tiny trained chat checkpoint, with an API key (test_serve.py's
    LiveServer: --port 0, the URL from its --json events, its own process group, killed by group)."""
    pytest.importorskip("nanoctl.serve.server", reason="nanoctl serve is not built yet")
    from test_serve import LiveServer
    from tiny_chat import save_model, single_thread, trained_chat_model

    home = tmp_path_factory.mktemp("real-serve") / "home"
    home.mkdir()
    with single_thread():
        save_model(home, trained_chat_model(), stage="sft", tag="d2", step=100)
    server = LiveServer(home, home.parent / "serve.log", "--stage", "sft", "--api-key", SERVE_KEY)
    try:
        yield server.wait_ready()
    finally:
        server.kill()


@pytest.mark.slow
def test_against_a_real_nanoctl_serve(real_server: str) -> None:
    url = real_server
    res = runner.invoke(app, ["chat", "--url", url, "--api-key", SERVE_KEY, "-p", "hi", "-t", "0", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["reply"] == "hello there" and data["model"] == MODEL and data["finish_reason"] == "stop"
    assert (data["stage"], data["tag"], data["step"]) == ("sft", "d2", 100)
    assert data["completion_tokens"] == 2 and data["prompt_tokens"] > 2  # the server's usage
    res = runner.invoke(app, ["chat", "--url", url, "-p", "hi"])  # no key
    assert res.exit_code == 1 and error_lines(res) == [f"error: {url} rejected the API key (401)"]
    with connect(url, SERVE_KEY) as backend:
        session = ChatSession(backend, SamplingParams(temperature=0.0, max_tokens=40))
        assert (
            collect(session.send("what is 2+3?")) == "let me see `2+3` → `5` so 5"
        )  # the tool call, as text
        assert collect(session.edit_last("bye")) == "see you soon"
        assert collect(session.regenerate()) == "see you soon"
        collect(session.send("hi"))  # a second turn: the server takes the whole history
        assert session.last_stats is not None and session.last_stats.prompt_tokens > 10
        run_command(session, "/max 100000")  # above the server's limit: its message, one line
        with pytest.raises(NanoctlError, match=f"^{url} answered 400: .*max_tokens"):
            collect(session.send("hi"))
