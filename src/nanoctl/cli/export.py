"""`nanoctl export`: take a model out of nanoctl. One module per target registers its command here."""

from __future__ import annotations

from importlib import import_module

import typer

from nanoctl.cli.common import App

export_app = App(help="Export a checkpoint: a Hugging Face transformers directory (hf), an ONNX Runtime graph (onnx), or a LoRA adapter merged into a checkpoint (merge-lora).")

# Each target's command lives in its own module, which defines `register(export_app)`.
TARGET_MODULES = ["export_hf", "export_onnx", "export_merge_lora"]


def register(app: typer.Typer) -> None:
    for name in TARGET_MODULES:
        import_module(f"nanoctl.cli.{name}").register(export_app)
    app.add_typer(export_app, name="export", rich_help_panel="Models")
