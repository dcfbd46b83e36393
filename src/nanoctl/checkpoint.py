"""Checkpoints: atomic save, discovery across stages/tags/steps, and loading a model to use.

Layout (nanochat's file names, so nanochat checkpoints load):
    <home>/checkpoints/<stage>/<tag>/model_<step:06d>.pt            state_dict (rank 0)
    <home>/checkpoints/<stage>/<tag>/optim_<step:06d>_rank<r>.pt    this rank's optimizer shard
    <home>/checkpoints/<stage>/<tag>/meta_<step:06d>.json           written last: marks the step complete
    <home>/checkpoints/<stage>/<tag>/tokenizer.pkl, token_bytes.pt  copy of the tokenizer it was trained with
Every file goes through a temp file + fsync + rename, so a kill at any moment leaves only complete steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl import __version__
from nanoctl.atomic import atomic_path, atomic_write_json
from nanoctl.cache import checkpoint_steps
from nanoctl.errors import NanoctlError
from nanoctl.home import STAGES, Home

if TYPE_CHECKING:
    import torch

    from nanoctl.model.gpt import GPT
    from nanoctl.tokenizer import Tokenizer

# Which command produces each stage, for "run this first" hints.
STAGE_COMMANDS = {"base": "nanoctl pretrain", "mid": "nanoctl mid", "sft": "nanoctl sft", "rl": "nanoctl rl"}
_TAG_DEPTH = re.compile(r"^d(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    stage: str
    tag: str
    step: int
    directory: Path

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "tag": self.tag, "step": self.step, "directory": str(self.directory)}

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.tag}@{self.step}"


def model_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"model_{step:06d}.pt"


def meta_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"meta_{step:06d}.json"


def optim_path(directory: Path, step: int, rank: int) -> Path:
    return Path(directory) / f"optim_{step:06d}_rank{rank}.pt"


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model_state: dict[str, Any] | None,
    optim_state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    rank: int = 0,
) -> Path:
    """Write one step. Rank 0 writes the model and meta; every rank writes its optimizer shard.

    In multi-process runs call it on every rank and put a barrier before rank 0's meta write matters
    (the caller's loop does: optimizer shards first, barrier, then rank 0 model + meta).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optim_state is not None:
        _torch_save(optim_state, optim_path(directory, step, rank))
    if rank == 0:
        if model_state is not None:
            _torch_save(model_state, model_path(directory, step))
        meta = dict(meta or {})
        meta.setdefault("step", step)
        meta.setdefault("nanoctl_version", __version__)
        atomic_write_json(meta_path(directory, step), meta)  # last: marks the step complete
    return directory


def load_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    device: str | torch.device = "cpu",
    load_optimizer: bool = False,
    rank: int = 0,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """Return (model_state, optim_state or None, meta). Weights load with weights_only=True."""
    import torch

    directory = Path(directory)
    mpath, jpath = model_path(directory, step), meta_path(directory, step)
    if not mpath.exists() or not jpath.exists():
        raise NanoctlError(
            f"checkpoint step {step} is incomplete or missing in {directory}",
            f"complete steps there: {checkpoint_steps(directory) or 'none'}",
        )
    try:
        model_state = torch.load(mpath, map_location=device, weights_only=True)
        meta = json.loads(jpath.read_text())
    except Exception as e:  # corrupt file: name it
        raise NanoctlError(
            f"cannot read checkpoint {mpath.name} in {directory}: {e}",
            "remove that step (`nanoctl cache rm`) or pick another with --step",
        ) from e
    # torch.compile wraps modules; nanochat checkpoints may carry the prefix.
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    optim_state = None
    if load_optimizer:
        opath = optim_path(directory, step, rank)
        if not opath.exists():
            raise NanoctlError(
                f"optimizer shard {opath.name} missing in {directory}",
                "resume needs the optimizer state of every rank; start fresh with --force",
            )
        optim_state = torch.load(opath, map_location=device, weights_only=True)
    return model_state, optim_state, meta


def _tags(stage_dir: Path) -> list[Path]:
    """Tag dirs holding at least one complete step, best first: largest d<N>, then most recent."""
    if not stage_dir.is_dir():
        return []
    tags = [p for p in stage_dir.iterdir() if p.is_dir() and checkpoint_steps(p)]

    def key(p: Path) -> tuple[int, float]:
        m = _TAG_DEPTH.match(p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)

    return sorted(tags, key=key, reverse=True)


def list_checkpoints(home: str | os.PathLike[str] | None = None) -> list[CheckpointRef]:
    """Every complete checkpoint step in the home, in stage order then tag then step."""
    root = Home.resolve(home).checkpoints_root
    refs = []
    for stage in STAGES:
        for tag_dir in sorted(_tags(root / stage), key=lambda p: p.name):
            refs += [CheckpointRef(stage, tag_dir.name, s, tag_dir) for s in checkpoint_steps(tag_dir)]
    return refs


def find_checkpoint(
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
    home: str | os.PathLike[str] | None = None,
) -> CheckpointRef:
    """Resolve a checkpoint. stage None: newest of rl > sft > mid > base; tag None: largest d<N>
    (else most recent); step None: the latest complete step."""
    root = Home.resolve(home).checkpoints_root
    if stage is not None and stage not in STAGES:
        raise NanoctlError(f"unknown stage {stage!r}", f"expected one of: {', '.join(STAGES)}")
    stages = [stage] if stage else list(reversed(STAGES))
    for st in stages:
        tags = _tags(root / st)
        if not tags:
            continue
        if tag is None:
            tag_dir = tags[0]
        else:
            tag_dir = root / st / tag
            if tag_dir not in tags:
                if stage is None:
                    continue
                raise NanoctlError(
                    f"no {st} checkpoint with tag {tag!r}",
                    f"available {st} tags: {', '.join(sorted(p.name for p in tags))}",
                )
        steps = checkpoint_steps(tag_dir)
        if step is None:
            return CheckpointRef(st, tag_dir.name, steps[-1], tag_dir)
        if step in steps:
            return CheckpointRef(st, tag_dir.name, step, tag_dir)
        raise NanoctlError(
            f"no step {step} in {st}/{tag_dir.name}",
            f"available steps: {', '.join(map(str, steps))}",
        )
    existing = list_checkpoints(home)
    if stage:
        have = ", ".join(sorted({f"{r.stage}/{r.tag}" for r in existing})) or "none"
        raise NanoctlError(
            f"no {stage} checkpoint{f' with tag {tag!r}' if tag else ''} in {root}",
            f"train one with `{STAGE_COMMANDS[stage]}` (existing: {have})",
        )
    if tag:
        have = ", ".join(sorted({f"{r.stage}/{r.tag}" for r in existing})) or "none"
        raise NanoctlError(f"no checkpoint with tag {tag!r} in {root}", f"existing: {have}")
    raise NanoctlError(f"no checkpoints in {root}", "train one with `nanoctl pretrain`")


def resolve_checkpoint_path(path: str | os.PathLike[str], step: int | None = None) -> CheckpointRef:
    """A checkpoint given as a directory (or a model_*.pt file inside one), e.g. a nanochat checkpoint."""
    p = Path(path).expanduser()
    if p.is_file():
        m = re.match(r"^model_(\d+)\.pt$", p.name)
        if not m:
            raise NanoctlError(f"{p} is not a model_<step>.pt checkpoint file", "pass the checkpoint directory")
        step, p = int(m.group(1)), p.parent
    if not p.is_dir():
        raise NanoctlError(f"checkpoint path {p} does not exist", "pass a directory holding model_*.pt + meta_*.json")
    steps = checkpoint_steps(p)
    if not steps:
        raise NanoctlError(f"no complete checkpoint (model_*.pt + meta_*.json) in {p}", "check the path")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NanoctlError(f"no step {step} in {p}", f"available steps: {', '.join(map(str, steps))}")
    stage = p.parent.name if p.parent.name in STAGES else "base"
    return CheckpointRef(stage, p.name, step, p)


def save_tokenizer_copy(directory: str | os.PathLike[str], home: str | os.PathLike[str] | None = None) -> None:
    """Keep the tokenizer next to the weights so a checkpoint stays usable if the home's tokenizer changes."""
    src = Home.resolve(home).tokenizer_dir
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        if (src / name).exists() and not (directory / name).exists():
            with atomic_path(directory / name) as tmp:
                shutil.copyfile(src / name, tmp)


def load_tokenizer_for(ref: CheckpointRef, home: str | os.PathLike[str] | None = None) -> Tokenizer:
    from nanoctl.tokenizer import Tokenizer, load_tokenizer

    if (ref.directory / "tokenizer.pkl").exists():
        return Tokenizer.from_directory(ref.directory)
    return load_tokenizer(home)


def _infer_arch(model_config: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(model_config)
    if "arch" not in cfg:  # a nanochat checkpoint: classic (Oct 2025) models have no residual scalars
        cfg["arch"] = "current" if any(k.startswith("resid_lambdas") for k in state) else "classic"
    cfg.setdefault("window_pattern", "L")  # as nanochat: old checkpoints predate sliding windows
    return cfg


def load_model(
    ref: CheckpointRef | None = None,
    *,
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    home: str | os.PathLike[str] | None = None,
    phase: str = "eval",
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Load a checkpoint as a ready model with its tokenizer. Returns (model, tokenizer, meta);
    meta gains a "ref" entry describing which checkpoint was loaded."""
    import torch

    from nanoctl.model.gpt import GPTConfig, build_model

    if ref is None:
        ref = resolve_checkpoint_path(checkpoint, step) if checkpoint else find_checkpoint(stage, tag, step, home)
    device = torch.device(device)
    state, _, meta = load_checkpoint(ref.directory, ref.step, device=device)
    cfg_dict = _infer_arch(meta["model_config"], state)
    config = GPTConfig.from_dict(cfg_dict)
    tokenizer = load_tokenizer_for(ref, home)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NanoctlError(
            f"tokenizer vocab {tokenizer.get_vocab_size()} does not match model vocab {config.vocab_size} "
            f"for {ref.label}",
            "use the tokenizer the model was trained with (retrain with `nanoctl tok train --vocab-size "
            f"{config.vocab_size}` or pick another checkpoint)",
        )
    model = build_model(config, device=device, dtype=dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise NanoctlError(
            f"checkpoint {ref.label} does not fit the model built from its meta: {str(e).splitlines()[0]}",
            "the checkpoint may come from an incompatible version",
        ) from e
    model.train() if phase == "train" else model.eval()
    meta = dict(meta)
    meta["ref"] = ref.to_dict()
    return model, tokenizer, meta


def prune_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` complete steps (and any incomplete leftovers). Returns removed steps."""
    directory = Path(directory)
    if keep_last <= 0:
        return []
    steps = checkpoint_steps(directory)
    removed = steps[:-keep_last]
    for s in removed:
        meta_path(directory, s).unlink(missing_ok=True)  # meta first: the step stops counting as complete
        for f in directory.glob(f"*_{s:06d}*"):
            f.unlink(missing_ok=True)
    return removed
