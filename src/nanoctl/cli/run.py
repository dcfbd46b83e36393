"""`nanoctl run`: the whole pipeline on the embedded default (or your shards), stage after stage."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer

from nanoctl.cli.common import JsonOption, err, field_default, home_of, out
from nanoctl.pipeline import RunOptions

_run = partial(field_default, RunOptions)  # CLI defaults are the library's


def run_command(
    ctx: typer.Context,
    stages: Annotated[
        list[str] | None,
        typer.Option(
            "--stage",
            "-s",
            help="Run only these stages (repeatable): tok, pretrain, mid, sft, eval, report, chat. Default: all.",
            show_default=False,
        ),
    ] = None,
    vocab_size: Annotated[
        int | None,
        typer.Option(
            help="Tokenizer vocabulary (default: 4096 on CPU for the tiny model, 32768 on CUDA).",
            show_default=False,
        ),
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option(help="Model depth (default: the pretrain device default).", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = "auto",
    prompt: Annotated[str, typer.Option(help="What to ask the finished model.")] = _run("prompt"),
    identity_name: Annotated[
        str, typer.Option(help="The model's name: mid and sft teach it that it is NAME.")
    ] = _run("identity_name"),
    identity_creator: Annotated[
        str, typer.Option(help="Who made it, as the identity conversations say.")
    ] = _run("identity_creator"),
    force: Annotated[bool, typer.Option("--force", help="Redo stages whose output already exists.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Run the pipeline: tok train → pretrain → mid → sft → eval → report → one chat reply.

    Finished stages are kept (each stage skips complete output and resumes partial output), so running
    it again continues where it stopped. With no shards it trains on the embedded public-domain sample;
    on a laptop CPU the whole thing takes a few minutes.

    Example: [cyan]nanoctl run[/]  ·  [cyan]nanoctl run --identity-name Ava[/]  ·  [cyan]nanoctl run -s eval -s chat --prompt "Hi!"[/]
    """
    import json

    from nanoctl.pipeline import PIPELINE_STAGES, RunOptions, run_pipeline

    opts = RunOptions(
        stages=list(stages) if stages else list(PIPELINE_STAGES),
        vocab_size=vocab_size,
        depth=depth,
        device=device,
        force=force,
        prompt=prompt,
        identity_name=identity_name,
        identity_creator=identity_creator,
    )
    result = run_pipeline(opts, say=lambda line: err.print(line, soft_wrap=True), home=home_of(ctx))
    if json_output:
        out.print_json(
            json.dumps(
                {
                    "seconds": result.seconds,
                    "stages": [o.__dict__ for o in result.outcomes],
                    "reply": result.reply,
                    "report": result.report_path,
                }
            )
        )
    else:
        out.print(f"pipeline finished in {result.seconds / 60:.1f} min")
        if result.report_path:
            out.print(f"report: {result.report_path}  ·  talk to it: nanoctl chat")


def register(app: typer.Typer) -> None:
    app.command("run", rich_help_panel="Pipeline")(run_command)
