"""The OpenAI wire protocol of `nanoctl serve`: request parsing into typed objects, limits, response and
error objects. No FastAPI here (pydantic only), so the rules can be tested without a server.

Requests are validated with pydantic in strict mode (a string where a number belongs is a 400, not a
coercion), then checked against the server's `Limits`. Every failure is an `ApiError`, which the app turns
into OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with a matching status.

Fields of `POST /v1/chat/completions`:

- honoured: `model`, `messages` (roles system | developer (= system) | user | assistant; content a string
  or a list of `{"type": "text", "text": ...}` parts; `name` is ignored), `stream`,
  `stream_options.include_usage`, `max_completion_tokens` / `max_tokens`, `temperature`, `top_p`, `n`,
  `stop` (a string or up to 4), `seed`, and the extensions `top_k` and `repetition_penalty`
  (the OpenAI SDK sends them with `extra_body={...}`).
- accepted and ignored, because they ask for nothing this server does differently:
  `user` (any string); `presence_penalty` and `frequency_penalty` equal to 0; `logit_bias` `{}`;
  `logprobs` false; `top_logprobs` 0; `tools` / `functions` `[]`; `tool_choice` / `function_call`
  "none"; `parallel_tool_calls` (meaningless without tools); `response_format` `{"type": "text"}`;
  `modalities` `["text"]`; `store` false; `metadata` `{}`; `service_tier` "auto" | "default"; and null for
  any of these or for `audio`, `prediction`, `web_search_options`, `reasoning_effort`, `verbosity`.
- any other value of those fields is a 400 naming the field (code `unsupported_parameter`), and a field
  not listed at all is a 400 "Unrecognized request argument supplied" (code `unknown_parameter`), as
  OpenAI answers: silently dropping a field the client relies on would give it a different reply than it
  asked for.

`POST /v1/completions` honours `model`, `prompt` (a string, a one-string list, or a list of token ids),
`stream`, `stream_options`, `max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`, `top_k`,
`repetition_penalty`; it accepts and ignores `user`, the zero penalties, an empty `logit_bias`,
`logprobs` null/0, `echo` false, `suffix` null/"" and `best_of` 1.

Defaults are nanoctl's one set of sampling defaults (`SamplingParams`: temperature 0.6, top-k 50,
512 new tokens), except the seed: without `seed` each request draws a fresh one, as OpenAI does, so
asking twice gives two samples. With `seed`, choice i samples with seed + i, so a reply is reproducible.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from nanoctl.engine import SamplingParams
from nanoctl.errors import NanoctlError

# Seeds are torch generator seeds; choice i uses seed + i, so leave room below 2**63 for n choices.
MAX_SEED = 2**63 - 1024

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "unavailable_error",
}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields to answer with."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (nanochat's abuse limits are the defaults)."""

    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_tokens: int = 4096
    max_n: int = 8
    max_stop: int = 4  # as OpenAI
    max_prompt_tokens: int | None = None  # None: the model's context

    def prompt_limit(self, context_len: int) -> int:
        """Most prompt tokens: the context (the engine can still sample one token after a full one)."""
        return context_len if self.max_prompt_tokens is None else min(self.max_prompt_tokens, context_len)


# --------------------------------------------------------------------------------------------------------
# Typed requests


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Generation:
    """What both endpoints ask the scheduler for, after validation (the prompt is rendered later, by the
    model's tokenizer)."""

    kind: Literal["chat", "completion"]
    model: str | None
    params: SamplingParams  # max_tokens always set
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    messages: tuple[ChatMessage, ...] = ()  # chat
    prompt_text: str | None = None  # completion: text ...
    prompt_ids: tuple[int, ...] | None = None  # ... or token ids

    def log_record(self) -> dict[str, Any]:
        """The request side of a --log-conversations line."""
        if self.kind == "chat":
            return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        return {"prompt": self.prompt_text if self.prompt_ids is None else list(self.prompt_ids)}


class _Strict(BaseModel):
    # Strict: "1" is not a number and true is not 1; no inf/nan.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None


class _Part(_Strict):
    type: str
    text: str | None = None


class _Message(_Strict):
    role: str
    content: str | list[_Part] | None = None
    name: str | None = None  # ignored: one model, no personas


class _Common(_Strict):
    model: str | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class _ChatBody(_Common):
    messages: list[_Message]
    max_completion_tokens: int | None = None


class _CompletionBody(_Common):
    prompt: str | list[str] | list[int]


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x and type(v) is type(x) or v is x for x in values)


