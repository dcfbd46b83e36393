"""Checkpoint files: atomic writes, completeness by meta, discovery order and errors, pruning;
integrity records checked on load, a full disk during a save, the one-writer lock."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoctl.cache import checkpoint_steps, list_artifacts, remove_artifacts, resolve_targets
from nanoctl.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    lock_run_dir,
    prune_checkpoints,
    resolve_checkpoint_path,
    run_dir_holder,
    save_checkpoint,
)
from nanoctl.errors import NanoctlError
from nanoctl.home import Home


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
    assert find_checkpoint("base", home=Home(home)).step == 5
    with pytest.raises(NanoctlError, match="incomplete"):
        load_checkpoint(d, 9)


def test_find_prefers_later_stage_and_deeper_tag(home: Path) -> None:
    _save(home, "base", "d4", 10)
    _save(home, "base", "d12", 3)
    _save(home, "base", "custom", 7)
    assert find_checkpoint(home=Home(home)).tag == "d12"
    _save(home, "sft", "d4", 2)
    ref = find_checkpoint(home=Home(home))
    assert (ref.stage, ref.tag, ref.step) == ("sft", "d4", 2)
    assert find_checkpoint("base", "d4", home=Home(home)).step == 10
    assert [r.label for r in list_checkpoints(Home(home))] == ["base/custom@7", "base/d12@3", "base/d4@10", "sft/d4@2"]


def test_find_errors_name_what_exists(home: Path) -> None:
    with pytest.raises(NanoctlError) as e:
        find_checkpoint(home=Home(home))
    assert "nanoctl pretrain" in e.value.hint
    _save(home, "base", "d4", 10)
    with pytest.raises(NanoctlError) as e:
        find_checkpoint("rl", home=Home(home))
    assert "nanoctl rl" in e.value.hint and "base/d4" in e.value.hint
    with pytest.raises(NanoctlError) as e:
        find_checkpoint("base", "d9", home=Home(home))
    assert "d4" in e.value.hint
    with pytest.raises(NanoctlError) as e:
        find_checkpoint("base", "d4", 11, home=Home(home))
    assert "10" in e.value.hint
    with pytest.raises(NanoctlError, match="unknown stage"):
        find_checkpoint("pre", home=Home(home))


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
    assert find_checkpoint("base", home=Home(home)).step == 4
    assert sorted(json.loads(p.read_text())["step"] for p in d.glob("meta_*.json")) == [3, 4]
    assert not list(d.glob("*_000001*"))


# --- integrity: sizes + sha256 in the meta, checked on load --------------------------------------------------


def _lib_home(home: Path) -> Any:
    """The home as library calls take it: a Home (the Home-threading API), else the path (older API)."""
    h = Home.resolve(home)
    try:
        return Home.resolve(h)
    except TypeError:  # Home.resolve does not take a Home yet: the library takes paths
        return home


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(e: NanoctlError) -> None:
    assert "\n" not in str(e) and "Traceback" not in str(e)


def test_meta_records_size_and_sha256_of_each_file(home: Path) -> None:
    d = _save(home, "base", "d4", 5, optim=True)
    files = json.loads((d / "meta_000005.json").read_text())["files"]
    assert set(files) == {"model_000005.pt", "optim_000005_rank0.pt"}
    for name, rec in files.items():
        assert rec == {"bytes": (d / name).stat().st_size, "sha256": _sha256(d / name)}


def test_other_ranks_shards_recorded_through_sidecars(home: Path) -> None:
    d = home / "checkpoints" / "base" / "d4"
    for rank in (2, 1):  # ranks > 0 first (the training loop's barrier), then rank 0
        save_checkpoint(d, 7, None, {"m": torch.full((3,), float(rank))}, None, rank=rank)
    assert (d / "optim_000007_rank1.digest.json").exists()
    save_checkpoint(d, 7, {"w": torch.ones(2)}, {"m": torch.zeros(3)}, {"model_config": {}}, rank=0)
    files = json.loads((d / "meta_000007.json").read_text())["files"]
    assert list(files) == ["model_000007.pt", "optim_000007_rank0.pt", "optim_000007_rank1.pt", "optim_000007_rank2.pt"]
    for name, rec in files.items():
        assert rec["sha256"] == _sha256(d / name) and rec["bytes"] == (d / name).stat().st_size
    assert not list(d.glob("*.digest.json"))  # folded into the meta
    _, optim, _ = load_checkpoint(d, 7, load_optimizer=True, rank=2)
    assert optim is not None and torch.equal(optim["m"], torch.full((3,), 2.0))
    (d / "optim_000007_rank1.pt").write_bytes(b"junk")
    with pytest.raises(NanoctlError, match="optim_000007_rank1.pt is truncated"):
        load_checkpoint(d, 7, load_optimizer=True, rank=1)


def test_truncated_model_is_named_with_previous_step_hint(home: Path) -> None:
    _save(home, "base", "d4", 5)
    d = _save(home, "base", "d4", 10)
    f = d / "model_000010.pt"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(NanoctlError) as e:
        load_checkpoint(d, 10)
    assert f"{f} is truncated" in e.value.message
    assert "--step 5" in e.value.hint and "5, 10" not in e.value.hint and f"steps in {d}: 5" in e.value.hint
    _one_line(e.value)
    with pytest.raises(NanoctlError, match="model_000010.pt is truncated"):  # the path `eval`/`chat` take
        load_model(checkpoint=d, step=10)
    assert torch.equal(load_checkpoint(d, 5)[0]["w"], torch.full((2, 2), 5.0))


def test_flipped_byte_is_corrupt_and_verify_false_skips_the_hash(home: Path) -> None:
    d = _save(home, "base", "d4", 5)
    f = d / "model_000005.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(NanoctlError) as e:
        load_checkpoint(d, 5)
    assert f"{f} is corrupt" in e.value.message and "sha256" in e.value.message
    assert "--force" in e.value.hint and "no other complete step" in e.value.hint
    _one_line(e.value)
    load_checkpoint(d, 5, verify=False)  # size still matches: loads as is


def test_old_checkpoint_without_files_record_loads_and_unpickling_errors_are_named(home: Path) -> None:
    d = home / "checkpoints" / "base" / "nanochat"
    d.mkdir(parents=True)
    torch.save({"_orig_mod.w": torch.ones(2)}, d / "model_000003.pt")  # as nanochat writes it
    (d / "meta_000003.json").write_text(json.dumps({"step": 3, "model_config": {}}))
    state, _, meta = load_checkpoint(d, 3)
    assert torch.equal(state["w"], torch.ones(2)) and "files" not in meta
    (d / "model_000003.pt").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(NanoctlError) as e:
        load_checkpoint(d, 3)
    assert f"{d / 'model_000003.pt'} cannot be read" in e.value.message
    _one_line(e.value)


def test_unreadable_meta_is_named(home: Path) -> None:
    d = _save(home, "base", "d4", 5)
    (d / "meta_000005.json").write_text('{"step": 5, ')
    with pytest.raises(NanoctlError, match="meta_000005.json cannot be read") as e:
        load_checkpoint(d, 5)
    _one_line(e.value)


# --- a full disk during a save ----------------------------------------------------------------------------


def _fail_writes_to(monkeypatch: pytest.MonkeyPatch, prefix: str, after: int) -> None:
    """Make os.write (the call nanoctl.atomic's writer makes) hit ENOSPC on temp files named .<prefix>...
    once `after` bytes went in (the call crossing that point writes part of its buffer, as a filling disk does)."""
    real = os.write
    written = {"n": 0}

    def write(fd: int, data: bytes | memoryview) -> int:
        if not os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + prefix):
            return real(fd, data)
        room = after - written["n"]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, memoryview(data)[:room])
        written["n"] += n
        return n

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("target", ["optim_000010_rank0.pt", "model_000010.pt", "meta_000010.json"])
def test_enospc_at_any_write_leaves_previous_step_loadable(
    home: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    d = _save(home, "base", "d4", 5, optim=True)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _fail_writes_to(monkeypatch, target, after=64)
    with pytest.raises(NanoctlError) as e:
        _save(home, "base", "d4", 10, optim=True)
    monkeypatch.undo()
    assert e.value.message == f"no space left on device while writing {d / target}"
    assert "free space or point --home elsewhere" in e.value.hint and "step 5 is intact" in e.value.hint
    _one_line(e.value)
    assert not list(d.glob(".*.tmp"))
    assert checkpoint_steps(d) == [5] and find_checkpoint("base", home=_lib_home(home)).step == 5
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before
    state, optim, _ = load_checkpoint(d, 5, load_optimizer=True)
    assert torch.equal(state["w"], torch.full((2, 2), 5.0)) and optim is not None
    _save(home, "base", "d4", 10, optim=True)  # space back: the step saves
    assert checkpoint_steps(d) == [5, 10]


def test_enospc_while_resaving_a_step_leaves_it_incomplete_not_mismatched(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(home, "base", "d4", 5)
    d = _save(home, "base", "d4", 10)
    _fail_writes_to(monkeypatch, "meta_000010", after=0)
    with pytest.raises(NanoctlError, match="step 5 is intact"):
        save_checkpoint(d, 10, {"w": torch.zeros(3)}, None, {"model_config": {}})
    monkeypatch.undo()
    assert checkpoint_steps(d) == [5]  # the new model file has no meta claiming the old one's hash


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_on_tmpfs(small_tmpfs: Path) -> None:
    d = small_tmpfs / "checkpoints" / "base" / "d4"
    save_checkpoint(d, 1, {"w": torch.arange(1000.0)}, {"m": torch.ones(100)}, {"model_config": {}})
    free = shutil.disk_usage(small_tmpfs).free
    with pytest.raises(NanoctlError) as e:  # 2 MB does not fit in 1 MiB
        save_checkpoint(d, 2, {"w": torch.zeros(500_000)}, {"m": torch.ones(100)}, {"model_config": {}})
    assert e.value.message == f"no space left on device while writing {d / 'model_000002.pt'}"
    assert "step 1 is intact" in e.value.hint
    assert not list(d.glob(".*.tmp")) and shutil.disk_usage(small_tmpfs).free >= free - 64 * 1024
    state, optim, _ = load_checkpoint(d, 1, load_optimizer=True)
    assert torch.equal(state["w"], torch.arange(1000.0)) and optim is not None
    assert checkpoint_steps(d) == [1]


# --- one writer per run directory ---------------------------------------------------------------------------

_HOLDER = """
import sys, time
from nanoctl.checkpoint import lock_run_dir
with lock_run_dir(sys.argv[1], "pretrain d4 (test holder)"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _spawn_holder(d: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_in_another_process_is_refused_naming_the_holder(home: Path) -> None:
    d = home / "checkpoints" / "base" / "d4"
    proc = _spawn_holder(d)
    try:
        with pytest.raises(NanoctlError) as e, lock_run_dir(d, "pretrain d4"):
            pass
        assert e.value.message.startswith(f"{d} is in use by another training run (pid {proc.pid})")
        assert "pretrain d4 (test holder)" in e.value.message
        assert e.value.hint == (
            "wait for it to finish, or stop it; use another --model-tag/--output-tag to train in parallel"
        )
        assert run_dir_holder(d) == proc.pid
    finally:
        proc.terminate()
        proc.wait()
    with lock_run_dir(d, "pretrain d4"):  # released on exit
        assert (d / ".lock").read_text().splitlines()[0] == str(os.getpid())


def test_lock_of_a_killed_process_does_not_block(home: Path) -> None:
    d = home / "checkpoints" / "base" / "d4"
    proc = _spawn_holder(d)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (d / ".lock").read_text().splitlines()[0] == str(proc.pid)  # stale file left behind
    assert run_dir_holder(d) is None
    (d / ".model_000010.pt.abc123.tmp").write_bytes(b"half a file")  # what a kill mid-save leaves
    with lock_run_dir(d, "pretrain d4") as lock:
        assert lock == d / ".lock" and run_dir_holder(d) == os.getpid()
        assert not list(d.glob(".*.tmp"))
        with pytest.raises(NanoctlError, match=f"pid {os.getpid()}"), lock_run_dir(d, "again"):
            pass
    assert run_dir_holder(d) is None


def test_lock_file_is_ignored_by_discovery_and_cache(home: Path) -> None:
    empty = home / "checkpoints" / "base" / "d8"
    with lock_run_dir(empty, "pretrain d8"):  # a run that has not saved yet: its dir holds only .lock
        d = _save(home, "base", "d4", 5, optim=True)
        with lock_run_dir(d, "pretrain d4"):
            assert checkpoint_steps(d) == [5]
            assert find_checkpoint(home=_lib_home(home)).tag == "d4"
            assert [r.label for r in list_checkpoints(_lib_home(home))] == ["base/d4@5"]
            assert resolve_checkpoint_path(d).step == 5
            (a,) = [a for a in list_artifacts(_lib_home(home)) if a.kind == "checkpoint"]
            assert a.name == "base/d4@5" and a.detail == "model+optimizer"
            assert a.size_bytes == sum(p.stat().st_size for p in d.glob("*_000005*"))
            prune_checkpoints(d, 1)
            assert (d / ".lock").exists()
    targets = resolve_targets(["checkpoints/base/d4"], _lib_home(home))
    assert remove_artifacts(targets) > 0 and not d.exists()
