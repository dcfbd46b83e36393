"""Chat, library side: load a checkpoint, keep a conversation, fit it into the context, stream replies.

Used by `nanoctl chat` (TUI, --plain REPL, -p one-shot, --json). The TUI and the REPL share the
session object and the slash commands defined here, so behaviour is the same in both.

One seam, `ChatBackend`: a `ChatSession` owns what every chat has (messages, settings, system prompt,
regenerate / edit, per-reply seeds, stats, the commit of a finished or stopped reply) and asks its
backend only to stream one reply. `LocalBackend` (here) runs a loaded checkpoint through the engine;
`nanoctl.remote.RemoteBackend` talks to an OpenAI-compatible server (`nanoctl chat --url`).

Prompts are built from token segments rather than re-rendered text: assistant replies are kept as the
exact token ids the model produced (tool calls and forced outputs included), so the next turn sees what
the model really said. The layout is `render_conversation`'s: BOS, then `<|user_start|>text<|user_end|>`
and `<|assistant_start|>reply<|assistant_end|>`, a system prompt merged into the first user message.
Base models (stage "base") have no chat template: each message is completed as plain text after BOS.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from nanoctl.engine import SamplingParams
from nanoctl.errors import UsageError
from nanoctl.home import Home
from nanoctl.inference_options import check_quantize, prepare_for_inference, quantize_option

if TYPE_CHECKING:
    from nanoctl.checkpoint import CheckpointRef
    from nanoctl.engine import Engine
    from nanoctl.model.gpt import GPT
    from nanoctl.tokenizer import Tokenizer

CHAT_STAGES = ("base", "mid", "sft", "rl")
MIN_TERMINAL = (40, 12)  # columns, rows the chat UI needs (it is laid out for 80x24)


@dataclass
class ChatOptions:
    """Everything `nanoctl chat` needs to pick and load a model, plus the initial settings."""

    stage: str | None = None  # None: newest of rl > sft > mid > base
    tag: str | None = None
    step: int | None = None
    checkpoint: str | None = None  # a checkpoint directory or model_*.pt file (overrides stage/tag/step)
    device: str = "auto"
    dtype: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)  # /temp, /topk, ... replace it
    system: str | None = None
    quantize: str = quantize_option()  # int8: nanoctl.model.quantize
    lora: str | None = None  # a LoRA adapter directory mounted on the model (default base: its own)

    def validate(self) -> None:
        if self.stage is not None and self.stage not in CHAT_STAGES:
            raise UsageError(
                f"--stage {self.stage!r} is not a stage", f"use one of: {', '.join(CHAT_STAGES)}"
            )
        if self.step is not None and self.step < 0:
            raise UsageError(f"--step {self.step} must be >= 0")
        check_quantize(self.quantize, self.device, self.dtype)
        if self.lora is not None:
            from nanoctl.adapters import check_adapter_path

            check_adapter_path(self.lora)


@dataclass
class LoadedModel:
    """A model ready to chat with, and where it came from."""

    model: GPT
    tokenizer: Tokenizer
    engine: Engine
    meta: dict[str, Any]
    ref: CheckpointRef
    device: str
    dtype: str
    lora: dict[str, Any] | None = None  # the mounted adapter (model.lora.mount_adapter's record)

    @property
    def label(self) -> str:
        if self.lora is None:
            return self.ref.label
        trained = f"{self.lora['stage']}@{self.lora['step']}" if "stage" in self.lora else "peft"
        return f"{self.ref.label}+lora:{trained}"

    @property
    def completion_mode(self) -> bool:
        """Base models never saw the chat template: complete text instead (an adapter is post-training)."""
        return self.ref.stage == "base" and self.lora is None

    @property
    def context_len(self) -> int:
        return int(self.model.config.sequence_len)


def load_chat_model(opts: ChatOptions, *, home: Home | str | os.PathLike[str] | None = None) -> LoadedModel:
    """Resolve and load the checkpoint `opts` names (NanoctlError lists what exists when it is absent).

    An entry point: `home` is resolved here.
    """
    opts.validate()
    home = Home.resolve(home)
    from nanoctl.adapters import resolve_base
    from nanoctl.checkpoint import load_model
    from nanoctl.device import compute_dtype, dtype_name, resolve_device
    from nanoctl.engine import Engine

    device = resolve_device(opts.device)
    dtype = compute_dtype(device, opts.dtype)
    check_quantize(opts.quantize, device, dtype)
    ref = resolve_base(opts.lora, opts.stage, opts.tag, opts.step, opts.checkpoint, home)
    model, tokenizer, meta = load_model(ref, device=device, dtype=dtype, home=home, phase="eval")
    lora = prepare_for_inference(model, opts.lora, opts.quantize)
    return LoadedModel(model, tokenizer, Engine(model, tokenizer), meta, ref, str(device), dtype_name(dtype), lora)


# ----------------------------------------------------------------------------------------------------------
# Streaming text


class StreamDecoder:
    """Token ids -> text deltas, safe across multi-byte characters split over tokens.

    Tool specials are shown as inline code: `2+3` → `5`. Other specials show as nothing.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.special_text = {
            special("<|python_start|>"): "`",
            special("<|python_end|>"): "`",
            special("<|output_start|>"): " → `",
            special("<|output_end|>"): "`",
        }
        for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"):
            self.special_text[special(name)] = ""
        self._pending: list[int] = []
        self._emitted = 0  # characters of decode(_pending) already returned

    def push(self, token: int) -> str:
        if token in self.special_text:
            return self.flush() + self.special_text[token]
        self._pending.append(token)
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta = text[self._emitted :]
        self._pending, self._emitted = [], 0  # a clean boundary: decoding can restart here
        return delta

    def flush(self) -> str:
        if not self._pending:
            return ""
        delta = self.tokenizer.decode(self._pending)[self._emitted :]
        self._pending, self._emitted = [], 0
        return delta


