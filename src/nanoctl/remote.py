"""The OpenAI-compatible chat backend: `nanoctl chat --url URL` talks to a server instead of a checkpoint.

`connect(url, api_key)` asks `GET {url}/v1/models` for the model (its first id is the label shown where a
local checkpoint's is) and returns a `RemoteBackend`, the `nanoctl.chat.ChatBackend` that streams each
reply from `POST {url}/v1/chat/completions` (`stream: true`, usage included). The conversation is sent
as role/content messages, the system prompt as a system message; sampling settings are the OpenAI
fields plus `top_k` and `repetition_penalty` as extra body fields (vLLM's and `nanoctl serve`'s names).
The server fits the conversation into its own context, so `context_len` is None here.

Failures are one-line `NanoctlError`s that name the URL: `cannot reach URL: reason` (refused, DNS,
timeout), `URL rejected the API key (401)`, the server's OpenAI error message for other statuses, and an
error event inside the stream. Setting the cancel event shuts the connection down at once, even while
the server has not sent anything yet, so the server sees the disconnect and frees the slot.

The API key is an argument: the CLI resolves `--api-key` / NANOCTL_API_KEY; nothing here reads NANOCTL_*
variables (httpx honours the usual proxy and CA variables, except for a loopback server).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from nanoctl.chat import GenerationStats, ModelIdentity
from nanoctl.errors import NanoctlError, UsageError

if TYPE_CHECKING:
    from nanoctl.chat import ChatSession
    from nanoctl.engine import SamplingParams

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # the most a server may stay silent mid-reply (a queued request waits for a slot)
_LABEL = re.compile(r"^(base|mid|sft|rl)/([^/@\s]+)@(\d+)$")  # nanoctl serve's model ids: sft/d20@700
_CANCEL_POLL_S = 0.05


def normalize_url(url: str) -> str:
    """`gpu-box:8000`, `http://gpu-box:8000/` and `http://gpu-box:8000/v1` all mean `http://gpu-box:8000`."""
    text = url.strip()
    if not text:
        raise UsageError("--url is empty", "e.g. --url http://127.0.0.1:8000")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {url!r} is not an http(s) address", "e.g. --url http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise UsageError(f"--url {url!r} has a bad port", "e.g. --url http://127.0.0.1:8000") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def identity_of(model: str) -> ModelIdentity:
    """A `nanoctl serve` model id names its checkpoint (`sft/d20@700`); other servers' ids name only a model."""
    m = _LABEL.match(model)
    if m is None:
        return ModelIdentity(model)
    return ModelIdentity(model, m.group(1), m.group(2), int(m.group(3)))


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data` of each server-sent event (data lines joined by newlines; comments and other fields
    skipped), per the SSE format: an event ends at a blank line."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:  # a stream cut without its final blank line: still hand over what came
        yield "\n".join(data)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_message(payload: Any) -> str | None:
    """The message of an OpenAI error object (`{"error": {"message": ...}}`), or of FastAPI's `detail`."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and error.get("message"):
        return _one_line(error["message"])
    if isinstance(error, str) and error:
        return _one_line(error)
    detail = payload.get("detail")
    if isinstance(detail, str) and detail:
        return _one_line(detail)
    if detail:
        return _one_line(json.dumps(detail))
    return None


def _reason(exc: BaseException) -> str:
    """`[Errno 111] Connection refused` -> `connection refused`; a timeout says so."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = re.sub(r"\[Errno -?\d+\]\s*", "", str(exc)).strip() or type(exc).__name__
    return _one_line(text[:1].lower() + text[1:])


class _Reply:
    """What one streamed reply has told so far."""

    def __init__(self) -> None:
        self.finish: str | None = None
        self.usage = False  # a usage chunk came: its counts replace the chunk count


class RemoteBackend:
    """A `ChatBackend` over an OpenAI-compatible server (`POST /v1/chat/completions`, streamed)."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        self.url = normalize_url(url)
        self.model = model
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, read=read_timeout),
            follow_redirects=True,
            trust_env=not _is_loopback(self.url),  # proxies/CA settings of the environment, not for loopback
        )
        self._last_usage: int | None = None  # prompt + completion tokens of the last reply (status bar)

    # -- ChatBackend -------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.model or (urlsplit(self.url).netloc or self.url)

    @property
    def location(self) -> str:
        return self.url

    @property
    def identity(self) -> ModelIdentity:
        return identity_of(self.label)

    @property
    def completion_mode(self) -> bool:
        return False  # the chat endpoint: a base-model server answers with its own message

    @property
    def context_len(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return []  # the server tokenizes

    def build_prompt(self, session: ChatSession) -> list[dict[str, str]]:
        """The `messages` of the next request: the system prompt, then every turn (the server trims)."""
        messages = [{"role": "system", "content": session.system}] if session.system else []
        messages += [{"role": m.role, "content": m.text} for m in session.messages]
        return messages

    def context_used(self, session: ChatSession) -> int | None:
        return self._last_usage if session.messages else 0

    def request_body(self, session: ChatSession, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": self.build_prompt(session),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": 1.0 if params.top_p is None else params.top_p,
            "seed": params.seed,
            "top_k": params.top_k or 0,  # 0: off (sent, so the server's default does not apply)
            "repetition_penalty": params.repetition_penalty,
        }
        if self.model:
            body["model"] = self.model
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        return body

    def stream_reply(
        self,
        session: ChatSession,
        params: SamplingParams,
        stats: GenerationStats,
        tokens: list[int],
        cancel: threading.Event | None,
    ) -> Iterator[str]:
        body = self.request_body(session, params)
        self._last_usage = None
        t0 = time.perf_counter()
        reply = _Reply()
        finish: str | None = None
        done = threading.Event()
        try:
            with self._client.stream(
                "POST",
                f"{self.url}/v1/chat/completions",
                json=body,
                headers={"Accept": "text/event-stream"},
            ) as response:
                try:
                    if response.status_code >= 400:
                        response.read()
                        raise self._status_error(response)
                    _abort_on_cancel(response, cancel, done)
                    kind = response.headers.get("content-type", "")
                    if not kind.startswith("text/event-stream"):
                        response.read()  # a server that answers in one piece despite stream: true
                        finish, text = self._whole_reply(response, stats)
                        if text:
                            stats.ttft_s = time.perf_counter() - t0
                            yield text
                        return
                    ended = False
                    for data in iter_sse_data(response.iter_lines()):
                        if data.strip() == "[DONE]":
                            ended = True
                            break
                        for text in self._event(data, reply, stats, t0):
                            yield text
                        finish = reply.finish
                        if cancel is not None and cancel.is_set():
                            break
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                    elif not ended and finish is None:
                        raise NanoctlError(
                            f"{self.url} ended the reply stream early (no finish_reason, no [DONE])"
                        )
                finally:
                    done.set()
        except httpx.HTTPError as e:
            if cancel is not None and cancel.is_set():  # the cut connection is the cancel
                finish = "cancelled"
            else:
                raise self._transport_error(e) from None
        finally:
            stats.elapsed_s = time.perf_counter() - t0
            if finish == "length" and params.max_tokens is None:
                finish = "context"  # no reply limit was asked for: the server ran out of context
            stats.finish_reason = finish or stats.finish_reason
            if stats.prompt_tokens or stats.completion_tokens:
                self._last_usage = stats.prompt_tokens + stats.completion_tokens

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire ----------------------------------------------------------------------------------------

    def _event(self, data: str, reply: _Reply, stats: GenerationStats, t0: float) -> Iterator[str]:
        """One `chat.completion.chunk`: yields its content; records usage and finish_reason."""
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise NanoctlError(f"{self.url} sent a malformed stream event: {_one_line(data, 120)}") from None
        if not isinstance(chunk, dict):
            raise NanoctlError(f"{self.url} sent a malformed stream event: {_one_line(data, 120)}")
        if "error" in chunk:
            message = _error_message(chunk) or "unknown error"
            raise NanoctlError(f"{self.url} failed mid-reply: {message}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            stats.completion_tokens = int(usage.get("completion_tokens") or 0)
            reply.usage = True
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # one reply is asked for (n=1)
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if content:
                if stats.ttft_s == 0.0:
                    stats.ttft_s = time.perf_counter() - t0
                if not reply.usage:
                    stats.completion_tokens += 1  # chunks until the usage chunk gives the count
                stats.elapsed_s = time.perf_counter() - t0
                yield content
            if choice.get("finish_reason"):
                reply.finish = str(choice["finish_reason"])

    def _whole_reply(self, response: httpx.Response, stats: GenerationStats) -> tuple[str | None, str]:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise NanoctlError(f"{self.url} answered with something that is not a chat completion") from None
        usage = payload.get("usage") or {}
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.completion_tokens = int(usage.get("completion_tokens") or 0)
        return choice.get("finish_reason"), text

    def _status_error(self, response: httpx.Response) -> NanoctlError:
        status = response.status_code
        if status == 401:
            return NanoctlError(
                f"{self.url} rejected the API key (401)", "pass the server's key with --api-key KEY"
            )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        message = _error_message(payload) or _one_line(response.text or response.reason_phrase or "")
        return NanoctlError(f"{self.url} answered {status}: {message or 'no message'}")

    def _transport_error(self, exc: httpx.HTTPError, read_timeout: float | None = None) -> NanoctlError:
        if isinstance(exc, httpx.ReadTimeout):
            silent = self._read_timeout if read_timeout is None else read_timeout
            return NanoctlError(f"{self.url} sent nothing for {silent:g} s; gave up")
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return NanoctlError(f"cannot reach {self.url}: timed out after {self._timeout:g} s")
        if isinstance(exc, httpx.ConnectError):
            return NanoctlError(f"cannot reach {self.url}: {_reason(exc)}")
        return NanoctlError(f"lost the connection to {self.url}: {_reason(exc)}")

    def fetch_model(self) -> str | None:
        """The first model id of `GET /v1/models` (None when the server has no such route)."""
        try:
            response = self._client.get(f"{self.url}/v1/models", timeout=self._timeout)
        except httpx.HTTPError as e:
            raise self._transport_error(e, read_timeout=self._timeout) from None
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise self._status_error(response)
        try:
            data = response.json()["data"]
            return str(data[0]["id"]) if data else None
        except (ValueError, KeyError, IndexError, TypeError):
            raise NanoctlError(f"{self.url}/v1/models is not an OpenAI model list") from None


def connect(
    url: str,
    api_key: str | None = None,
    *,
    timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
) -> RemoteBackend:
    """A backend for the server at `url`, its model named by `GET /v1/models` (fails fast when unreachable)."""
    backend = RemoteBackend(url, api_key=api_key, timeout=timeout, read_timeout=read_timeout)
    try:
        backend.model = backend.fetch_model()
    except BaseException:
        backend.close()
        raise
    return backend


def _abort_on_cancel(response: httpx.Response, cancel: threading.Event | None, done: threading.Event) -> None:
    """Shut the response's socket down as soon as `cancel` is set (until `done`).

    A thread blocked reading a silent server is not woken by closing the socket from another thread
    (Linux), but it is by `shutdown`; the server sees the disconnect at once.
    """
    if cancel is None:
        return
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket):
        return  # not a plain socket (a test transport): cancel is seen between events instead

    def watch() -> None:
        while not done.is_set():
            if cancel.wait(_CANCEL_POLL_S):
                if not done.is_set():
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the base method: TLS sockets too
                return

    threading.Thread(target=watch, name="nanoctl-chat-cancel", daemon=True).start()
