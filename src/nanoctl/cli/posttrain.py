"""`nanoctl mid`, `nanoctl sft`, `nanoctl rl`: the post-training stages (parse options, call the library)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nanoctl.cli.common import (
    OPTIMIZATION_PANEL,
    OUTPUT_PANEL,
    PRESET_DEFAULT,
    RUNTIME_PANEL,
    CompileOption,
    DeviceOption,
    DtypeOption,
    EmbeddingLrOption,
    JsonOption,
    KeepLastOption,
    MatrixLrOption,
    NnodesOption,
    NodeRankOption,
    NprocOption,
    RdzvOption,
    SaveEveryOption,
    ScalarLrOption,
    ThreadsOption,
    UnembeddingLrOption,
    WandbRunOption,
    out,
)

_S = "Start from"
_D = "Data"
_O = OPTIMIZATION_PANEL
_E = OUTPUT_PANEL
_R = RUNTIME_PANEL
DEV = PRESET_DEFAULT

# Options every post-training stage has, in one place (Typer reads them from each command's signature);
# those pretrain and eval share too live in nanoctl.cli.common.
Source = Annotated[
    str | None,
    typer.Option(
        help="Parent stage: base, mid, sft (default: the stage's natural parent).",
        rich_help_panel=_S,
        show_default=False,
    ),
]
ModelTag = Annotated[
    str | None,
    typer.Option(
        help="Parent checkpoint tag (default: the largest d<N>).", rich_help_panel=_S, show_default=False
    ),
]
ModelStep = Annotated[
    int | None,
    typer.Option(
        help="Parent checkpoint step (default: its latest).", rich_help_panel=_S, show_default=False
    ),
]
Checkpoint = Annotated[
    str | None,
    typer.Option(
        help="Start from this checkpoint directory instead.", rich_help_panel=_S, show_default=False
    ),
]
OutputTag = Annotated[
    str | None,
    typer.Option(
        help="Tag of the checkpoints written (default: the parent's tag).",
        rich_help_panel=_E,
        show_default=False,
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        help="Directory holding task datasets in their original formats (gsm8k/train.jsonl, mmlu/test/*.csv, ...).",
        rich_help_panel=_D,
        show_default=False,
    ),
]
Data = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        help='Conversations JSONL (one {"messages": [...]} or message list per line); repeatable. Replaces the mixture unless --mix.',
        rich_help_panel=_D,
        show_default=False,
    ),
]
Mix = Annotated[
    bool,
    typer.Option(
        "--mix", help="Add --data to the stage's task mixture instead of replacing it.", rich_help_panel=_D
    ),
]
WeightDecay = Annotated[float, typer.Option(help="Muon weight decay.", rich_help_panel=_O)]
Seed = Annotated[int, typer.Option(help="Random seed.", rich_help_panel=_R)]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Require resuming from this stage's latest checkpoint (a partial run resumes anyway).",
        rich_help_panel=_R,
    ),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force", help="Delete this stage's checkpoints of the tag and train again.", rich_help_panel=_R
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the plan (parent, data sources, batch math, steps, launch command) and exit.",
        rich_help_panel=_R,
    ),
]


def _finish(result: Any, json_output: bool, dry_run: bool) -> None:
    import json

    if json_output:
        out.print_json(json.dumps(result.to_dict()))
    elif not dry_run:
        out.print(f"{result.checkpoint_dir} step {result.final_step}", soft_wrap=True)


def _common(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args)
    if "data" in args:
        args["data"] = [str(p) for p in (args["data"] or [])]
    if args.get("data_dir") is not None:
        args["data_dir"] = str(args["data_dir"])
    return args


def mid_cmd(
    data_dir: DataDir = None,
    data: Data = None,
    mix: Mix = False,
    num_iterations: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps; -1 = one epoch over the mixture (CPU preset: 30).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    device_batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Rows per forward pass per process ({DEV}: 32 / 4).", rich_help_panel=_O, show_default=False
        ),
    ] = None,
    total_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Tokens per optimizer step; -1 = one micro-batch per process (default 524288 on CUDA).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            help="Tokens per row (default: the model's context).", rich_help_panel=_O, show_default=False
        ),
    ] = None,
    embedding_lr: EmbeddingLrOption = 0.2,
    unembedding_lr: UnembeddingLrOption = 0.004,
    matrix_lr: MatrixLrOption = 0.02,
    scalar_lr: ScalarLrOption = 0.5,
    weight_decay: WeightDecay = 0.0,
    init_lr_frac: Annotated[
        float, typer.Option(help="Starting LR as a fraction of the LRs above.", rich_help_panel=_O)
    ] = 1.0,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Val bpb every N steps (default 150; CPU preset 15; -1 = end only).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    eval_tokens: Annotated[
        int | None,
        typer.Option(
            help="Val tokens per eval (default 20x524288; -1 = 4 micro-batches).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    source: Source = None,
    model_tag: ModelTag = None,
    model_step: ModelStep = None,
    checkpoint: Checkpoint = None,
    output_tag: OutputTag = None,
    save_every: SaveEveryOption = -1,
    keep_last: KeepLastOption = 0,
    wandb_run: WandbRunOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    seed: Seed = 42,
    threads: ThreadsOption = None,
    compile: CompileOption = "auto",
    resume: Resume = False,
    force: Force = False,
    dry_run: DryRun = False,
    nproc_per_node: NprocOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    rdzv_endpoint: RdzvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Mid-train the base model on conversations (SmolTalk, MMLU aux, GSM8K, identity, spelling).

    Conversations are streamed into full B x T blocks; sources that are not available offline are listed
    and skipped. Ctrl+C saves a checkpoint; rerunning the same command resumes.

    Example: [cyan]nanoctl mid --data-dir ./datasets --dry-run[/]
    """
    args = {k: v for k, v in locals().items() if k != "json_output"}
    from nanoctl.train.mid import MidOptions, mid

    _finish(mid(MidOptions(**_common(args))), json_output, dry_run)


