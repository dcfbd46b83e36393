"""`nanoctl export onnx OUT.onnx`: a checkpoint as an ONNX Runtime decoder graph (flags from ExportOnnxOptions)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from nanoctl.cli.common import home_of
from nanoctl.cli.options import argument_command

DOC = """Export a checkpoint as one ONNX decoder graph with explicit KV-cache inputs and outputs.

Writes OUT (prefill and decode in one graph; current and classic archs,
sliding windows included) and tokenizer.json next to it, after checking the
graph's logits against the model with onnxruntime. --int8 quantizes the
weight matmuls. docs/onnx_generate.py generates from the result with
onnxruntime, tokenizers and numpy alone.

Example: [cyan]nanoctl export onnx ./d20.onnx --stage sft --int8[/]
"""

OUT_ARGUMENT = Annotated[
    str, typer.Argument(metavar="OUT", help="The .onnx file to write (must not exist unless --force).")
]


def _call(ctx: typer.Context, out: str, opts: Any, json_output: bool) -> None:
    from nanoctl.export.onnx_export import export_onnx

    result = export_onnx(out, opts, home=home_of(ctx))
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    ref = result["checkpoint"]
    typer.echo(
        f"exported {ref['stage']}/{ref['tag']} step {ref['step']} ({result['arch']}, "
        f"{'int8' if result['int8'] else 'fp32'}, opset {result['opset']}) to {result['out']}: "
        f"{result['bytes'] / 1e6:.1f} MB with {', '.join(result['files'][1:])}; "
        f"fp32 logits within {result['verify_max_abs_diff']:.1e} of the model"
    )


def register(export_app: typer.Typer) -> None:
    from nanoctl.export.onnx_export import ExportOnnxOptions  # torch-free at import

    export_app.command("onnx")(argument_command(ExportOnnxOptions, _call, OUT_ARGUMENT, DOC))