# ----------------------------------------------------------------------------------------------------------
# Conversation state and prompts


@dataclass
class Message:
    role: str  # "user" | "assistant"
    text: str  # what is displayed
    tokens: list[int]  # content tokens (assistant: exactly what the model produced, tool tokens included)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # prompt processing + first token
    elapsed_s: float = 0.0
    finish_reason: str = "stop"  # stop | length | context | cancelled
    dropped_messages: int = 0  # oldest messages left out of this prompt to fit the context

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first (else overall)."""
        decode_time = self.elapsed_s - self.ttft_s
        if self.completion_tokens > 1 and decode_time > 0:
            return (self.completion_tokens - 1) / decode_time
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        return d


@dataclass
class Prompt:
    ids: list[int]
    dropped_messages: int  # messages (user+assistant) left out from the start of the conversation
    truncated: bool  # the newest user message itself was cut (kept its end)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answers: what one-shot results and --json report."""

    model: str  # the label shown in the UI: `sft/d20@700`, or a server's model id
    stage: str | None = None  # None: not a nanoctl checkpoint label (e.g. another server's model)
    tag: str | None = None
    step: int | None = None


class ChatBackend(Protocol):
    """What a `ChatSession` talks to: a model that streams one reply to the session's conversation.

    The session owns the conversation and settings; a backend only turns them into a reply. It may
    keep token ids on messages (`encode`; a remote backend keeps none) and fits the conversation into
    the context itself (a local model) or leaves that to the server (`context_len` None).
    """

    @property
    def label(self) -> str: ...  # shown in the status bar and on replies

    @property
    def location(self) -> str | None: ...  # where it runs, when not in this process (a server URL)

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def completion_mode(self) -> bool: ...  # a base model: every message is a document to complete

    @property
    def context_len(self) -> int | None: ...  # None: unknown here (the server trims its own context)

    def encode(self, text: str) -> list[int]: ...  # content tokens kept on a user Message

    def build_prompt(self, session: ChatSession) -> Any: ...  # what the next reply is asked with

    def context_used(self, session: ChatSession) -> int | None: ...  # for the status bar; None: unknown

    def stream_reply(
        self,
        session: ChatSession,
        params: SamplingParams,
        stats: GenerationStats,
        tokens: list[int],
        cancel: threading.Event | None,
    ) -> Iterator[str]:
        """Yield the text deltas of the reply to the session's last message.

        `params` are the session's settings with this reply's seed. Fill `stats` as the reply streams,
        append the reply's token ids to `tokens` (when the backend has them), and stop soon after
        `cancel` is set (finish_reason "cancelled"). Closing the generator must release the model
        (or the connection). Errors are NanoctlError with a one-line message.
        """
        ...


