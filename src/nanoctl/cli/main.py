"""Root of the `nanoctl` CLI. Command groups live in sibling modules and register here.

Keep this import-light: `nanoctl --help` must be instant, so torch, textual etc. are imported inside
the commands that need them (tests/test_cli.py checks torch stays out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanoctl import __version__
from nanoctl.cli.common import App, out
from nanoctl.home import Home

app = App(
    name="nanoctl",
    help=(
        "From raw text to a ChatGPT-like model you can talk to.\n\n"
        "Pipeline: [bold]data[/] → [bold]tok train[/] → [bold]pretrain[/] → mid → sft → rl → eval → chat.\n\n"
        "Every artifact lives under one home (--home, $NANOCTL_HOME, or the user cache dir)."
    ),
    epilog="Example: [cyan]nanoctl tok train && nanoctl pretrain && nanoctl chat[/]",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"nanoctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="NANOCTL_HOME",
            help="Artifact home (default: the user cache dir, e.g. ~/.cache/nanoctl).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    # Resolved once here; every command reads it with `home_of(ctx)` and passes it down. Nothing is
    # exported: torchrun workers get it in their own environment (dist.relaunch_with_torchrun).
    ctx.obj = Home.resolve(home)


def _register() -> None:
    """Attach each command group. Each module defines `register(app)` and imports nothing heavy."""
    from importlib import import_module

    for name in COMMAND_MODULES:
        import_module(f"nanoctl.cli.{name}").register(app)


# One entry per command module, in the order they appear in --help.
COMMAND_MODULES: list[str] = ["run", "data", "tasks", "tok", "train", "eval", "report", "chat", "serve", "export", "import_nanochat", "cache", "doctor"]

_register()


def run() -> None:
    """Console-script entry point."""
    app()
