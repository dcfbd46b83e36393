"""`nanoctl chat`: talk to a checkpoint in a terminal UI, a plain REPL, or one shot (-p / stdin / --json);
with `--url`, to an OpenAI-compatible server instead (`nanoctl serve`, vLLM, llama.cpp, ...)."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from dataclasses import asdict
from typing import Annotated, Any

import typer

from nanoctl.cli.common import QUANTIZE, JsonOption, QuantizeOption, err, home_of
from nanoctl.engine import SamplingParams  # torch-free at import: the options' defaults come from it
from nanoctl.errors import NanoctlError, UsageError

_SAMPLING = SamplingParams()  # the one set of sampling defaults (nanochat's chat ones)
_TOP_P = 1.0 if _SAMPLING.top_p is None else _SAMPLING.top_p  # off (None) is spelled 1 on the command line
_LOCAL_ONLY = ("stage", "tag", "step", "checkpoint", "lora", "device", "dtype", "quantize")  # options that pick a local model


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def check_terminal(columns: int, lines: int) -> None:
    """The chat UI is laid out for 80x24 and refuses to start in less than MIN_TERMINAL."""
    from nanoctl.chat import MIN_TERMINAL

    min_cols, min_lines = MIN_TERMINAL
    if columns < min_cols or lines < min_lines:
        raise NanoctlError(
            f"terminal is {columns}x{lines}; the chat UI needs at least {min_cols}x{min_lines}",
            "enlarge the window, or use `nanoctl chat --plain` or `-p TEXT`",
        )


def chat(
    ctx: typer.Context,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Answer this one prompt and exit (stdin is read when piped)."),
    ] = None,
    plain: Annotated[
        bool, typer.Option("--plain", help="Line-based REPL without the full-screen UI (reads stdin lines).")
    ] = False,
    json_output: JsonOption = False,
    stage: Annotated[
        str | None,
        typer.Option("--stage", "-i", help="base|mid|sft|rl (default: newest of rl > sft > mid > base)."),
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", "-g", help="Model tag, e.g. d20 (default: largest d<N>).")
    ] = None,
    step: Annotated[
        int | None, typer.Option("--step", "-s", help="Checkpoint step (default: latest).")
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint", help="A checkpoint directory or model_<step>.pt file (overrides --stage/--tag)."
        ),
    ] = None,
    lora: Annotated[
        str | None,
        typer.Option("--lora", help="Mount this LoRA adapter directory (PEFT format; base: the adapter's own"
                     " unless --stage/--tag/--step/--checkpoint)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N|mps.")] = "auto",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="bfloat16|float16|float32 (default: bf16 on CUDA SM80+, else fp32)."),
    ] = None,
    quantize: QuantizeOption = QUANTIZE,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")
    ] = _SAMPLING.temperature,
    top_k: Annotated[
        int | None, typer.Option("--top-k", "-k", help="Sample from the k most likely tokens; 0 = all.")
    ] = _SAMPLING.top_k,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1]; 1 = off.")
    ] = _TOP_P,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", help="> 1 discourages repeating tokens; 1 = off.")
    ] = _SAMPLING.repetition_penalty,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Most tokens per reply.")
    ] = _SAMPLING.max_tokens,
    seed: Annotated[
        int, typer.Option("--seed", help="Sampling seed (each reply uses seed + its index).")
    ] = _SAMPLING.seed,
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="System prompt (merged into the first user message; with --url, a system message).",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Talk to the OpenAI-compatible server at this address (e.g. http://gpu-box:8000) instead "
            "of a local checkpoint.",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="NANOCTL_API_KEY",
            show_envvar=True,
            help="Bearer key the --url server asks for.",
        ),
    ] = None,
) -> None:
    """Chat with a trained model: full-screen UI in a terminal, one-shot with -p or piped stdin.

    Base checkpoints run in completion mode (plain text continuation, no chat template). With --url the same UI, -p and --json talk to a server (`nanoctl serve`, or any OpenAI-compatible one).

    UI keys: Enter send, Ctrl+J newline, Esc stop, Ctrl+N new chat, Ctrl+R regenerate, Ctrl+T edit last, Ctrl+O pick a checkpoint, F1 help. Slash commands (UI and --plain): /temp /topk /topp /max /rep /system /seed /new /regen /edit /help.

    Example: [cyan]nanoctl chat -p "Why is the sky blue?" --temperature 0[/]  ·  [cyan]nanoctl chat --url http://gpu-box:8000[/]
    """
    from nanoctl.chat import ChatOptions

    _check_remote_flags(ctx, url)

    settings = SamplingParams(  # validates: usage errors before the (slow) model load
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        max_tokens=max_tokens,
        seed=seed,
    )
    opts = ChatOptions(
        stage=stage,
        tag=tag,
        step=step,
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        sampling=settings,
        system=system,
        lora=lora,
        quantize=quantize,
    )
    opts.validate()  # usage errors before the (slow) model load
    if json_output and plain:
        raise UsageError("--json and --plain cannot be combined", "use --json with -p TEXT or piped stdin")
    if prompt is None and not plain and not _stdin_is_tty():
        prompt = sys.stdin.read().rstrip("\r\n")  # `echo text |` adds a newline the model never saw
        if not prompt.strip():
            raise UsageError(
                "stdin was empty", "pipe some text, pass -p TEXT, or run in a terminal for the chat UI"
            )
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty", "pass the text to answer, e.g. -p 'hello'")
    if prompt is None and json_output:
        raise UsageError("--json needs a prompt", "pass -p TEXT or pipe the prompt on stdin")
    tui = prompt is None and not plain
    if tui:
        if not _stdout_is_tty():
            raise UsageError(
                "the chat UI needs a terminal on stdout", "use -p TEXT, --json or --plain when piping"
            )
        size = shutil.get_terminal_size()
        check_terminal(size.columns, size.lines)

    if url is not None:
        _remote(url, api_key, prompt, plain, opts, json_output)
        return

    from nanoctl.chat import load_chat_model

    home = home_of(ctx)
    if sys.stderr.isatty() and not json_output:
        err.print("[dim]loading the model…[/]", end="\r")
    loaded = load_chat_model(opts, home=home)
    if prompt is not None:
        _one_shot(loaded, prompt, opts, json_output)
    elif plain:
        _repl(loaded, opts)
    else:
        from nanoctl.tui.app import run_tui

        def loader(ref: Any) -> Any:
            from dataclasses import replace

            from nanoctl.chat import load_chat_model as load

            return load(
                replace(opts, stage=ref.stage, tag=ref.tag, step=ref.step, checkpoint=str(ref.directory), lora=None),
                home=home,
            )

        run_tui(loaded, opts.sampling, opts.system, home=home, loader=loader)


def _check_remote_flags(ctx: typer.Context, url: str | None) -> None:
    """--url talks to a server that picks its own model: the local model options do not apply."""

    def source(name: str) -> str:  # by name: typer may carry its own copy of click's ParameterSource
        found = ctx.get_parameter_source(name)
        return found.name if found is not None else "DEFAULT"

    if url is not None:
        local = [f"--{name}" for name in _LOCAL_ONLY if source(name) in ("COMMANDLINE", "ENVIRONMENT")]
        if local:
            raise UsageError(
                f"--url cannot be combined with {', '.join(local)}",
                "those pick a local checkpoint; the server at --url serves its own model",
            )
    elif source("api_key") == "COMMANDLINE":  # from NANOCTL_API_KEY it is simply unused locally
        raise UsageError(
            "--api-key needs --url", "the key is for a server: --url http://HOST:PORT --api-key KEY"
        )


def _remote(
    url: str, api_key: str | None, prompt: str | None, plain: bool, opts: Any, json_output: bool
) -> None:
    """The one-shot, REPL and UI paths over an OpenAI-compatible server."""
    from nanoctl.remote import connect, normalize_url

    if sys.stderr.isatty() and not json_output:
        err.print(f"[dim]connecting to {normalize_url(url)}…[/]", end="\r")
    with connect(url, api_key) as backend:
        if prompt is not None:
            _one_shot(backend, prompt, opts, json_output)
        elif plain:
            _repl(backend, opts)
        else:
            from nanoctl.tui.app import run_tui

            run_tui(backend, opts.sampling, opts.system)


def _one_shot(loaded: Any, prompt: str, opts: Any, json_output: bool) -> None:
    from nanoctl.chat import run_once

    def echo(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = run_once(loaded, prompt, opts.sampling, opts.system, on_delta=None if json_output else echo)
    if json_output:
        payload = result.to_dict()
        payload["sampling"] = asdict(opts.sampling)
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    for notice in result.notices:
        print(f"note: {notice}", file=sys.stderr)


def _repl(loaded: Any, opts: Any) -> None:
    """Line REPL (nanochat's chat_cli): quit/exit, clear, plus the UI's slash commands."""
    from nanoctl.chat import ChatSession, collect, run_command

    session = ChatSession(loaded, opts.sampling, opts.system)
    backend = session.backend
    interactive = _stdin_is_tty()
    mode = "completion mode" if backend.completion_mode else "chat mode"
    where = f" at {backend.location}" if backend.location else ""
    print(f"{backend.label}{where} ({mode}). /help for commands, /quit or Ctrl+D to leave.", file=sys.stderr)

    def read() -> str | None:
        try:
            return input("> ") if interactive else sys.stdin.readline() or None
        except EOFError:
            return None

    def stream(make: Any) -> None:
        cancel = threading.Event()
        try:
            collect(make(cancel), lambda d: (sys.stdout.write(d), sys.stdout.flush()))
        except KeyboardInterrupt:  # Ctrl+C stops this reply, not the REPL
            cancel.set()
            print("\n[stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        for notice in session.notices:
            print(f"note: {notice}", file=sys.stderr)
        session.notices.clear()

    while True:
        line = read()
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text in ("quit", "exit"):
            return
        if text == "clear":
            text = "/new"
        if text.startswith("/"):
            try:
                result = run_command(session, text)
            except NanoctlError as e:
                print(f"error: {e.message}" + (f" ({e.hint})" if e.hint else ""), file=sys.stderr)
                continue
            if result.action == "quit":
                return
            if result.action == "new":
                session.new()
            elif result.action == "regen":
                try:
                    stream(session.regenerate)
                except NanoctlError as e:
                    print(f"error: {e.message}", file=sys.stderr)
            elif result.action == "edit":
                stream(lambda c, t=result.argument: session.edit_last(t, c))
            if result.message:
                print(result.message, file=sys.stderr)
            continue
        stream(lambda c, t=text: session.send(t, c))


def register(app: typer.Typer) -> None:
    app.command("chat", rich_help_panel="Chat")(chat)