class LocalBackend:
    """A checkpoint loaded in this process, run through the engine (the `ChatBackend` of `nanoctl chat`).

    Prompts are token segments: BOS, `<|user_start|>text<|user_end|>`,
    `<|assistant_start|>reply<|assistant_end|>`, where a reply is the exact ids the model produced.
    The oldest turns are dropped to leave room for the reply (`ChatSession.reserve`).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        tok = loaded.tokenizer
        self._bos = tok.get_bos_token_id()
        self._user_start = tok.encode_special("<|user_start|>")
        self._user_end = tok.encode_special("<|user_end|>")
        self._assistant_start = tok.encode_special("<|assistant_start|>")
        self._assistant_end = tok.encode_special("<|assistant_end|>")

    @property
    def label(self) -> str:
        return self.loaded.label

    @property
    def location(self) -> str | None:
        return None

    @property
    def identity(self) -> ModelIdentity:
        ref = self.loaded.ref
        return ModelIdentity(self.loaded.label, ref.stage, ref.tag, ref.step)

    @property
    def completion_mode(self) -> bool:
        return self.loaded.completion_mode

    @property
    def context_len(self) -> int:
        return self.loaded.context_len

    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    # -- prompts -----------------------------------------------------------------------------------------

    def _user_tokens(self, session: ChatSession, text: str, first: bool) -> list[int]:
        if first and session.system:
            text = f"{session.system}\n\n{text}"  # as render_conversation merges a system message
        return self.loaded.tokenizer.encode(text)

    def _render(self, session: ChatSession, messages: list[Message], open_reply: bool = True) -> list[int]:
        ids = [self._bos]
        for i, m in enumerate(messages):
            if m.role == "user":
                ids += [self._user_start, *self._user_tokens(session, m.text, i == 0), self._user_end]
            else:
                ids += [self._assistant_start, *m.tokens, self._assistant_end]
        if open_reply:
            ids.append(self._assistant_start)
        return ids

    def context_used(self, session: ChatSession) -> int:
        if not session.messages:
            return 0
        if self.completion_mode:
            return len(session.messages[-1].tokens) + 1
        return len(self._render(session, session.messages[session.context_start :], open_reply=False))

    def build_prompt(self, session: ChatSession) -> Prompt:
        """Prompt for the reply to the last (user) message, dropping the oldest turns to fit."""
        ctx = self.context_len
        budget = ctx - session.reserve()
        messages = session.messages
        if self.completion_mode:
            ids = [self._bos, *messages[-1].tokens]
            truncated = len(ids) > budget
            if truncated:
                ids = [self._bos, *ids[len(ids) - budget + 1 :]]
            return Prompt(ids, 0, truncated)
        start = session.context_start
        ids = self._render(session, messages[start:])
        # Drop whole user+assistant pairs from the front (never the message being answered).
        while len(ids) > budget and start + 2 < len(messages):
            start += 2
            ids = self._render(session, messages[start:])
        truncated = False
        if len(ids) > budget:
            # The newest user message alone is too long: keep its end (the question is usually there).
            last = messages[-1]
            overflow = len(ids) - budget
            keep = self._user_tokens(session, last.text, True)[overflow:]
            ids = [self._bos, self._user_start, *keep, self._user_end, self._assistant_start]
            truncated = True
        dropped = start - session.context_start
        if dropped:
            session.notices.append(
                f"context full: left out the {dropped} oldest message{'s' if dropped != 1 else ''} "
                f"to fit the {ctx}-token context"
            )
        if truncated:
            session.notices.append(
                f"your message is longer than the {ctx}-token context; only its end was sent"
            )
        session.context_start = start
        return Prompt(ids, dropped, truncated)

    # -- replies -----------------------------------------------------------------------------------------

    def stream_reply(
        self,
        session: ChatSession,
        params: SamplingParams,
        stats: GenerationStats,
        tokens: list[int],
        cancel: threading.Event | None,
    ) -> Iterator[str]:
        prompt = self.build_prompt(session)
        stats.prompt_tokens = len(prompt.ids)
        stats.dropped_messages = prompt.dropped_messages
        engine = self.loaded.engine
        decoder = StreamDecoder(self.loaded.tokenizer)
        t0 = time.perf_counter()
        limit = session.reply_limit()
        assert limit is not None  # a local model knows its context
        max_new = min(limit, engine.max_new_tokens(len(prompt.ids)))
        stream = engine.generate(prompt.ids, replace(params, max_tokens=max_new))
        stats.finish_reason = "length" if max_new >= limit else "context"
        try:
            for column, _ in stream:
                token = column[0]
                if not tokens and stats.ttft_s == 0.0:
                    stats.ttft_s = time.perf_counter() - t0
                if token in engine.stop_tokens:
                    stats.finish_reason = "stop"
                    break
                tokens.append(token)
                stats.completion_tokens = len(tokens)
                stats.elapsed_s = time.perf_counter() - t0
                delta = decoder.push(token)
                if delta:
                    yield delta
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
        finally:
            stream.close()
            stats.elapsed_s = time.perf_counter() - t0
        tail = decoder.flush()
        if tail:
            yield tail


def as_backend(model: ChatBackend | LoadedModel) -> ChatBackend:
    """A loaded checkpoint becomes its LocalBackend; a backend is returned as it is."""
    return LocalBackend(model) if isinstance(model, LoadedModel) else model


class ChatSession:
    """One conversation with one model: messages, settings, and streamed replies from its backend.

    `send`, `regenerate` and `edit_last` return generators of text deltas; the reply is committed to
    the conversation when the generator finishes, is closed early, or `cancel` is set (a partial reply
    is kept, as nanochat's CLI does); a reply that failed before producing anything is not (the
    unanswered message is replaced by the next send). `notices` collects user-visible messages (e.g.
    context trimming). `model` is a `ChatBackend` or a `LoadedModel` (run locally).
    """

    def __init__(
        self,
        model: ChatBackend | LoadedModel,
        settings: SamplingParams | None = None,
        system: str | None = None,
    ):
        self.backend = as_backend(model)
        self.settings = settings if settings is not None else SamplingParams()
        self.system = system
        self.messages: list[Message] = []
        self.context_start = 0  # messages before this index no longer fit and are not sent
        self.notices: list[str] = []
        self.last_stats: GenerationStats | None = None
        self.generations = 0  # per-reply seed offset: regenerating gives a different sample

    # -- state -------------------------------------------------------------------------------------------

    @property
    def completion_mode(self) -> bool:
        return self.backend.completion_mode

    def new(self) -> None:
        self.messages.clear()
        self.context_start = 0
        self.last_stats = None

    def context_used(self) -> int | None:
        """Tokens the next prompt would take (for the status bar); None when the backend cannot tell."""
        return self.backend.context_used(self)

    def reply_limit(self) -> int | None:
        """Most tokens per reply: settings.max_tokens, or the context when that is None (None: unknown)."""
        m = self.settings.max_tokens
        return self.backend.context_len if m is None else m

    def reserve(self) -> int:
        """Room kept free for the reply when fitting the prompt (0 where the server fits it)."""
        ctx = self.backend.context_len
        if ctx is None:
            return 0
        limit = self.reply_limit()
        return max(1, min(ctx if limit is None else limit, ctx // 2))

    def build_prompt(self) -> Any:
        """What the reply to the last message is asked with (LocalBackend: a `Prompt` of token ids)."""
        return self.backend.build_prompt(self)

    # -- replies -----------------------------------------------------------------------------------------

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        if not text.strip():
            raise UsageError("empty message")
        if self.completion_mode:
            self.messages.clear()  # base models: every message is its own document
        elif self.messages and self.messages[-1].role == "user":
            self.messages.pop()  # an unanswered message (e.g. failed generation): replace it
        self.messages.append(Message("user", text, self.backend.encode(text)))
        return self._reply(cancel)

    def regenerate(self, cancel: threading.Event | None = None) -> Iterator[str]:
        if not self.messages:
            raise UsageError("nothing to regenerate yet", "send a message first")
        if self.messages[-1].role == "assistant":
            self.messages.pop()
        return self._reply(cancel)

    def edit_last(self, text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Replace the last user message (and its reply) and answer the new text."""
        while self.messages and self.messages[-1].role != "user":
            self.messages.pop()
        if self.messages:
            self.messages.pop()
        self.context_start = min(self.context_start, len(self.messages))
        return self.send(text, cancel)

    def last_user_text(self) -> str | None:
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text
        return None

    def _reply(self, cancel: threading.Event | None) -> Iterator[str]:
        params = replace(self.settings, seed=self.settings.seed + self.generations)
        self.generations += 1  # each reply (and regeneration) draws a different sample
        stats = GenerationStats()
        self.last_stats = stats
        tokens: list[int] = []
        parts: list[str] = []
        failed = False
        stream = self.backend.stream_reply(self, params, stats, tokens, cancel)
        try:
            for delta in stream:
                parts.append(delta)
                yield delta
        except GeneratorExit:
            stats.finish_reason = "cancelled"
            raise
        except BaseException:
            failed = True
            raise
        finally:
            stream.close()
            if parts or tokens or not failed:
                self._commit("".join(parts), tokens)

    def _commit(self, text: str, tokens: list[int]) -> None:
        if self.completion_mode:
            return  # documents are not a conversation: nothing to carry over
        self.messages.append(Message("assistant", text, tokens))