def _zero(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == []


def _any_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _any_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


# field -> "this value asks for nothing the server does differently" (see the module docstring)
CHAT_IGNORED: dict[str, Callable[[Any], bool]] = {
    "user": _any_str,
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logit_bias": _empty,
    "logprobs": _is(None, False),
    "top_logprobs": _zero,
    "tools": _empty,
    "functions": _empty,
    "tool_choice": _is(None, "none"),
    "function_call": _is(None, "none"),
    "parallel_tool_calls": _any_bool,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "store": _is(None, False),
    "metadata": _empty,
    "service_tier": _is(None, "auto", "default"),
    "audio": _is(None),
    "prediction": _is(None),
    "web_search_options": _is(None),
    "reasoning_effort": _is(None),
    "verbosity": _is(None),
}
COMPLETION_IGNORED: dict[str, Callable[[Any], bool]] = {
    "user": _any_str,
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logit_bias": _empty,
    "logprobs": _zero,
    "echo": _is(None, False),
    "suffix": _is(None, ""),
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
}


def _param(loc: tuple[Any, ...]) -> str | None:
    """("messages", 0, "content", "str") -> "messages[0].content" (pydantic's union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.islower() and part not in _TAGS:
            out += ("." if out else "") + part
        else:
            break  # a union member tag such as 'list[str]' or '_Part': the field itself was named
    return out or None


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"The body is not valid JSON: {first['msg']}", code="invalid_json")
    param = _param(tuple(first["loc"]))
    if first["type"] == "model_type" and param is None:
        return ApiError(400, "The body must be a JSON object", code="invalid_type")
    if first["type"] == "missing":
        return ApiError(
            400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
        )
    if first["type"] == "extra_forbidden":
        return ApiError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    # A union (e.g. stop: str | list[str]) fails once per member: say all of them in one line.
    msgs = list(dict.fromkeys(x["msg"] for x in errors if _param(tuple(x["loc"])) == param))
    return ApiError(
        400, f"Invalid value for '{param}': " + " or ".join(msgs), param=param, code="invalid_type"
    )


def _check_extras(body: BaseModel, ignored: dict[str, Callable[[Any], bool]], prefix: str = "") -> None:
    for name, value in (body.model_extra or {}).items():
        check = ignored.get(name)
        if check is None:
            raise ApiError(
                400, f"Unrecognized request argument supplied: {prefix}{name}", param=prefix + name,
                code="unknown_parameter",
            )  # fmt: skip
        if not check(value):
            raise ApiError(
                400, f"'{prefix}{name}' is not supported by this server (value {_short(value)})",
                param=prefix + name, code="unsupported_parameter",
            )  # fmt: skip


def _short(value: Any, limit: int = 60) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    bad = value <= low if low_open else value < low
    if bad or value > high or not math.isfinite(value):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(
            400, f"'{name}' must be in {interval}, got {value:g}", param=name, code="invalid_value"
        )


def _sampling(
    body: _Common, limits: Limits, max_tokens: int | None, max_tokens_name: str
) -> tuple[SamplingParams, int]:
    default = SamplingParams()
    n = 1 if body.n is None else body.n
    if not 1 <= n <= limits.max_n:
        raise ApiError(
            400, f"'n' must be between 1 and {limits.max_n}, got {n}", param="n", code="invalid_value"
        )
    temperature = default.temperature if body.temperature is None else body.temperature
    _range("temperature", temperature, 0.0, limits.max_temperature)
    top_k = default.top_k if body.top_k is None else body.top_k
    if top_k is not None and not 0 <= top_k <= limits.max_top_k:
        raise ApiError(
            400, f"'top_k' must be between 0 and {limits.max_top_k} (0 = off), got {top_k}", param="top_k",
            code="invalid_value",
        )  # fmt: skip
    if body.top_p is not None:
        _range("top_p", body.top_p, 0.0, 1.0, low_open=True)
    rep = default.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
    _range("repetition_penalty", rep, 0.0, 100.0, low_open=True)
    if max_tokens is None:
        max_tokens = min(default.max_tokens or limits.max_tokens, limits.max_tokens)
    elif not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400, f"'{max_tokens_name}' must be between 1 and {limits.max_tokens}, got {max_tokens}",
            param=max_tokens_name, code="invalid_value",
        )  # fmt: skip
    if body.seed is None:
        seed = secrets.randbelow(2**31)  # OpenAI semantics: no seed, a fresh sample each time
    elif not 0 <= body.seed <= MAX_SEED:
        raise ApiError(400, f"'seed' must be between 0 and {MAX_SEED}", param="seed", code="invalid_value")
    else:
        seed = body.seed
    try:
        params = SamplingParams(
            temperature=temperature, top_k=top_k or None, top_p=body.top_p, repetition_penalty=rep,
            max_tokens=max_tokens, seed=seed,
        )  # fmt: skip
    except NanoctlError as e:  # every range is checked above; this is the engine's own guard
        raise ApiError(400, e.message, code="invalid_value") from None
    return params, n


def _stops(stop: str | list[str] | None, limits: Limits) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > limits.max_stop:
        raise ApiError(
            400, f"'stop' takes at most {limits.max_stop} sequences, got {len(stops)}", param="stop",
            code="invalid_value",
        )  # fmt: skip
    for s in stops:
        if not s:
            raise ApiError(400, "'stop' sequences must not be empty", param="stop", code="invalid_value")
        if len(s) > limits.max_message_chars:
            raise ApiError(400, "'stop' sequence too long", param="stop", code="invalid_value")
    return tuple(dict.fromkeys(stops))


def _validate(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _content(m: _Message, i: int) -> str:
    where = f"messages[{i}].content"
    if m.content is None:
        raise ApiError(
            400, f"'{where}' must be a string or a list of text parts", param=where, code="invalid_type"
        )
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text":
            raise ApiError(
                400, f"'{where}[{j}].type' {part.type!r} is not supported; only 'text' parts are",
                param=f"{where}[{j}].type", code="unsupported_parameter",
            )  # fmt: skip
        if part.text is None:
            raise ApiError(
                400, f"Missing required parameter: '{where}[{j}].text'", param=f"{where}[{j}].text"
            )
        _check_extras(part, {}, f"{where}[{j}].")
        texts.append(part.text)
    return "\n".join(texts)  # as vLLM joins text parts


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_IGNORED: dict[str, Callable[[Any], bool]] = {
    "refusal": _is(None),
    "tool_calls": _empty,
    "function_call": _is(None),
    "audio": _is(None),
}


def parse_chat(body: bytes, limits: Limits) -> Generation:
    """A `/v1/chat/completions` body -> Generation, or ApiError (400) naming the offending field."""
    req: _ChatBody = _validate(_ChatBody, body)
    _check_extras(req, CHAT_IGNORED)
    if not req.messages:
        raise ApiError(
            400, "'messages' must contain at least one message", param="messages", code="invalid_value"
        )
    if len(req.messages) > limits.max_messages:
        raise ApiError(
            400, f"'messages' has {len(req.messages)} messages; at most {limits.max_messages} are allowed",
            param="messages", code="invalid_value",
        )  # fmt: skip
    messages = []
    total = 0
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise ApiError(
                400, f"'messages[{i}].role' {m.role!r} is not supported; use system, user or assistant",
                param=f"messages[{i}].role", code="unsupported_parameter",
            )  # fmt: skip
        _check_extras(m, _MESSAGE_IGNORED, f"messages[{i}].")
        text = _content(m, i)
        if not text and role != "assistant":  # nanochat refused empty content; an empty reply is history
            raise ApiError(
                400, f"'messages[{i}].content' is empty", param=f"messages[{i}].content", code="invalid_value"
            )
        if len(text) > limits.max_message_chars:
            raise ApiError(
                400, f"'messages[{i}].content' has {len(text)} characters; at most {limits.max_message_chars} "
                "are allowed", param=f"messages[{i}].content", code="invalid_value",
            )  # fmt: skip
        total += len(text)
        messages.append(ChatMessage(role, text))  # type: ignore[arg-type]
    if total > limits.max_total_chars:
        raise ApiError(
            400, f"the messages have {total} characters in all; at most {limits.max_total_chars} are allowed",
            param="messages", code="invalid_value",
        )  # fmt: skip
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise ApiError(
            400, "'max_tokens' and 'max_completion_tokens' differ; give one of them", param="max_tokens",
            code="invalid_value",
        )  # fmt: skip
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params, n = _sampling(req, limits, max_tokens, name)
    return Generation(
        "chat", req.model, params, n, _stops(req.stop, limits), bool(req.stream),
        bool(req.stream and req.stream_options and req.stream_options.include_usage), messages=tuple(messages),
    )  # fmt: skip


def parse_completion(body: bytes, limits: Limits) -> Generation:
    """A `/v1/completions` body -> Generation, or ApiError (400)."""
    req: _CompletionBody = _validate(_CompletionBody, body)
    _check_extras(req, COMPLETION_IGNORED)
    prompt = req.prompt
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(
                400, f"'prompt' has {len(prompt)} prompts; this server takes one per request", param="prompt",
                code="invalid_value",
            )  # fmt: skip
        text = prompt[0]  # type: ignore[assignment]
    elif prompt:
        ids = tuple(prompt)  # type: ignore[arg-type]
    else:
        raise ApiError(400, "'prompt' is empty", param="prompt", code="invalid_value")
    size = len(text) if text is not None else len(ids or ())
    if size > limits.max_total_chars:
        raise ApiError(
            400, f"'prompt' has {size} {'characters' if text is not None else 'tokens'}; at most "
            f"{limits.max_total_chars} are allowed", param="prompt", code="invalid_value",
        )  # fmt: skip
    params, n = _sampling(req, limits, req.max_tokens, "max_tokens")
    return Generation(
        "completion", req.model, params, n, _stops(req.stop, limits), bool(req.stream),
        bool(req.stream and req.stream_options and req.stream_options.include_usage), prompt_text=text,
        prompt_ids=ids,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Prompts


def chat_turns(messages: tuple[ChatMessage, ...]) -> list[dict[str, str]]:
    """OpenAI messages -> the strictly alternating user/assistant turns nanochat's template knows.

    Fix-ups, so ordinary client histories render: leading system messages are joined and merged into
    the first user message (as `render_conversation` merges one); consecutive messages of the same role
    are joined with a blank line. Refused (400): a system message after the conversation started, a
    conversation that does not start with a user message (after the system prompt), or one whose last
    message is not from the user (there would be nothing to answer).
    """
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if m.role == "system":
            if turns:
                raise ApiError(
                    400, f"messages[{i}] is a system message after the conversation started; put system "
                    "messages first", param=f"messages[{i}].role", code="invalid_value",
                )  # fmt: skip
            system.append(m.content)
            continue
        if not turns and m.role != "user":
            raise ApiError(
                400, f"messages[{i}] is from the assistant; the conversation must start with a user message",
                param=f"messages[{i}].role", code="invalid_value",
            )  # fmt: skip
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": m.role, "content": m.content})
    if not turns:
        raise ApiError(400, "'messages' has no user message", param="messages", code="invalid_value")
    if turns[-1]["role"] != "user":
        raise ApiError(
            400, "the last message must be from the user", param=f"messages[{len(messages) - 1}].role",
            code="invalid_value",
        )  # fmt: skip
    if system:
        turns[0]["content"] = "\n\n".join(system) + "\n\n" + turns[0]["content"]
    return turns


def render_prompt(gen: Generation, tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of the prompt: the chat template for chat, BOS + the text for completions."""
    if gen.kind == "chat":
        turns = chat_turns(gen.messages)
        return list(
            tokenizer.render_for_completion({"messages": [*turns, {"role": "assistant", "content": ""}]})
        )
    if gen.prompt_ids is not None:
        bad = next((t for t in gen.prompt_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(
                400, f"'prompt' token {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt",
                code="invalid_value",
            )  # fmt: skip
        return list(gen.prompt_ids)
    return [tokenizer.get_bos_token_id(), *tokenizer.encode(gen.prompt_text or "")]


# --------------------------------------------------------------------------------------------------------
# Stop strings


@dataclass
class StopMatcher:
    """Streams text out while holding back what could still become a stop string.

    `push(delta)` returns the text that is safe to send; once a stop string appears, the text before it
    is returned and `stopped` is set (everything after is dropped). Nothing that could be the start of a
    stop string is released early, so a match can never begin inside text already sent.
    """

    stops: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stopped: bool = False

    def push(self, delta: str) -> str:
        if self.stopped or not delta:
            return ""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        # A new match ends in the new text; it may start up to len(stop)-1 characters earlier.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            end = min(found)
            out = self.text[self.sent : end]
            self.text, self.sent, self.stopped = self.text[:end], end, True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# --------------------------------------------------------------------------------------------------------
# Responses


@dataclass
class Ids:
    """The id and creation time every chunk of one response shares."""

    kind: Literal["chat", "completion"]
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(
    ids: Ids, model: str, texts: list[str], reasons: list[str], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The non-streaming response (`chat.completion` or `text_completion`)."""
    if ids.kind == "chat":
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        obj = "chat.completion"
    else:
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        obj = "text_completion"
    return {
        "id": ids.id,
        "object": obj,
        "created": ids.created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_object(
    ids: Ids,
    model: str,
    index: int | None,
    *,
    text: str | None = None,
    role: bool = False,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One streamed chunk. `index=None` is the usage chunk (`choices: []`)."""
    choices: list[dict[str, Any]] = []
    if index is not None:
        if ids.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out: dict[str, Any] = {
        "id": ids.id,
        "object": "chat.completion.chunk" if ids.kind == "chat" else "text_completion",
        "created": ids.created,
        "model": model,
        "choices": choices,
    }
    if with_usage_field or usage_ is not None:
        out["usage"] = usage_  # with include_usage, OpenAI sends "usage": null on the other chunks
    return out
