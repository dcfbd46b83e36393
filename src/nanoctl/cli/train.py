"""`nanoctl pretrain`, `mid`, `sft`, `rl`: commands derived from each stage's options dataclass.

Every flag, its type, default, unit and help come from the stage's options (nanoctl.train.*); presets'
values are listed in the help of the fields they fill. This module only parses and calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer

from nanoctl.cli.common import home_of, out
from nanoctl.cli.options import options_command


@dataclass(frozen=True)
class StageCommand:
    name: str
    module: str  # nanoctl.train.<module>: holds OPTIONS, PRESETS and the stage function
    options: str
    function: str
    doc: str


COMMANDS = (
    StageCommand(
        "pretrain", "pretrain", "PretrainOptions", "pretrain",
        """Pretrain a base model: `--depth` sets everything else (nanochat's scaling rules).

        Without CUDA the defaults become a tiny config that trains in minutes on the embedded sample.
        Ctrl+C saves a checkpoint; rerunning the same command resumes exactly where it stopped.

        Example: [cyan]nanoctl pretrain --depth 12 --dry-run[/]
        """,
    ),
    StageCommand(
        "mid", "mid", "MidOptions", "mid",
        """Mid-train the base model on conversations (nanochat's mid mixture), loss on every token.

        Starts from the latest base checkpoint. Use --data FILE.jsonl for your own conversations.

        Example: [cyan]nanoctl mid --data-dir ./datasets --num-iterations 100[/]
        """,
    ),
    StageCommand(
        "sft", "sft", "SFTOptions", "sft",
        """Supervised fine-tuning on conversations, loss on the assistant's tokens only.

        Starts from the latest mid checkpoint (else base). Use --data FILE.jsonl for your own conversations.

        Example: [cyan]nanoctl sft --data my_chats.jsonl --mix --data-dir ./datasets[/]
        """,
    ),
    StageCommand(
        "rl", "rl", "RLOptions", "rl",
        """Reinforcement learning on a verifiable task (nanochat's simplified GRPO / REINFORCE).

        Samples --num-samples answers per question, rewards them with the task's scorer, and pushes up the
        better-than-average ones. Starts from the latest sft checkpoint.

        Example: [cyan]nanoctl rl --task GSM8K --data-dir ./datasets --num-iterations 50[/]
        """,
    ),
)


def _runner(spec: StageCommand) -> Any:
    def call(ctx: typer.Context, opts: Any, json_output: bool) -> None:
        import json
        import os
        from importlib import import_module

        result = getattr(import_module(f"nanoctl.train.{spec.module}"), spec.function)(opts, home_of(ctx))
        if os.environ.get("NANOCTL_DIST_CHILD") == "1":
            return  # a torchrun worker: the launching process prints the result
        if json_output:
            out.print_json(json.dumps(result.to_dict()))
        elif not opts.dry_run:
            out.print(f"{result.checkpoint_dir} step {result.final_step}", soft_wrap=True)

    return call


def register(app: typer.Typer) -> None:
    from importlib import import_module

    for spec in COMMANDS:
        # The options modules import no torch at module level, so --help stays instant.
        module = import_module(f"nanoctl.train.{spec.module}")
        command = options_command(getattr(module, spec.options), _runner(spec), module.PRESETS, spec.doc)
        app.command(spec.name, rich_help_panel="Train")(command)