def collect(stream: Iterator[str], on_delta: Callable[[str], None] | None = None) -> str:
    """Drain a reply stream, optionally echoing each delta; returns the whole text."""
    parts = []
    for delta in stream:
        parts.append(delta)
        if on_delta is not None:
            on_delta(delta)
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Slash commands (shared by the TUI and the --plain REPL)

COMMANDS_HELP = """\
/temp X    temperature (0 = greedy)       /topk N   top-k (0 = off)
/topp X    top-p in (0, 1] (1 = off)      /max N    max tokens per reply
/rep X     repetition penalty (1 = off)   /seed N   sampling seed
/system T  system prompt (empty clears)   /new      start a new chat
/regen     regenerate the last reply      /edit T   resend last message as T
/settings  show the current settings      /help     this help
"""


@dataclass
class CommandResult:
    message: str  # what to show the user
    action: str | None = None  # "new" | "regen" | "edit" | "quit" | None
    argument: str = ""


def describe_settings(session: ChatSession) -> str:
    s = session.settings
    parts = [
        f"temperature {s.temperature:g}",
        f"top-k {s.top_k or 'off'}",
        f"top-p {s.top_p if s.top_p is not None else 'off'}",
        f"max tokens {s.max_tokens if s.max_tokens is not None else 'up to the context'}",
        f"repetition penalty {s.repetition_penalty:g}",
        f"seed {s.seed}",
        f"system {session.system!r}" if session.system else "no system prompt",
    ]
    return ", ".join(parts)


