"""`nanoctl pretrain`: train a base model from the pretraining shards (nanochat's base_train)."""

from __future__ import annotations

from typing import Annotated

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

_M = "Model"
_H = "Horizon"
_O = OPTIMIZATION_PANEL
_E = OUTPUT_PANEL
_R = RUNTIME_PANEL
DEV = PRESET_DEFAULT


def pretrain_cmd(
    depth: Annotated[
        int | None,
        typer.Option(
            help=f"Layers; width, heads, LR/WD scaling and batch follow from it ({DEV}: 20 / 4).",
            rich_help_panel=_M,
            show_default=False,
        ),
    ] = None,
    aspect_ratio: Annotated[
        int,
        typer.Option(
            help="Width = depth x aspect ratio (rounded up to a multiple of --head-dim).", rich_help_panel=_M
        ),
    ] = 64,
    head_dim: Annotated[
        int | None,
        typer.Option(help=f"Attention head size ({DEV}: 128 / 64).", rich_help_panel=_M, show_default=False),
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            help=f"Context length in tokens ({DEV}: 2048 / 256).", rich_help_panel=_M, show_default=False
        ),
    ] = None,
    window_pattern: Annotated[
        str | None,
        typer.Option(
            help=f"Sliding-window pattern tiled over layers, L=full S=short ({DEV}: SSSL / L).",
            rich_help_panel=_M,
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            help="current (nanochat HEAD) or classic (Oct 2025, = HF NanoChat).", rich_help_panel=_M
        ),
    ] = "current",
    num_iterations: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps; wins over the other horizon flags (CPU preset: 200).",
            rich_help_panel=_H,
            show_default=False,
        ),
    ] = None,
    target_flops: Annotated[
        float, typer.Option(help="Train for this many FLOPs (-1 = off).", rich_help_panel=_H)
    ] = -1.0,
    target_param_data_ratio: Annotated[
        float, typer.Option(help="Tokens per scaling parameter (Chinchilla-style ratio).", rich_help_panel=_H)
    ] = 12.0,
    device_batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Rows per forward pass per process ({DEV}: 32 / 4).", rich_help_panel=_O, show_default=False
        ),
    ] = None,
    total_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Tokens per optimizer step; -1 = auto from the data size (CPU preset: device batch x seq x processes).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    embedding_lr: EmbeddingLrOption = 0.3,
    unembedding_lr: UnembeddingLrOption = 0.008,
    matrix_lr: MatrixLrOption = 0.02,
    scalar_lr: ScalarLrOption = 0.5,
    weight_decay: Annotated[
        float, typer.Option(help="Muon weight decay before batch/horizon scaling.", rich_help_panel=_O)
    ] = 0.28,
    lr_scale: Annotated[
        float | None,
        typer.Option(
            help="Multiplier on every LR (default: nanochat's sqrt(total batch / 2^19); CPU preset 0.5).",
            rich_help_panel=_O,
            show_default=False,
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            help="LR warmup steps (default 40; CPU preset 10).", rich_help_panel=_O, show_default=False
        ),
    ] = None,
    warmdown_ratio: Annotated[
        float, typer.Option(help="Fraction of the run spent decaying the LR.", rich_help_panel=_O)
    ] = 0.65,
    final_lr_frac: Annotated[
        float, typer.Option(help="LR at the end as a fraction of the peak.", rich_help_panel=_O)
    ] = 0.05,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Validation bpb every N steps (default 250; CPU preset 50; -1 = end only).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    eval_tokens: Annotated[
        int | None,
        typer.Option(
            help="Validation tokens per eval (default 80x524288; CPU preset 8192).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    sample_every: Annotated[
        int | None,
        typer.Option(
            help="Greedy samples every N steps (default 2000; -1 = end only).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    core_metric_every: Annotated[
        int | None,
        typer.Option(
            help="CORE metric every N steps and at the end, from a local eval bundle (default 2000; CPU"
            " preset -1 = never).",
            rich_help_panel=_E,
            show_default=False,
        ),
    ] = None,
    core_metric_max_per_task: Annotated[
        int, typer.Option(help="CORE examples per task during training (-1 = all).", rich_help_panel=_E)
    ] = 500,
    save_every: SaveEveryOption = -1,
    keep_last: KeepLastOption = 0,
    model_tag: Annotated[
        str | None,
        typer.Option(help="Checkpoint tag (default d<depth>).", rich_help_panel=_E, show_default=False),
    ] = None,
    wandb_run: WandbRunOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    seed: Annotated[int, typer.Option(help="Random seed for the weights.", rich_help_panel=_R)] = 42,
    threads: ThreadsOption = None,
    compile: CompileOption = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Require resuming from the latest checkpoint of this tag (a partial run resumes anyway).",
            rich_help_panel=_R,
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Delete this tag's checkpoints and train from scratch.", rich_help_panel=_R
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (sizes, batch math, FLOPs, iterations, launch command) and exit.",
            rich_help_panel=_R,
        ),
    ] = False,
    nproc_per_node: NprocOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    rdzv_endpoint: RdzvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Pretrain a base model: `--depth` sets everything else (nanochat's scaling rules).

    Without CUDA the defaults become a tiny config that trains in minutes on the embedded sample.
    Ctrl+C saves a checkpoint; rerunning the same command resumes exactly where it stopped.

    Example: [cyan]nanoctl pretrain --depth 12 --dry-run[/]
    """
    args = {k: v for k, v in locals().items() if k != "json_output"}  # first statement: only the options
    import json
    import os

    from nanoctl.train.base import PretrainOptions, pretrain

    opts = PretrainOptions(**args)
    result = pretrain(opts)
    if os.environ.get("NANOCTL_DIST_CHILD") == "1":
        return  # a torchrun worker: the launching process prints the result
    if json_output:
        out.print_json(json.dumps(result.to_dict()))
    elif not dry_run:
        out.print(f"{result.checkpoint_dir} step {result.final_step}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("pretrain", rich_help_panel="Train")(pretrain_cmd)
