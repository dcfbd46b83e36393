"""`nanoctl export merge-lora --lora PATH --out-tag TAG`: fold an adapter into a normal checkpoint
(flags from MergeLoraOptions)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from nanoctl.cli.common import home_of
from nanoctl.cli.options import options_command

DOC = """Merge a LoRA adapter into its base model and write the result as a normal checkpoint.

The base is the checkpoint the adapter was trained on unless --stage/--tag/--step/--checkpoint name
another; the merged checkpoint goes to checkpoints/<the adapter's stage>/<out-tag>/ with the base as its
parent and the adapter recorded in its meta, so chat, serve, eval and export hf use it like any other.

Example: [cyan]nanoctl export merge-lora --lora ~/.cache/nanoctl/adapters/sft/d20 --out-tag d20-merged[/]
"""


def register(export_app: typer.Typer) -> None:
    from nanoctl.export.lora_merge import MergeLoraOptions  # torch-free at import

    def call(ctx: typer.Context, opts: Any, json_output: bool) -> None:
        from nanoctl.export.lora_merge import merge_lora_checkpoint

        result = merge_lora_checkpoint(opts, home=home_of(ctx))
        if json_output:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            p = result["parent"]
            typer.echo(f"merged {opts.lora} into {p['stage']}/{p['tag']}@{p['step']}: "
                       f"{result['checkpoint_dir']} (step {result['step']})")

    export_app.command("merge-lora")(options_command(MergeLoraOptions, call, None, DOC))
