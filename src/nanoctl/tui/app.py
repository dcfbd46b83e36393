"""`nanoctl chat`: a Textual chat app over `nanoctl.chat.ChatSession` (a local checkpoint or, with
`--url`, an OpenAI-compatible server: the session's backend).

Layout (fits 80x24): a scrolling message view anchored to the bottom (it stops following while the
user scrolls up, and follows again once they are back at the bottom), a multi-line input (Enter sends,
Shift+Enter / Ctrl+J insert a newline), a status bar (model, context used, tokens/s, sampling) and the
footer with key bindings. Generation runs in a thread worker that only appends text to a buffer; a UI
timer moves the buffer into the reply ~30 times a second, so the UI never waits on the model and the
model never waits on the UI, and text that arrives just before a pause (a slow server, a tool call) is
shown without waiting for the next token. Esc stops a reply.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.events import Key, Resize
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Markdown, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from nanoctl.chat import COMMANDS_HELP, MIN_TERMINAL, ChatBackend, ChatSession, LoadedModel, run_command
from nanoctl.engine import SamplingParams
from nanoctl.errors import NanoctlError

MIN_WIDTH, MIN_HEIGHT = MIN_TERMINAL
PUSH_INTERVAL_S = 1 / 30  # the streamed text reaches the reply in at most ~30 UI updates per second


class PromptInput(TextArea):
    """TextArea where Enter sends and Shift+Enter / Ctrl+J / Alt+Enter insert a newline."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class ChatMessage(Markdown):
    """One message; assistant replies are appended as they stream (MarkdownStream, no re-parse)."""

    def __init__(self, role: str, text: str = "", title: str = "") -> None:
        super().__init__(text, classes=role)
        self.role = role
        self.text = text
        self.border_title = title
        self._stream: Any = None

    async def append_text(self, fragment: str) -> None:
        self.text += fragment
        if self._stream is None:
            self._stream = Markdown.get_stream(self)
        await self._stream.write(fragment)

    async def finish(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await stream.stop()
            except asyncio.CancelledError:
                # MarkdownStream.stop cancels its task; one cancelled before it ever ran re-raises here
                # (and never rendered its fragments). Only our own cancellation is passed on.
                cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
                if cancelling is not None and cancelling():
                    raise
                await self.update(self.text)
        self.remove_class("generating")


class Notice(Static):
    """A one-line note in the conversation (context trimming, stopped replies, command output)."""


class ModelPicker(ModalScreen[Any]):
    """Pick a checkpoint (stage, tag, step) from the home."""

    BINDINGS = [Binding("escape", "dismiss_none", "Close")]
    AUTO_FOCUS = "OptionList"

    def __init__(self, refs: list[Any], current: str) -> None:
        super().__init__()
        self.refs = refs
        self.current = current

    def compose(self) -> ComposeResult:
        options = [
            Option(
                f"{'● ' if r.label == self.current else '  '}{r.stage:<4} {r.tag:<12} step {r.step}",
                id=str(i),
            )
            for i, r in enumerate(self.refs)
        ]
        with Vertical():
            yield Label("Pick a checkpoint (Enter loads, Esc closes)")
            yield OptionList(*options)

    def on_mount(self) -> None:
        labels = [r.label for r in self.refs]
        if self.current in labels:
            self.query_one(OptionList).highlighted = labels.index(self.current)

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.refs[int(event.option.id or 0)])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ChatApp(App[None]):
    CSS_PATH = "chat.tcss"
    TITLE = "nanoctl chat"
    AUTO_FOCUS = "#prompt"
    ENABLE_COMMAND_PALETTE = False  # its footer entry would push the key hints past 80 columns
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+r", "regenerate", "Regen"),
        Binding("ctrl+t", "edit_last", "Edit"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        loaded: LoadedModel | ChatBackend,
        settings: SamplingParams | None = None,
        system: str | None = None,
        home: str | Path | None = None,
        loader: Callable[[Any], LoadedModel] | None = None,
    ) -> None:
        super().__init__()
        self.session = ChatSession(loaded, settings, system)
        self.home = home
        self._loader = loader  # ref -> LoadedModel (model picker); None disables switching
        self._cancel: threading.Event | None = None
        self._generating = False
        self._editing = False
        self._live_tps: float | None = None
        self._after_generation: list[Callable[[], None]] = []
        self._pending: list[str] = []  # text the worker streamed that the reply does not show yet
        self._pending_lock = threading.Lock()
        self._first_delta_at: float | None = None
        self._push_timer: Any = None

    # -- layout --------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="chat-view")
        yield Static(id="too-small")
        yield PromptInput(
            id="prompt",
            soft_wrap=True,
            show_line_numbers=False,
            compact=True,
            placeholder="Message · Enter sends · Ctrl+J newline · /help",
        )
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#chat-view", VerticalScroll).anchor()
        self._welcome()
        self._check_size(self.size.width, self.size.height)
        self._update_status()

    def on_resize(self, event: Resize) -> None:
        self._check_size(event.size.width, event.size.height)

    def _check_size(self, width: int, height: int) -> None:
        small = width < MIN_WIDTH or height < MIN_HEIGHT
        self.screen.set_class(small, "too-small")
        if small:
            self.query_one("#too-small", Static).update(
                f"Terminal too small ({width}×{height}).\nnanoctl chat needs at least {MIN_WIDTH}×{MIN_HEIGHT}."
            )

    @property
    def chat_view(self) -> VerticalScroll:
        return self.query_one("#chat-view", VerticalScroll)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    def _welcome(self) -> None:
        backend = self.session.backend
        mode = "completion mode: base model, no chat template" if backend.completion_mode else "chat mode"
        where = f" at {backend.location}" if backend.location else ""
        self._notice(f"{backend.label}{where} ({mode}). Enter sends · Ctrl+J newline · /help for commands")

    def _notice(self, text: str, error: bool = False) -> Notice:
        notice = Notice(text, markup=False, classes="error" if error else "")
        self.chat_view.mount(notice)
        return notice

    def _update_status(self) -> None:
        s = self.session
        st = s.settings
        stats = s.last_stats
        tps = self._live_tps if self._live_tps is not None else (stats.tokens_per_s if stats else None)
        used, ctx = s.context_used(), s.backend.context_len  # None: a server that keeps its own count
        parts = [
            s.backend.label,
            f"ctx {'–' if used is None else used}/{'?' if ctx is None else ctx}",
            f"{tps:.1f} tok/s" if tps else "– tok/s",
            f"T {st.temperature:g} k {st.top_k or 'off'} p {st.top_p if st.top_p is not None else 'off'}",
        ]
        if self._generating:
            parts.append("generating… (Esc stops)")
        self.query_one("#status", Static).update(" · ".join(parts))

    # -- input ---------------------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if self._generating:
            self.notify("Still generating; Esc stops it.", severity="warning")
            return
        self.prompt_input.clear()
        if text.startswith("/"):
            self._command(text)
            return
        if self._editing:
            self._editing = False
            self._resend_edited(text)
            return
        self._start(lambda cancel: self.session.send(text, cancel), user_text=text)

    def _command(self, line: str) -> None:
        try:
            result = run_command(self.session, line)
        except NanoctlError as e:
            self._notice(f"{e.message}" + (f" ({e.hint})" if e.hint else ""), error=True)
            return
        if result.action == "new":
            self.action_new_chat()
        elif result.action == "regen":
            self.action_regenerate()
        elif result.action == "edit":
            self._resend_edited(result.argument)
        elif result.action == "quit":
            self.exit()
        elif result.message:
            self._notice(result.message)
        self._update_status()

    # -- generation ----------------------------------------------------------------------------------------

    def _messages(self, role: str | None = None) -> list[ChatMessage]:
        return [m for m in self.chat_view.query(ChatMessage) if role is None or m.role == role]

    def _start(self, make_stream: Callable[[threading.Event], Iterator[str]], user_text: str | None) -> None:
        backend = self.session.backend
        if user_text is not None:
            self.chat_view.mount(ChatMessage("user", user_text, "you"))
        title = f"{backend.label} (completion)" if backend.completion_mode else backend.label
        reply = ChatMessage("assistant", "", title)
        reply.add_class("generating")
        self.chat_view.mount(reply)
        self.chat_view.scroll_end(animate=False)
        self._generating = True
        self._cancel = threading.Event()
        self._live_tps = None
        self._first_delta_at = None
        with self._pending_lock:
            self._pending.clear()
        self._update_status()
        self._push_timer = self.set_interval(PUSH_INTERVAL_S, lambda: self._push_pending(reply))
        self._generate(make_stream, self._cancel, reply)

    async def _push_pending(self, reply: ChatMessage) -> None:
        """Move what the worker streamed into the reply (UI thread; the timer and the end call it)."""
        with self._pending_lock:
            text = "".join(self._pending)
            self._pending.clear()
        if not text:
            return
        await reply.append_text(text)
        stats, first = self.session.last_stats, self._first_delta_at
        now = time.monotonic()
        if self._generating and stats is not None and first is not None and now > first:
            self._live_tps = stats.completion_tokens / max(now - first, 1e-6)
        self._update_status()

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(
        self,
        make_stream: Callable[[threading.Event], Iterator[str]],
        cancel: threading.Event,
        reply: ChatMessage,
    ) -> None:
        error: str | None = None
        try:
            stream = make_stream(cancel)
            try:
                for delta in stream:
                    if self._first_delta_at is None:
                        self._first_delta_at = time.monotonic()
                    with self._pending_lock:
                        self._pending.append(delta)
                    if cancel.is_set():
                        break
            finally:
                stream.close()
        except NanoctlError as e:
            error = e.message + (f" ({e.hint})" if e.hint else "")
        except Exception as e:  # the UI must survive a failed generation
            error = f"generation failed: {type(e).__name__}: {e}"
        self.call_from_thread(self._generation_done, reply, error)

    async def _generation_done(self, reply: ChatMessage, error: str | None) -> None:
        if self._push_timer is not None:
            self._push_timer.stop()
            self._push_timer = None
        await self._push_pending(reply)
        await reply.finish()
        self._generating = False
        self._live_tps = None
        for notice in self.session.notices:
            self._notice(notice)
        self.session.notices.clear()
        stats = self.session.last_stats
        if error:
            self._notice(error, error=True)
        elif stats is not None:
            if stats.finish_reason == "cancelled":
                self._notice("stopped")
            elif stats.finish_reason == "length":
                self._notice(f"reply cut at {self.session.reply_limit()} tokens (/max N to change)")
            elif stats.finish_reason == "context":
                self._notice("reply cut: the context is full (Ctrl+N starts a new chat)")
            if not reply.text and stats.finish_reason == "stop":
                reply.text = "(empty reply)"
                await reply.update("*(empty reply)*")
        self._update_status()
        pending, self._after_generation = self._after_generation, []
        for fn in pending:
            fn()

    def _resend_edited(self, text: str) -> None:
        users = self._messages("user")
        if users:
            last_user = users[-1]
            # Remove the last user message and everything after it from the view.
            children = list(self.chat_view.children)
            for widget in children[children.index(last_user) :]:
                widget.remove()
        self._start(lambda cancel: self.session.edit_last(text, cancel), user_text=text)

    # -- actions -------------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self._editing:
            self._editing = False
            self.prompt_input.clear()
            self.notify("Edit cancelled.")
            return
        if self._generating and self._cancel is not None:
            self._cancel.set()

    def action_new_chat(self) -> None:
        if self._generating:
            self.action_stop()
            self._after_generation.append(self.action_new_chat)
            return
        self.session.new()
        self._editing = False
        self.chat_view.remove_children()
        self._welcome()
        self._update_status()
        self.prompt_input.focus()

    def action_regenerate(self) -> None:
        if self._generating:
            self.notify("Still generating; Esc stops it.", severity="warning")
            return
        if not self.session.messages:
            self.notify("Nothing to regenerate yet.")
            return
        if self.session.messages[-1].role == "assistant" or self.session.completion_mode:
            replies = self._messages("assistant")
            if replies:
                replies[-1].remove()
        self._start(self.session.regenerate, user_text=None)

    def action_edit_last(self) -> None:
        if self._generating:
            self.notify("Still generating; Esc stops it.", severity="warning")
            return
        text = self.session.last_user_text()
        if text is None:
            self.notify("No message to edit yet.")
            return
        self._editing = True
        self.prompt_input.load_text(text)
        self.prompt_input.focus()
        self.notify("Editing your last message: Enter resends, Esc cancels.")

    def action_help(self) -> None:
        self._notice(
            "Keys: Enter send · Ctrl+J/Shift+Enter newline · Esc stop · Ctrl+N new · Ctrl+R regenerate · "
            "Ctrl+T edit last · Ctrl+O model · Ctrl+Q quit\n" + COMMANDS_HELP.rstrip()
        )

    def action_pick_model(self) -> None:
        if self._loader is None:
            where = self.session.backend.location
            self.notify(
                f"The server at {where} picks the model."
                if where
                else "Model switching is not available here."
            )
            return
        if self._generating:
            self.notify("Still generating; Esc stops it.", severity="warning")
            return
        from nanoctl.checkpoint import list_checkpoints

        refs = list_checkpoints(self.home)
        if not refs:
            self.notify("No checkpoints in the home.", severity="warning")
            return
        self.push_screen(ModelPicker(refs, self.session.backend.label), self._model_picked)

    def _model_picked(self, ref: Any) -> None:
        if ref is None or ref.label == self.session.backend.label:
            return
        self._notice(f"loading {ref.label}…")
        self._load_model(ref)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_model(self, ref: Any) -> None:
        assert self._loader is not None
        try:
            loaded = self._loader(ref)
        except Exception as e:
            message = e.message if isinstance(e, NanoctlError) else f"{type(e).__name__}: {e}"
            self.call_from_thread(self._notice, f"could not load {ref.label}: {message}", True)
            return
        self.call_from_thread(self._swap_model, loaded)

    def _swap_model(self, loaded: LoadedModel) -> None:
        self.session = ChatSession(loaded, self.session.settings, self.session.system)
        self.chat_view.remove_children()
        self._welcome()
        self._update_status()


def run_tui(
    loaded: LoadedModel | ChatBackend,
    settings: SamplingParams | None = None,
    system: str | None = None,
    home: str | Path | None = None,
    loader: Callable[[Any], LoadedModel] | None = None,
) -> None:
    ChatApp(loaded, settings, system, home, loader).run()
