"""`nanoctl export hf OUTDIR`: a checkpoint as a Hugging Face transformers directory (flags from ExportHFOptions)."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Annotated, Any

import typer

from nanoctl.cli.common import home_of
from nanoctl.cli.options import options_command

DOC = """Export a checkpoint as a Hugging Face transformers directory (NanoChatForCausalLM).

Writes config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json
(with a chat template) into OUTDIR, atomically. Classic arch only for now.

Example: [cyan]nanoctl export hf ./d20-hf --stage sft --dtype bf16[/]
"""


def register(export_app: typer.Typer) -> None:
    from nanoctl.export.hf_export import ExportHFOptions  # torch-free at import

    holder: dict[str, str] = {}

    def call(ctx: typer.Context, opts: Any, json_output: bool) -> None:
        from nanoctl.export.hf_export import export_hf

        result = export_hf(holder["outdir"], opts, home=home_of(ctx))
        if json_output:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            typer.echo(
                f"exported {result['checkpoint']['stage']}/{result['checkpoint']['tag']} "
                f"step {result['checkpoint']['step']} to {result['outdir']}"
            )

    inner = options_command(ExportHFOptions, call, None, DOC)
    sig = inspect.signature(inner)
    outdir = inspect.Parameter(
        "outdir",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, typer.Argument(help="Directory to write (must not exist unless --force).")],
    )
    params = list(sig.parameters.values())
    params.insert(1, outdir)

    def command(ctx: typer.Context, outdir: str, **values: Any) -> None:
        holder["outdir"] = outdir
        inner(ctx, **values)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = DOC
    export_app.command("hf")(command)