def _number(value: str, kind: type, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{name} needs a {'whole ' if kind is int else ''}number, got {value!r}") from None


def run_command(session: ChatSession, line: str) -> CommandResult:
    """Apply a slash command to the session. Raises UsageError with a one-line message when malformed."""
    name, _, arg = line.strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    s = session.settings
    simple = {
        "/temp": ("temperature", float),
        "/temperature": ("temperature", float),
        "/topk": ("top_k", int),
        "/topp": ("top_p", float),
        "/max": ("max_tokens", int),
        "/rep": ("repetition_penalty", float),
        "/seed": ("seed", int),
    }
    if name in simple:
        attr, kind = simple[name]
        if not arg:
            return CommandResult(f"{attr.replace('_', ' ')} is {getattr(s, attr)}")
        value = _number(arg, kind, name)
        session.settings = replace(s, **{attr: value})  # validates; a rejected value keeps the old
        if attr == "seed":
            session.generations = 0
        value = getattr(session.settings, attr)
        return CommandResult(f"{attr.replace('_', ' ')} set to {value if value is not None else 'off'}")
    if name == "/system":
        session.system = arg or None
        return CommandResult(f"system prompt set to {arg!r}" if arg else "system prompt cleared")
    if name in ("/new", "/clear"):
        return CommandResult("new chat", "new")
    if name in ("/regen", "/regenerate", "/retry"):
        return CommandResult("", "regen")
    if name == "/edit":
        if not arg:
            raise UsageError("/edit needs the new text", "e.g. /edit what is 2+2?")
        return CommandResult("", "edit", arg)
    if name in ("/settings", "/set"):
        return CommandResult(describe_settings(session))
    if name in ("/help", "/?"):
        return CommandResult(COMMANDS_HELP)
    if name in ("/quit", "/exit", "/q"):
        return CommandResult("", "quit")
    raise UsageError(f"unknown command {name}", "type /help for the list")


# ----------------------------------------------------------------------------------------------------------
# One-shot


@dataclass
class OneShotResult:
    reply: str
    model: str
    stage: str | None  # None (and tag/step None) when a server's model id is not a checkpoint label
    tag: str | None
    step: int | None
    mode: str  # chat | completion
    stats: GenerationStats
    notices: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "reply": self.reply,
            "model": self.model,
            "stage": self.stage,
            "tag": self.tag,
            "step": self.step,
            "mode": self.mode,
            **self.stats.to_dict(),
            "notices": self.notices,
        }


def run_once(
    model: ChatBackend | LoadedModel,
    prompt: str,
    settings: SamplingParams | None = None,
    system: str | None = None,
    on_delta: Callable[[str], None] | None = None,
) -> OneShotResult:
    """Answer (or, for base models, complete) one prompt, locally or through a server's backend."""
    session = ChatSession(model, settings, system)
    backend = session.backend
    reply = collect(session.send(prompt), on_delta)
    stats = session.last_stats or GenerationStats()
    if not reply.strip() and not backend.completion_mode and stats.completion_tokens == 0:
        session.notices.append("the model ended its reply immediately")
    who = backend.identity
    mode = "completion" if backend.completion_mode else "chat"
    return OneShotResult(reply, who.model, who.stage, who.tag, who.step, mode, stats, session.notices)
