"""`nanoctl chat`: sessions and context trimming, one-shot / --json / stdin / --plain via CliRunner,
error messages, and the Textual UI driven with Pilot, all against a tiny trained model."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import nanoctl.cli.chat as cli_chat
from nanoctl.chat import (
    ChatOptions,
    ChatSession,
    StreamDecoder,
    collect,
    load_chat_model,
    run_command,
    run_once,
)
from nanoctl.cli import app
from nanoctl.engine import SamplingParams
from nanoctl.errors import NanoctlError, UsageError
from tiny_chat import (
    CONVERSATIONS,
    random_model,
    save_model,
    single_thread,
    tiny_config,
    tiny_tokenizer,
    trained_chat_model,
)

runner = CliRunner()
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture
def chat_home(home: Path) -> Path:
    save_model(home, trained_chat_model())
    return home


@pytest.fixture
def loaded(chat_home: Path):
    return load_chat_model(ChatOptions(device="cpu"), home=chat_home)


# -- library ---------------------------------------------------------------------------------------------


def test_session_prompt_matches_render_conversation(loaded) -> None:
    from nanoctl.chat import Message

    tok = loaded.tokenizer
    assert collect(ChatSession(loaded, GREEDY).send("hi")) == "hello there"
    session = ChatSession(loaded, GREEDY, system="be brief")
    session.messages = [
        Message("user", "hi", tok.encode("hi")),
        Message("assistant", "hello there", tok.encode("hello there")),
        Message("user", "again", tok.encode("again")),
    ]
    conv = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": ""},
        ]
    }
    assert session.build_prompt().ids == tok.render_for_completion(conv)


def test_tool_reply_streams_readable_text(loaded) -> None:
    session = ChatSession(loaded, GREEDY)
    reply = collect(session.send("what is 2+3?"))
    assert reply == "let me see `2+3` → `5` so 5"
    assert session.last_stats is not None and session.last_stats.finish_reason == "stop"
    # the next prompt carries the exact tool tokens the model produced
    tok = loaded.tokenizer
    assert tok.encode_special("<|output_start|>") in session.messages[-1].tokens


def test_context_overflow_drops_oldest_turns_with_notice(loaded) -> None:
    settings = SamplingParams(temperature=0.0, max_tokens=16)
    session = ChatSession(loaded, settings)
    ctx = loaded.context_len
    budget = ctx - session.reserve()
    for i in range(12):  # far more than 128 tokens of conversation
        collect(session.send(f"message number {i}, hi"))
        assert session.last_stats is not None
        assert session.last_stats.prompt_tokens <= budget
    assert session.context_start > 0
    assert any("left out" in n for n in session.notices)
    # every reply was generated: nothing crashed, the conversation is intact for display
    assert len(session.messages) == 24


def test_context_notice_and_huge_message(loaded) -> None:
    session = ChatSession(loaded, SamplingParams(temperature=0.0, max_tokens=16))
    collect(session.send("hi"))
    collect(session.send("x" * 90))
    collect(session.send("y" * 60))
    assert any("oldest messages to fit the 128-token context" in n for n in session.notices)
    assert session.context_start >= 2 and session.last_stats.dropped_messages >= 2
    session.notices.clear()
    collect(session.send("z " * 400))  # alone longer than the whole context
    assert any("only its end was sent" in n for n in session.notices)


def test_stream_decoder_handles_split_multibyte_characters() -> None:
    tok = tiny_tokenizer()
    text = "héllo wörld 🙂 ok"
    dec = StreamDecoder(tok)
    deltas = [dec.push(t) for t in tok.encode(text)] + [dec.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_regenerate_and_edit(loaded) -> None:
    session = ChatSession(loaded, GREEDY)
    collect(session.send("hi"))
    assert collect(session.regenerate()) == "hello there"
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert collect(session.edit_last("bye")) == "see you soon"
    assert [m.text for m in session.messages] == ["bye", "see you soon"]
    session.new()
    with pytest.raises(UsageError):
        session.regenerate()


def test_slash_commands(loaded) -> None:
    session = ChatSession(loaded)
    assert session.settings == SamplingParams()  # the one set of defaults
    run_command(session, "/temp 0.2")
    run_command(session, "/topk 0")
    assert run_command(session, "/topp 1").message == "top p set to off"
    run_command(session, "/max 7")
    run_command(session, "/system talk like a pirate")
    s = session.settings
    assert isinstance(s, SamplingParams)
    assert (s.temperature, s.top_k, s.top_p, s.max_tokens) == (0.2, 0, None, 7)
    assert session.system == "talk like a pirate"
    assert run_command(session, "/new").action == "new"
    assert "temperature" in run_command(session, "/help").message
    for bad in ("/temp abc", "/temp -1", "/topp 2", "/max 0", "/bogus"):
        with pytest.raises(UsageError):
            run_command(session, bad)
    assert session.settings == s  # a rejected value leaves the old settings


def test_session_hands_its_sampling_params_to_the_engine(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat passes its SamplingParams through; per reply only the seed (+ reply index) and the budget
    (what still fits the context) change."""
    seen: list[SamplingParams] = []
    real = loaded.engine.generate

    def spy(tokens, params=None, **kwargs):
        seen.append(params)
        return real(tokens, params, **kwargs)

    monkeypatch.setattr(loaded.engine, "generate", spy)
    settings = SamplingParams(
        temperature=0.0, top_k=7, top_p=0.9, repetition_penalty=1.1, max_tokens=20, seed=5
    )
    session = ChatSession(loaded, settings)
    collect(session.send("hi"))
    collect(session.regenerate())
    assert seen == [settings, dataclasses.replace(settings, seed=6)]
    long = ChatSession(loaded, SamplingParams(temperature=0.0, max_tokens=None))  # None: up to the context
    assert long.reserve() == loaded.context_len // 2
    collect(long.send("hi"))
    assert seen[-1].max_tokens == loaded.engine.max_new_tokens(long.last_stats.prompt_tokens)


