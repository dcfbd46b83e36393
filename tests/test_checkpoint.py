"""Checkpoint files: atomic writes, completeness by meta, discovery order and errors, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanoctl.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint_path,
    save_checkpoint,
)
from nanoctl.errors import NanoctlError


def _save(home: Path, stage: str, tag: str, step: int, optim: bool = False) -> Path:
    d = home / "checkpoints" / stage / tag
    state = {"w": torch.full((2, 2), float(step)), "_orig_mod.b": torch.ones(1)}
    save_checkpoint(d, step, state, {"m": torch.zeros(1)} if optim else None, {"model_config": {}})
    return d


def test_save_load_roundtrip_strips_compile_prefix(home: Path) -> None:
    d = _save(home, "base", "d4", 5, optim=True)
    assert sorted(p.name for p in d.iterdir()) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    assert not list(d.glob("*.tmp"))
    state, optim, meta = load_checkpoint(d, 5, load_optimizer=True)
    assert set(state) == {"w", "b"} and torch.equal(state["w"], torch.full((2, 2), 5.0))
    assert optim is not None and meta["step"] == 5 and "nanoctl_version" in meta


def test_step_without_meta_is_incomplete(home: Path) -> None:
    d = _save(home, "base", "d4", 5)
    torch.save({"w": torch.zeros(1)}, d / "model_000009.pt")  # a kill before the meta write
    assert find_checkpoint("base", home=home).step == 5
    with pytest.raises(NanoctlError, match="incomplete"):
        load_checkpoint(d, 9)


def test_find_prefers_later_stage_and_deeper_tag(home: Path) -> None:
    _save(home, "base", "d4", 10)
    _save(home, "base", "d12", 3)
    _save(home, "base", "custom", 7)
    assert find_checkpoint(home=home).tag == "d12"
    _save(home, "sft", "d4", 2)
    ref = find_checkpoint(home=home)
    assert (ref.stage, ref.tag, ref.step) == ("sft", "d4", 2)
    assert find_checkpoint("base", "d4", home=home).step == 10
    assert [r.label for r in list_checkpoints(home)] == ["base/custom@7", "base/d12@3", "base/d4@10", "sft/d4@2"]


def test_find_errors_name_what_exists(home: Path) -> None:
    with pytest.raises(NanoctlError) as e:
        find_checkpoint(home=home)
    assert "nanoctl pretrain" in e.value.hint
    _save(home, "base", "d4", 10)
    with pytest.raises(NanoctlError) as e:
        find_checkpoint("rl", home=home)
    assert "nanoctl rl" in e.value.hint and "base/d4" in e.value.hint
    with pytest.raises(NanoctlError) as e:
        find_checkpoint("base", "d9", home=home)
    assert "d4" in e.value.hint
    with pytest.raises(NanoctlError) as e:
        find_checkpoint("base", "d4", 11, home=home)
    assert "10" in e.value.hint
    with pytest.raises(NanoctlError, match="unknown stage"):
        find_checkpoint("pre", home=home)


def test_resolve_checkpoint_path_accepts_dir_or_file(home: Path) -> None:
    d = _save(home, "mid", "x", 4)
    assert resolve_checkpoint_path(d).step == 4
    ref = resolve_checkpoint_path(d / "model_000004.pt")
    assert (ref.stage, ref.step) == ("mid", 4)
    with pytest.raises(NanoctlError):
        resolve_checkpoint_path(home / "nope")


def test_prune_keeps_newest(home: Path) -> None:
    for s in (1, 2, 3, 4):
        d = _save(home, "base", "d4", s, optim=True)
    assert prune_checkpoints(d, 2) == [1, 2]
    assert find_checkpoint("base", home=home).step == 4
    assert sorted(json.loads(p.read_text())["step"] for p in d.glob("meta_*.json")) == [3, 4]
    assert not list(d.glob("*_000001*"))
