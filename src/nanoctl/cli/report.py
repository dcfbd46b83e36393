"""`nanoctl report`: the report card across stages (markdown + PNG plots, optional single-file HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanoctl.cli.common import JsonOption, field_default, home_of, out
from nanoctl.report import ReportOptions


def report_cmd(
    ctx: typer.Context,
    html: Annotated[
        bool, typer.Option("--html", help="Also write a single-file report.html (images inlined).")
    ] = field_default(ReportOptions, "html"),
    open_: Annotated[
        bool, typer.Option("--open", help="Open the report in the web browser.")
    ] = field_default(ReportOptions, "open"),
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Markdown path (default: <home>/reports/report.md).", show_default=False
        ),
    ] = field_default(ReportOptions, "output"),
    json_output: JsonOption = False,
) -> None:
    """Assemble the report card: environment, training curves, bpb, CORE, chat tasks per stage, cost.

    Example: [cyan]nanoctl report --html --open[/]
    """
    import json

    from nanoctl.report import generate_report

    result = generate_report(ReportOptions(html=html, open=open_, output=output), home=home_of(ctx))
    if json_output:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(result.markdown_path, soft_wrap=True)
    if result.html_path:
        out.print(result.html_path, soft_wrap=True)


def register(app: typer.Typer) -> None:
    # The root app is a nanoctl App: its command() adds the one-line error guard.
    app.command("report", rich_help_panel="Evaluate")(report_cmd)
