"""`nanoctl export merge-lora`, library side: a base checkpoint with a LoRA adapter folded into its weights,
written as a normal checkpoint under the home (`checkpoints/<stage>/<out-tag>/`), lineage recorded.

The stage is the adapter's (an `sft --lora-rank` adapter gives an sft checkpoint) and the step its
training step; the meta's `parent` is the base checkpoint and `lora` the adapter (path, rank, alpha,
targets). No torch at import (the CLI reads MergeLoraOptions).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from nanoctl.errors import UsageError
from nanoctl.home import STAGES, Home
from nanoctl.options import OUTPUT, START, option


@dataclass
class MergeLoraOptions:
    """Everything `nanoctl export merge-lora` takes; the CLI flags are derived from these fields."""

    lora: str | None = option(None, help="The adapter directory to merge (required).", panel=START)
    out_tag: str | None = option(None, help="Tag of the merged checkpoint (required).", panel=OUTPUT)
    stage: str | None = option(
        None, help="Base checkpoint stage (unset: the checkpoint the adapter was trained on).", panel=START
    )
    tag: str | None = option(None, help="Base checkpoint tag.", panel=START)
    step: int | None = option(None, help="Base checkpoint step.", panel=START)
    checkpoint: str | None = option(None, help="Base checkpoint directory (overrides --stage/--tag).", panel=START)
    force: bool = option(False, help="Replace an existing checkpoint of that stage and tag.", panel=OUTPUT)

    def validate(self) -> None:
        if not self.lora:
            raise UsageError("--lora is required", "pass the adapter directory, e.g. --lora <home>/adapters/sft/d20")
        if not self.out_tag or "/" in self.out_tag or self.out_tag.startswith("."):
            raise UsageError(f"--out-tag {self.out_tag!r}: a tag (one directory name) is required",
                             "e.g. --out-tag d20-merged")
        if self.stage is not None and self.stage not in STAGES:
            raise UsageError(f"--stage {self.stage!r} is not a stage", f"use one of: {', '.join(STAGES)}")


def merge_lora_checkpoint(opts: MergeLoraOptions, *, home: Home) -> dict[str, Any]:
    """Write the merged checkpoint; returns a summary (checkpoint dir, stage, tag, step, parent, lora)."""
    import torch

    from nanoctl.adapters import check_adapter_path, resolve_base
    from nanoctl.atomic import atomic_path
    from nanoctl.cache import checkpoint_steps
    from nanoctl.checkpoint import load_model, lock_run_dir, save_checkpoint, save_tokenizer_copy
    from nanoctl.model.lora import mount_adapter

    opts.validate()
    adapter = check_adapter_path(opts.lora)  # type: ignore[arg-type]
    ref = resolve_base(str(adapter), opts.stage, opts.tag, opts.step, opts.checkpoint, home)
    model, _, meta = load_model(ref, device="cpu", dtype=torch.float32, home=home)
    lora = mount_adapter(model, adapter)  # merged in place: W += alpha/r B A
    stage = lora.get("stage") or ref.stage
    step = int(lora.get("step", ref.step))
    out = home.checkpoint_dir(stage, opts.out_tag)  # type: ignore[arg-type]
    if out.resolve() == ref.directory.resolve():
        raise UsageError(f"--out-tag {opts.out_tag}: that is the base checkpoint itself", "pick another tag")
    with lock_run_dir(out, "merge-lora"):
        if checkpoint_steps(out):
            if not opts.force:
                raise UsageError(f"{out} already holds a checkpoint", "pass --force to replace it, or pick another --out-tag")
            for f in out.iterdir():
                if f.name.startswith(("model_", "meta_", "optim_")):
                    f.unlink()
        record = {
            "model_config": meta["model_config"], "stage": stage, "step": step, "final": True,
            "parent": {"stage": ref.stage, "tag": ref.tag, "step": ref.step},
            "lora": {k: v for k, v in lora.items() if k != "parent"},
        }
        save_checkpoint(out, step, model.state_dict(), None, record)
        # the tokenizer the base was trained with, as training stages keep it
        copied = False
        for name in ("tokenizer.pkl", "token_bytes.pt", "tokenizer.json"):
            if (ref.directory / name).exists():
                with atomic_path(out / name) as tmp:
                    shutil.copyfile(ref.directory / name, tmp)
                copied = True
        if not copied:
            save_tokenizer_copy(out, home)
    return {"checkpoint_dir": str(out), "stage": stage, "tag": opts.out_tag, "step": step,
            "parent": record["parent"], "lora": record["lora"]}