def test_cancel_keeps_partial_reply(loaded) -> None:
    import threading

    session = ChatSession(loaded, GREEDY)
    cancel = threading.Event()
    cancel.set()
    reply = collect(session.send("hi", cancel))
    assert session.last_stats is not None and session.last_stats.finish_reason == "cancelled"
    assert session.last_stats.completion_tokens == 1 and reply == session.messages[-1].text


def test_base_model_runs_in_completion_mode(home: Path) -> None:
    save_model(home, random_model(tiny_config()), stage="base", tag="d2")
    loaded = load_chat_model(ChatOptions(device="cpu"), home=home)
    assert loaded.completion_mode
    text = "the quick brown"
    result = run_once(loaded, text, SamplingParams(temperature=0.0, max_tokens=10))
    assert result.mode == "completion" and result.stats.completion_tokens > 0
    # no chat template: BOS + the text, nothing else
    assert result.stats.prompt_tokens == 1 + len(loaded.tokenizer.encode(text))


# -- CLI -------------------------------------------------------------------------------------------------


def test_cli_prompt_one_shot(chat_home: Path) -> None:
    res = runner.invoke(app, ["chat", "-p", "hi", "--temperature", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "hello there\n"


def test_cli_json(chat_home: Path) -> None:
    res = runner.invoke(app, ["chat", "-p", "what is 2+3?", "--json", "-t", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["reply"] == "let me see `2+3` → `5` so 5"
    assert data["model"] == "sft/d2@100" and data["mode"] == "chat" and data["finish_reason"] == "stop"
    assert data["completion_tokens"] > 5 and data["prompt_tokens"] > 5
    assert data["elapsed_s"] >= data["ttft_s"] > 0 and data["tokens_per_s"] > 0
    assert data["sampling"] == dataclasses.asdict(SamplingParams(temperature=0.0))


def test_cli_chat_defaults_are_sampling_params_defaults() -> None:
    """The chat options' defaults are SamplingParams' field defaults (no hand-copied numbers)."""
    import typer

    command = typer.main.get_command(app).commands["chat"]  # type: ignore[attr-defined]
    options = {p.name: p for p in command.params}
    fields = [f.name for f in dataclasses.fields(SamplingParams)]
    assert set(fields) <= set(options)
    want = SamplingParams()
    for name in fields:
        default = options[name].default
        if name == "top_p":
            assert default == 1.0 and want.top_p is None  # off: 1 on the command line, None in the params
        else:
            assert default == getattr(want, name), name
        assert str(default) not in (options[name].help or ""), name  # Typer shows the default itself
    assert SamplingParams(**{name: options[name].default for name in fields}) == want


def test_cli_reads_stdin_when_piped(chat_home: Path) -> None:
    res = runner.invoke(app, ["chat", "-t", "0", "--json", "--device", "cpu"], input="bye\n")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["reply"] == "see you soon"


def test_cli_plain_repl(chat_home: Path) -> None:
    res = runner.invoke(
        app, ["chat", "--plain", "-t", "0", "--device", "cpu"], input="hi\n/temp 0\nclear\nbye\nquit\n"
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["hello there", "see you soon"]


def test_cli_no_checkpoint(home: Path) -> None:
    res = runner.invoke(app, ["chat", "-p", "hi"])
    assert res.exit_code == 1
    assert "train one with `nanoctl pretrain`" in res.stderr


def test_cli_unknown_stage_tag_step_list_what_exists(chat_home: Path) -> None:
    res = runner.invoke(app, ["chat", "-p", "hi", "--stage", "rl"])
    assert res.exit_code == 1 and "sft/d2" in res.stderr and "nanoctl rl" in res.stderr
    res = runner.invoke(app, ["chat", "-p", "hi", "--tag", "d9", "--stage", "sft"])
    assert res.exit_code == 1 and "d2" in res.stderr
    res = runner.invoke(app, ["chat", "-p", "hi", "--step", "5", "--stage", "sft"])
    assert res.exit_code == 1 and "100" in res.stderr
    res = runner.invoke(app, ["chat", "-p", "hi", "--stage", "pre"])
    assert res.exit_code == 2 and "base, mid, sft, rl" in res.stderr


def test_cli_usage_errors(chat_home: Path) -> None:
    for args in (["-p", "hi", "-t", "-1"], ["-p", "hi", "--top-p", "2"], ["--json", "--plain"], ["-p", "  "]):
        res = runner.invoke(app, ["chat", *args])
        assert res.exit_code == 2, (args, res.output)
    res = runner.invoke(app, ["chat", "--json"], input="")
    assert res.exit_code == 2 and "stdin was empty" in res.stderr


def test_cli_vocab_mismatch(home: Path) -> None:
    from dataclasses import replace

    # A model whose vocab (384) is not the home tokenizer's (320).
    save_model(home, random_model(replace(tiny_config(), vocab_size=384)))
    res = runner.invoke(app, ["chat", "-p", "hi"])
    assert res.exit_code == 1 and "vocab" in res.stderr and "384" in res.stderr


def test_cli_terminal_too_small(chat_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_chat, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(cli_chat, "_stdout_is_tty", lambda: True)
    monkeypatch.setenv("COLUMNS", "30")
    monkeypatch.setenv("LINES", "10")
    res = runner.invoke(app, ["chat"])
    assert res.exit_code == 1 and "terminal is 30x10" in res.stderr and "--plain" in res.stderr
    with pytest.raises(NanoctlError):
        cli_chat.check_terminal(39, 24)
    cli_chat.check_terminal(80, 24)


def test_cli_tui_needs_a_terminal(chat_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_chat, "_stdin_is_tty", lambda: True)
    res = runner.invoke(app, ["chat"])
    assert res.exit_code == 2 and "needs a terminal" in res.stderr


# -- TUI -------------------------------------------------------------------------------------------------


def _texts(app_, role: str) -> list[str]:
    from nanoctl.tui.app import ChatMessage

    return [m.text for m in app_.query(ChatMessage) if m.role == role]


async def _until(pilot, check, timeout: float = 20.0) -> None:
    """Poll the UI until `check()` holds: on a busy machine one pause may not let Textual catch up."""
    import time as _time

    end = _time.monotonic() + timeout
    while not check() and _time.monotonic() < end:
        await pilot.pause(0.05)


async def _send(pilot, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    # the reply is committed when the worker ends; the UI shows it on its next refresh tick
    await _until(pilot, lambda: _texts(pilot.app, "assistant") and pilot.app.session.messages
                 and pilot.app.session.messages[-1].role == "assistant")


@pytest.mark.asyncio
async def test_tui_send_streams_reply_new_chat_clears(loaded) -> None:
    from nanoctl.tui.app import ChatApp

    app_ = ChatApp(loaded, SamplingParams(temperature=0.0, max_tokens=40))
    async with app_.run_test(size=(80, 24)) as pilot:
        await _send(pilot, "hi")
        assert _texts(app_, "user") == ["hi"]
        assert _texts(app_, "assistant") == ["hello there"]
        assert app_.session.messages[-1].text == "hello there"
        status = str(app_.query_one("#status").render())
        assert "sft/d2@100" in status and "tok/s" in status and "ctx" in status
        assert app_.prompt_input.text == ""
        await pilot.press("ctrl+r")  # regenerate: same (greedy) reply, still one per turn
        await app_.workers.wait_for_complete()
        await pilot.pause()
        assert _texts(app_, "assistant") == ["hello there"] and len(app_.session.messages) == 2
        await pilot.press("ctrl+n")
        await _until(pilot, lambda: _texts(app_, "assistant") == [])
        assert _texts(app_, "assistant") == [] and app_.session.messages == []
        await _send(pilot, "what is 2+3?")  # the model was trained on single-turn chats
        assert _texts(app_, "assistant") == ["let me see `2+3` → `5` so 5"]


@pytest.mark.asyncio
async def test_tui_newline_keys_and_slash_commands(loaded) -> None:
    from nanoctl.tui.app import ChatApp, Notice

    app_ = ChatApp(loaded, SamplingParams(temperature=0.0, max_tokens=40))
    async with app_.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert app_.prompt_input.text == "a\nb\nc"
        assert _texts(app_, "user") == []
        app_.prompt_input.clear()
        await _send(pilot, "/temp 0.3")
        assert app_.session.settings.temperature == 0.3
        await _send(pilot, "/topk nope")
        notices = [str(n.render()) for n in app_.query(Notice)]
        assert any("needs a whole number" in n for n in notices)


@pytest.mark.asyncio
async def test_tui_edit_last_message(loaded) -> None:
    from nanoctl.tui.app import ChatApp

    app_ = ChatApp(loaded, SamplingParams(temperature=0.0, max_tokens=40))
    async with app_.run_test(size=(80, 24)) as pilot:
        await _send(pilot, "hi")
        await pilot.press("ctrl+t")
        assert app_.prompt_input.text == "hi"
        app_.prompt_input.clear()
        await _send(pilot, "bye")
        assert _texts(app_, "user") == ["bye"] and _texts(app_, "assistant") == ["see you soon"]


@pytest.mark.asyncio
async def test_tui_escape_stops_generation(home: Path) -> None:
    """A long completion from a slower random base model; Esc cuts it short and says so."""
    from nanoctl.tui.app import ChatApp, Notice

    model = random_model(tiny_config(sequence_len=1024, n_embd=128), seed=1, scale=0.1)
    save_model(home, model, stage="base", tag="d2")
    loaded = load_chat_model(ChatOptions(device="cpu"), home=home)
    app_ = ChatApp(loaded, SamplingParams(temperature=0.0, max_tokens=1000))
    # Pace the real model's stream (10 ms a token, like a bigger model) so the UI goes idle between
    # pushes: otherwise a fast tiny model can finish before the test gets to press Esc.
    send = app_.session.send

    def paced_send(text: str, cancel: object = None):  # type: ignore[no-untyped-def]
        for delta in send(text, cancel):
            time.sleep(0.01)
            yield delta

    app_.session.send = paced_send  # type: ignore[method-assign]
    async with app_.run_test(size=(80, 24)) as pilot:
        await pilot.press("h", "i", "enter")
        # Esc must land while the reply streams: wait until generation has really started.
        for _ in range(400):
            if app_._generating:
                break
            await pilot.pause(0.01)
        assert app_._generating
        await pilot.press("escape")
        await app_.workers.wait_for_complete()
        await pilot.pause()
        stats = app_.session.last_stats
        assert stats is not None and stats.finish_reason == "cancelled"
        assert stats.completion_tokens < 1000
        assert any(str(n.render()) == "stopped" for n in app_.query(Notice))
        assert not app_._generating


@pytest.mark.asyncio
async def test_tui_follows_bottom_unless_scrolled_up(loaded) -> None:
    from nanoctl.tui.app import ChatApp

    app_ = ChatApp(loaded, SamplingParams(temperature=0.0, max_tokens=40))
    async with app_.run_test(size=(80, 24)) as pilot:
        view = app_.chat_view
        for i in range(30):
            app_._notice(f"line {i}")
        await pilot.pause()
        assert view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y
        view.scroll_home(animate=False)  # the user scrolls up to read: the view stops following
        await pilot.pause()
        app_._notice("more")
        await pilot.pause()
        assert view.scroll_y == 0
        await _send(pilot, "hi")  # sending jumps back to the bottom and follows the reply
        assert view.scroll_y == view.max_scroll_y


@pytest.mark.asyncio
async def test_tui_too_small_shows_message(loaded) -> None:
    from nanoctl.tui.app import ChatApp

    app_ = ChatApp(loaded)
    async with app_.run_test(size=(30, 10)) as pilot:
        await pilot.pause()
        assert app_.screen.has_class("too-small")
        assert "Terminal too small" in str(app_.query_one("#too-small").render())
    async with ChatApp(loaded).run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert not pilot.app.screen.has_class("too-small")


def test_conversations_fixture_is_valid() -> None:
    from nanoctl.conversations import validate_conversation

    for i, conv in enumerate(CONVERSATIONS):
        validate_conversation(conv, f"conv {i}")
