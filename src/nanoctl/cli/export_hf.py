"""`nanoctl export hf OUTDIR`: a checkpoint as a Hugging Face transformers directory (flags from ExportHFOptions)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from nanoctl.cli.common import home_of
from nanoctl.cli.options import argument_command

DOC = """Export a checkpoint as a Hugging Face transformers directory.

Writes config.json, generation_config.json, model.safetensors, tokenizer.json
and tokenizer_config.json (with a chat template, tool calls included) into
OUTDIR, atomically. The classic arch loads as transformers' own
NanoChatForCausalLM; the current and deepseek archs also get
modeling_nanoctl.py and configuration_nanoctl.py: load them with
[cyan]trust_remote_code=True[/].

Example: [cyan]nanoctl export hf ./d20-hf --stage sft --dtype bf16[/]
"""


OUTDIR_ARGUMENT = Annotated[
    str, typer.Argument(metavar="OUTDIR", help="Directory to write (must not exist unless --force).")
]


def _call(ctx: typer.Context, outdir: str, opts: Any, json_output: bool) -> None:
    from nanoctl.export.hf_export import export_hf

    result = export_hf(outdir, opts, home=home_of(ctx))
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        typer.echo(
            f"exported {result['checkpoint']['stage']}/{result['checkpoint']['tag']} "
            f"step {result['checkpoint']['step']} to {result['outdir']}"
        )


def register(export_app: typer.Typer) -> None:
    from nanoctl.export.hf_export import ExportHFOptions  # torch-free at import

    export_app.command("hf")(argument_command(ExportHFOptions, _call, OUTDIR_ARGUMENT, DOC))
