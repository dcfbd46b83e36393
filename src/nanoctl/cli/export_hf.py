"""`nanoctl export hf` (placeholder until the command lands)."""

from __future__ import annotations

import typer


def register(export_app: typer.Typer) -> None:
    pass
