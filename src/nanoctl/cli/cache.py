"""`nanoctl cache`: where the artifact home is and what is in it."""

from __future__ import annotations

from typing import Annotated

import typer

from nanoctl.cli.common import App, JsonOption, home_of, out

cache_app = App(help="Inspect and clean the artifact home (shards, tokenizer, checkpoints, adapters, reports).")


@cache_app.command("path")
def cache_path(ctx: typer.Context) -> None:
    """Print the artifact home directory.

    Example: [cyan]cd "$(nanoctl cache path)"[/]
    """
    out.print(str(home_of(ctx).root), soft_wrap=True)


@cache_app.command("ls")
def cache_ls(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List what the home holds: shards, tokenizer, checkpoints per stage/tag/step, LoRA adapters, reports, with sizes.

    Example: [cyan]nanoctl cache ls --json[/]
    """
    import json

    from nanoctl.cache import list_artifacts, render_table

    home = home_of(ctx)
    entries = list_artifacts(home)
    if json_output:
        out.print_json(json.dumps([e.to_dict() for e in entries]))
    else:
        render_table(entries, out, home)


@cache_app.command("rm")
def cache_rm(
    ctx: typer.Context,
    what: Annotated[
        list[str],
        typer.Argument(
            help="What to remove, as shown by `cache ls`: data, tokenizer, checkpoints, "
            "checkpoints/<stage>, checkpoints/<stage>/<tag>, adapters, adapters/<stage>[/<tag>], reports, eval, "
            "or all."
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove artifacts from the home (asks first unless --yes).

    Example: [cyan]nanoctl cache rm checkpoints/base/d4 --yes[/]
    """
    from nanoctl.cache import remove_artifacts, resolve_targets

    targets = resolve_targets(what, home_of(ctx))
    for t in targets:
        out.print(f"  {t}")
    if not yes and not typer.confirm(f"Remove {len(targets)} path(s)?", default=False):
        raise typer.Exit(1)
    freed = remove_artifacts(targets)
    out.print(f"removed {len(targets)} path(s), freed {freed / 1e6:.1f} MB")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache", rich_help_panel="Artifacts")