def sft_cmd(
    data_dir: DataDir = None,
    data: Data = None,
    mix: Mix = False,
    num_epochs: Annotated[
        int, typer.Option(help="Passes over the mixture when --num-iterations is -1.", rich_help_panel=_O)
    ] = 1,
    num_iterations: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps; -1 = --num-epochs over the mixture (CPU preset: 30).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    device_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Conversations per forward pass per process (default 4).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    target_examples_per_step: Annotated[
        int | None,
        typer.Option(
            help=f"Conversations per optimizer step ({DEV}: 32 / 8).", rich_help_panel=_O, show_default=False
        ),
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            help="Crop conversations to this many tokens (default: the model's context).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    embedding_lr: EmbeddingLrOption = 0.2,
    unembedding_lr: UnembeddingLrOption = 0.004,
    matrix_lr: MatrixLrOption = 0.02,
    scalar_lr: ScalarLrOption = 0.5,
    weight_decay: WeightDecay = 0.0,
    init_lr_frac: Annotated[
        float | None,
        typer.Option(
            help="Starting LR as a fraction of the LRs above, then linear to 0 (default 0.02; CPU preset 1.0).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Val loss every N steps (default 100; CPU preset 15).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    eval_steps: Annotated[
        int | None,
        typer.Option(
            help="Val batches per eval (default 100; CPU preset 4).", rich_help_panel=_E, show_default=False
        ),
    ] = None,
    eval_metrics_every: Annotated[
        int | None,
        typer.Option(
            help="Multiple-choice accuracy every N steps (default 200; CPU preset 30).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    eval_metrics_max_problems: Annotated[
        int | None,
        typer.Option(
            help="Problems per accuracy eval (default 1024; CPU preset 16).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    metric_task: Annotated[
        list[str] | None,
        typer.Option(
            "--metric-task",
            help="Multiple-choice task for the quick accuracy; repeatable (default: MMLU, ARC-Easy).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    source: Source = None,
    model_tag: ModelTag = None,
    model_step: ModelStep = None,
    checkpoint: Checkpoint = None,
    output_tag: OutputTag = None,
    save_every: SaveEveryOption = -1,
    keep_last: KeepLastOption = 0,
    wandb_run: WandbRunOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    seed: Seed = 42,
    threads: ThreadsOption = None,
    compile: CompileOption = "off",
    resume: Resume = False,
    force: Force = False,
    dry_run: DryRun = False,
    nproc_per_node: NprocOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    rdzv_endpoint: RdzvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Supervised fine-tuning on conversations, loss on the assistant's tokens only.

    Starts from the latest mid checkpoint (else base). Use --data FILE.jsonl for your own conversations.

    Example: [cyan]nanoctl sft --data my_chats.jsonl --mix --data-dir ./datasets[/]
    """
    args = {k: v for k, v in locals().items() if k not in ("json_output", "metric_task")}
    from nanoctl.train.sft import SFTOptions, sft

    opts = SFTOptions(**_common(args))
    if metric_task is not None:
        opts.metric_tasks = list(metric_task)
    _finish(sft(opts), json_output, dry_run)


def rl_cmd(
    task: Annotated[
        str, typer.Option(help="Task with a verifiable reward (GSM8K, SpellingBee, ...).", rich_help_panel=_D)
    ] = "GSM8K",
    data_dir: DataDir = None,
    num_epochs: Annotated[
        int, typer.Option(help="Passes over the task when --num-iterations is -1.", rich_help_panel=_O)
    ] = 1,
    num_iterations: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps; -1 = --num-epochs over the task (CPU preset: 10).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    device_batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Rollouts per generate/forward pass ({DEV}: 8 / 4).", rich_help_panel=_O, show_default=False
        ),
    ] = None,
    examples_per_step: Annotated[
        int | None,
        typer.Option(
            help=f"Questions per step across processes ({DEV}: 16 / 2).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    num_samples: Annotated[
        int | None,
        typer.Option(help=f"Rollouts per question ({DEV}: 16 / 4).", rich_help_panel=_O, show_default=False),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help=f"Tokens per rollout ({DEV}: 256 / 48).", rich_help_panel=_O, show_default=False),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature of the rollouts.", rich_help_panel=_O)
    ] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling of the rollouts.", rich_help_panel=_O)] = 50,
    embedding_lr: EmbeddingLrOption = 0.2,
    unembedding_lr: UnembeddingLrOption = 0.004,
    matrix_lr: MatrixLrOption = 0.02,
    scalar_lr: ScalarLrOption = 0.5,
    weight_decay: WeightDecay = 0.0,
    init_lr_frac: Annotated[
        float,
        typer.Option(
            help="Starting LR as a fraction of the LRs above (then linear to 0).", rich_help_panel=_O
        ),
    ] = 0.05,
    eval_every: Annotated[
        int | None,
        typer.Option(help=f"pass@k every N steps ({DEV}: 60 / 5).", rich_help_panel=_E, show_default=False),
    ] = None,
    eval_examples: Annotated[
        int | None,
        typer.Option(
            help=f"Held-out questions per pass@k eval ({DEV}: 400 / 4).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    source: Source = None,
    model_tag: ModelTag = None,
    model_step: ModelStep = None,
    checkpoint: Checkpoint = None,
    output_tag: OutputTag = None,
    save_every: Annotated[
        int | None,
        typer.Option(
            help="Checkpoint every N steps (default 60 on CUDA, else only at the end).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    keep_last: KeepLastOption = 0,
    wandb_run: WandbRunOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    seed: Seed = 42,
    threads: ThreadsOption = None,
    resume: Resume = False,
    force: Force = False,
    dry_run: DryRun = False,
    nproc_per_node: NprocOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    rdzv_endpoint: RdzvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Reinforcement learning on a verifiable task (nanochat's simplified GRPO / REINFORCE).

    Samples --num-samples answers per question, rewards them with the task's scorer, and pushes up the
    better-than-average ones. Starts from the latest sft checkpoint.

    Example: [cyan]nanoctl rl --task GSM8K --data-dir ./datasets --num-iterations 50[/]
    """
    args = {k: v for k, v in locals().items() if k != "json_output"}
    from nanoctl.train.rl import RLOptions, rl

    _finish(rl(RLOptions(**_common(args))), json_output, dry_run)


# --- `nanoctl tasks`: the datasets behind mid/sft/rl/eval -------------------------------------------------


def tasks_list_cmd(
    data_dir: DataDir = None,
    json_output: JsonOption = False,
) -> None:
    """List the tasks and whether each split is available locally (no network).

    Example: [cyan]nanoctl tasks list --data-dir ./datasets[/]
    """
    import json

    from nanoctl.tasks.ingest import task_availability

    rows = task_availability(data_dir, None)
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

    copied = ingest_task_data(source)
    if json_output:
        out.print_json(json.dumps([str(p) for p in copied]))
    else:
        out.print(f"copied {len(copied)} file(s) under <home>/data/tasks/")


def tasks_show_cmd(
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

    task = get_task(name, split=split, data_dir=data_dir)
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

    app.command("mid", rich_help_panel="Train")(mid_cmd)
    app.command("sft", rich_help_panel="Train")(sft_cmd)
    app.command("rl", rich_help_panel="Train")(rl_cmd)
    tasks = App(name="tasks", help="Task datasets (GSM8K, MMLU, ARC, ...): list, ingest, show examples.")
    tasks.command("list")(tasks_list_cmd)
    tasks.command("ingest")(tasks_ingest_cmd)
    tasks.command("show")(tasks_show_cmd)
    app.add_typer(tasks, name="tasks", rich_help_panel="Data")
