"""`nanoctl import nanochat DIR`: nanochat checkpoints and tokenizer into the home (flags from
ImportNanochatOptions). The `import` group holds one command per source."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from nanoctl.cli.common import App, home_of
from nanoctl.cli.options import argument_command

import_app = App(help="Bring models made elsewhere into the home: nanochat checkpoints (nanochat).")

DOC = """Import nanochat checkpoints (base, mid, chatsft, chatrl) and their tokenizer into the home.

DIR is a nanochat base directory (e.g. ~/.cache/nanochat), one of its *_checkpoints/ directories, or one checkpoint directory (model_<step>.pt + meta_<step>.json). Steps land in checkpoints/<stage>/<tag>/ with their origin recorded; chat, serve, eval, sft, rl and export then use them. Re-running changes nothing.

Example: [cyan]nanoctl import nanochat ~/.cache/nanochat --link && nanoctl chat[/]
"""  # one line per paragraph: the help wraps it to the terminal

DIR_ARGUMENT = Annotated[str, typer.Argument(metavar="DIR", help="nanochat base directory or checkpoint directory.")]


def _call(ctx: typer.Context, src: str, opts: Any, json_output: bool) -> None:
    from nanoctl.nanochat_import import import_nanochat

    result = import_nanochat(src, opts, home=home_of(ctx))
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    for c in result["checkpoints"]:
        how = f" ({c['method']})" if c["method"] else ""
        typer.echo(f"{c['status']:>9} {c['stage']}/{c['tag']} step {c['step']} [{c['arch']}]{how} -> {c['directory']}")
    tok = result["tokenizer"]
    typer.echo(f"tokenizer {tok['source']} (home tokenizer: {tok['home']})")
    for note in result["notes"]:
        typer.echo(f"note: {note}")


def register(app: typer.Typer) -> None:
    from nanoctl.nanochat_import import ImportNanochatOptions  # torch-free at import

    import_app.command("nanochat")(argument_command(ImportNanochatOptions, _call, DIR_ARGUMENT, DOC))
    app.add_typer(import_app, name="import", rich_help_panel="Models")
