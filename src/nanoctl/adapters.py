"""LoRA adapter directories (`--lora PATH`): which base checkpoint one belongs to, and checks of the path.

A LoRA run (`nanoctl sft --lora-rank R`) writes `<home>/adapters/<stage>/<tag>/`: its checkpoints (adapter
tensors and their optimizer state, for resume) and PEFT's `adapter_config.json` + `adapter_model.safetensors`
plus our `nanoctl_adapter.json`, which names the checkpoint it was trained on. `chat`, `serve`, `eval` and
`export merge-lora` mount such a directory (or one PEFT wrote) with `nanoctl.model.lora.mount_adapter`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

if TYPE_CHECKING:
    from nanoctl.checkpoint import CheckpointRef

RECORD_FILE = "nanoctl_adapter.json"  # the same name model/lora.py writes (kept torch-free here)


def check_adapter_path(path: str | os.PathLike[str], flag: str = "--lora") -> Path:
    """The adapter directory, or a UsageError naming the flag (before any slow model load)."""
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise UsageError(f"{flag} {path}: no adapter_config.json there",
                         "pass an adapter directory, e.g. <home>/adapters/sft/<tag> written by `nanoctl sft --lora-rank R`")
    return p


def adapter_parent(path: str | os.PathLike[str], home: Home) -> CheckpointRef:
    """The checkpoint the adapter was trained on (its nanoctl_adapter.json), for a `--lora` without a base."""
    from nanoctl.checkpoint import find_checkpoint

    p = check_adapter_path(path)
    record = p / RECORD_FILE
    parent = json.loads(record.read_text()).get("parent") if record.is_file() else None
    if not parent:
        raise NanoctlError(f"--lora {path}: the adapter does not say which checkpoint it was trained on",
                           "name the base with --stage/--tag/--step or --checkpoint")
    try:
        return find_checkpoint(parent["stage"], parent["tag"], parent["step"], home=home)
    except NanoctlError as e:
        raise NanoctlError(f"--lora {path}: its base {parent['stage']}/{parent['tag']}@{parent['step']} is"
                           f" not in {home.root} ({e.message})",
                           "name the base with --stage/--tag/--step or --checkpoint") from e


def resolve_base(
    lora: str | os.PathLike[str] | None,
    stage: str | None,
    tag: str | None,
    step: int | None,
    checkpoint: str | os.PathLike[str] | None,
    home: Home,
) -> CheckpointRef:
    """The checkpoint to load: --checkpoint, else --stage/--tag/--step, else (with --lora and none of
    those) the adapter's own base, else the newest checkpoint."""
    from nanoctl.checkpoint import find_checkpoint, resolve_checkpoint_path

    if checkpoint:
        return resolve_checkpoint_path(checkpoint, step)
    if lora is not None and stage is None and tag is None and step is None:
        return adapter_parent(lora, home)
    return find_checkpoint(stage, tag, step, home=home)
