"""`nanoctl tasks`: the task datasets behind mid/sft/rl/eval (list, ingest, show)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanoctl.cli.common import JsonOption, home_of, out

DataDir = Annotated[
    Path | None,
    typer.Option(
        help="Directory holding task datasets in their original formats (gsm8k/train.jsonl, mmlu/test/*.csv, ...).",
        show_default=False,
    ),
]

def tasks_list_cmd(
    ctx: typer.Context,
    data_dir: DataDir = None,
    json_output: JsonOption = False,
) -> None:
    """List the tasks and whether each split is available locally (no network).

    Example: [cyan]nanoctl tasks list --data-dir ./datasets[/]
    """
    import json

    from nanoctl.tasks.ingest import task_availability

    rows = task_availability(data_dir, home_of(ctx))
    if json_output:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    from rich.table import Table

    table = Table("task", "split", "type", "rows", "source / problem")
    for r in rows:
        table.add_row(
            r.name,
            r.split,
            r.eval_type,
            f"{r.rows:,}" if r.rows is not None else "-",
            r.source or f"[red]missing[/]: {r.error}",
        )
    out.print(table)


def tasks_ingest_cmd(
    ctx: typer.Context,
    source: Annotated[
        Path, typer.Argument(help="Directory holding task datasets (gsm8k/, mmlu/, identity/, words/, ...).")
    ],
    json_output: JsonOption = False,
) -> None:
    """Copy task datasets into <home>/data/tasks/ so mid/sft/rl/eval find them without --data-dir.

    Example: [cyan]nanoctl tasks ingest ./datasets[/]
    """
    import json

    from nanoctl.tasks.ingest import ingest_task_data

    copied = ingest_task_data(source, home_of(ctx))
    if json_output:
        out.print_json(json.dumps([str(p) for p in copied]))
    else:
        out.print(f"copied {len(copied)} file(s) under <home>/data/tasks/")


def tasks_show_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name (see `nanoctl tasks list`).")],
    split: Annotated[
        str | None, typer.Option(help="Split (default: the task's eval split).", show_default=False)
    ] = None,
    index: Annotated[int, typer.Option("--index", "-i", help="First example to show.")] = 0,
    count: Annotated[int, typer.Option("--count", "-n", help="How many examples.")] = 1,
    data_dir: DataDir = None,
    json_output: JsonOption = False,
) -> None:
    """Print examples of a task as conversations (what the model is trained/evaluated on).

    Example: [cyan]nanoctl tasks show GSM8K --split train -n 2 --data-dir ./datasets[/]
    """
    import json

    from nanoctl.tasks import get_task

    task = get_task(name, split=split, data_dir=data_dir, home=home_of(ctx))
    convs = [task[i] for i in range(index, min(len(task), index + count))]
    if json_output:
        out.print_json(json.dumps(convs))
        return
    for i, conv in enumerate(convs, index):
        out.print(f"[bold]--- {task.name} #{i} ({task.eval_type})[/]")
        for m in conv["messages"]:
            content = m["content"]
            if isinstance(content, list):  # tool-call parts, shown the way GSM8K writes them
                content = "".join(
                    p["text"]
                    if p["type"] == "text"
                    else (f"<<{p['text']}=" if p["type"] == "python" else f"{p['text']}>>")
                    for p in content
                )
            out.print(f"{m['role']}: ", style="cyan", end="")
            out.print(content, markup=False, highlight=False, soft_wrap=True)  # data may hold [brackets]


def register(app: typer.Typer) -> None:
    from nanoctl.cli.common import App

    tasks = App(name="tasks", help="Task datasets (GSM8K, MMLU, ARC, ...): list, ingest, show examples.")
    tasks.command("list")(tasks_list_cmd)
    tasks.command("ingest")(tasks_ingest_cmd)
    tasks.command("show")(tasks_show_cmd)
    app.add_typer(tasks, name="tasks", rich_help_panel="Data")
