"""Options declared once: presets are typed replaces, and the argv a torchrun worker gets parses back
into the same options through the derived CLI command."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from nanoctl.cli.main import app
from nanoctl.errors import UsageError
from nanoctl.options import apply_preset, options_argv
from nanoctl.train.mid import MidOptions
from nanoctl.train.pretrain import CPU_PRESET, GPU_PRESET, PretrainOptions, resolve_options
from nanoctl.train.rl import RLOptions
from nanoctl.train.sft import SFTOptions

CHANGED = [
    ("pretrain", PretrainOptions(depth=6, matrix_lr=0.03, window_pattern="SL", resume=True, keep_last=2)),
    ("mid", MidOptions(data=["a.jsonl", "b.jsonl"], mix=True, total_batch_size=4096, output_tag="x")),
    ("sft", SFTOptions(metric_tasks=["ARC-Easy"], init_lr_frac=0.5, max_seq_len=64, force=True)),
    ("rl", RLOptions(task="SpellingBee", temperature=0.7, save_every=3, seed=7)),
]


@pytest.mark.parametrize(("name", "opts"), CHANGED, ids=[c[0] for c in CHANGED])
def test_worker_argv_parses_back_to_the_same_options(name: str, opts: object) -> None:
    argv = options_argv(opts, name)
    assert argv[0] == name and "--nproc-per-node" not in argv and "--dry-run" not in argv
    command = typer.main.get_command(app).commands[name]
    ctx = command.make_context(name, argv[1:])
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items() if k not in ("json_output",)}
    assert type(opts)(**params) == opts


def test_library_only_options_cannot_be_forwarded() -> None:
    with pytest.raises(UsageError, match="library-only"):
        options_argv(SFTOptions(train_task=object()), "sft")


def test_presets_fill_only_what_the_user_left_unset() -> None:
    opts, preset = resolve_options(PretrainOptions(depth=8), "cpu")
    assert preset == "cpu" and opts.depth == 8 and opts.max_seq_len == CPU_PRESET.max_seq_len
    opts, preset = resolve_options(PretrainOptions(), "cuda")
    assert preset == "gpu" and opts.depth == GPU_PRESET.depth == 20 and opts.lr_scale is None
    # every field a preset sets defaults to None in the options (else the preset could never apply)
    for preset_opts in (CPU_PRESET, GPU_PRESET):
        for f in dataclasses.fields(PretrainOptions):
            if getattr(preset_opts, f.name) != f.default and f.default is not None:
                assert getattr(preset_opts, f.name) == getattr(PretrainOptions(), f.name), f.name
    assert apply_preset(SFTOptions(), SFTOptions(eval_steps=3)).eval_steps == 3
    assert apply_preset(SFTOptions(eval_steps=1), SFTOptions(eval_steps=3)).eval_steps == 1
