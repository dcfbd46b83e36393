"""Multi-node training tried on one machine: two `--nnodes 2` launchers on 127.0.0.1 sharing one home.

Each "node" is its own `nanoctl pretrain --nnodes 2 --node-rank R --rdzv-endpoint 127.0.0.1:PORT
--nproc-per-node 1` (its own torch.distributed.run, gloo on CPU), exactly the command a user runs on two
machines. Checked: per-step losses equal a single-node `--nproc-per-node 2` run of the same config; one
checkpoint set (model + meta from global rank 0, an optimizer shard per rank); node 0 prints the step
lines; SIGTERM to both nodes saves and exits 130, and `--resume` continues to the same losses; `nanoctl
sft` runs on two nodes from the result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TAG = "tiny"
ITERS = 8
# depth 2, seq 64, 2 rows per process; the same total batch on 2 processes either way (grad accum 1)
ARGS = [
    "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "L",
    "--device-batch-size", "2", "--total-batch-size", "256", "--warmup-steps", "2",
    "--num-iterations", str(ITERS), "--save-every", "2", "--eval-every", "-1", "--sample-every", "-1",
    "--device", "cpu", "--threads", "1", "--model-tag", TAG,
]  # fmt: skip
TIMEOUT = 300


# --- fast: the launch command and the launcher's SIGTERM handling ------------------------------------------


def test_multinode_command_uses_static_rendezvous_honouring_node_rank() -> None:
    from nanoctl.dist import torchrun_command

    cmd = torchrun_command(4, nnodes=2, node_rank=1, rdzv_endpoint="host0:29500", argv=["pretrain"])
    assert cmd[1:] == [
        "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2", "--node-rank=1",
        "--rdzv-backend=static", "--rdzv-endpoint=host0:29500", "-m", "nanoctl", "pretrain",
    ]  # fmt: skip
    assert "--standalone" in torchrun_command(2, argv=["pretrain"])


def test_sigterm_to_the_launcher_alone_reaches_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill <launcher pid>`: the launcher survives, passes SIGTERM on, waits, and reports exit 130."""
    import threading

    from nanoctl import dist
    from nanoctl.errors import Interrupted
    from nanoctl.home import Home

    ready, got = tmp_path / "ready", tmp_path / "got-sigterm"
    child = (
        "import signal, sys, time, pathlib\n"
        f"def h(*a): pathlib.Path({str(got)!r}).write_text('x'); sys.exit(130)\n"
        "signal.signal(signal.SIGTERM, h)\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(dist, "torchrun_command", lambda *a, **k: [sys.executable, "-c", child])

    def kill_me() -> None:
        t0 = time.time()
        while not ready.exists() and time.time() - t0 < 30:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_me, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted):
        dist.relaunch_with_torchrun(2, argv=["pretrain"], home=Home.resolve(tmp_path))
    assert got.exists()  # the "torchrun" child got the SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


# --- slow: real two-node runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_home(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A 512-token tokenizer trained on real text and 3 real shards (2 train + val)."""
    import pyarrow.parquet as pq

    from nanoctl.tokenizer import Tokenizer

    home = tmp_path_factory.mktemp("multinode") / "seed"
    texts = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:200]
    Tokenizer.train_from_iterator(iter(texts), vocab_size=512).save(home / "tokenizer")
    data = home / "data" / "base"
    data.mkdir(parents=True)
    for i, src in enumerate(["shard_00000", "shard_00001", "shard_00008"]):
        shutil.copyfile(shared_data / "pretrain" / f"{src}.parquet", data / f"shard_{i:05d}.parquet")
    return home


def copy_home(seed: Path, dest: Path) -> Path:
    shutil.copytree(seed, dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home: Path, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`nanoctl <cmd>` in its own session (so a test can signal one node's whole process tree)."""
    e = dict(os.environ, NANOCTL_HOME=str(home), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "nanoctl", *cmd],
        env=e,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def two_nodes(
    home: Path, cmd: list[str], logs: Path, env: dict[str, str] | None = None
) -> list[subprocess.Popen[str]]:
    """Node 1 first (it waits for node 0's store at the endpoint), then node 0."""
    port = free_port()
    procs: dict[int, subprocess.Popen[str]] = {}
    for rank in (1, 0):
        dist = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"]
        dist += ["--nproc-per-node", "1"]
        procs[rank] = start(home, [*cmd, *dist], logs / f"node{rank}.log", env)
    return [procs[0], procs[1]]


def wait_all(procs: list[subprocess.Popen[str]], logs: list[Path]) -> list[int]:
    try:
        return [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError("timed out:\n" + "\n".join(log.read_text()[-2000:] for log in logs)) from None


def check_ok(procs: list[subprocess.Popen[str]], logs: list[Path]) -> None:
    codes = wait_all(procs, logs)
    assert codes == [0] * len(procs), "\n\n".join(
        f"{log.name}: exit {c}\n{log.read_text()[-3000:]}" for c, log in zip(codes, logs, strict=True)
    )


def losses(home: Path, tag: str = TAG) -> dict[int, float]:
    recs = [json.loads(x) for x in (home / "reports" / tag / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def meta_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name[5:11]) for p in ckpt.glob("meta_*.json"))


@pytest.fixture(scope="module")
def single_node(seed_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Reference: one node, 2 gloo processes."""
    home = copy_home(seed_home, tmp_path_factory.mktemp("single") / "home")
    log = home.parent / "single.log"
    check_ok([start(home, ["pretrain", *ARGS, "--nproc-per-node", "2"], log)], [log])
    got = losses(home)
    assert sorted(got) == list(range(1, ITERS + 1))
    return got


@pytest.mark.slow
def test_two_nodes_match_one_node_then_sft(
    seed_home: Path, single_node: dict[int, float], tmp_path: Path
) -> None:
    home = copy_home(seed_home, tmp_path / "shared-home")  # both "machines" mount this one home
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    check_ok(two_nodes(home, ["pretrain", *ARGS], tmp_path), logs)

    assert losses(home) == single_node  # bit-identical: same world size, same rows per rank
    ckpt = home / "checkpoints" / "base" / TAG
    steps = meta_steps(ckpt)
    assert steps == list(range(2, ITERS + 1, 2))
    # one set: global rank 0 wrote model + meta, each rank its optimizer shard, nothing twice
    for s in steps:
        assert (ckpt / f"model_{s:06d}.pt").is_file()
        assert sorted(p.name for p in ckpt.glob(f"optim_{s:06d}_rank*.pt")) == [
            f"optim_{s:06d}_rank0.pt",
            f"optim_{s:06d}_rank1.pt",
        ]
    assert len(list(ckpt.glob("model_*.pt"))) == len(steps)
    assert not [p.name for p in ckpt.iterdir() if ".tmp" in p.name or p.name.startswith("tmp")]
    assert json.loads((ckpt / f"meta_{ITERS:06d}.json").read_text())["loader_state"]["world_size"] == 2
    # global rank 0 lives on node 0 (--node-rank is honoured) and is the one that prints
    node0, node1 = (log.read_text() for log in logs)
    assert f"step {ITERS:05d}/{ITERS:05d}" in node0
    assert "step 00001/" not in node1

    # sft on two nodes from that base checkpoint
    chats = tmp_path / "chats.jsonl"
    rows = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": "My name is Zorblax."}]
        for q in ("What is your name?", "Who are you?", "Your name?", "Name please")
    ]
    chats.write_text("\n".join(json.dumps(r) for r in rows * 8) + "\n")
    sft = [
        "sft", "--data", str(chats), "--val-holdout", "4", "--device", "cpu", "--threads", "1",
        "--num-iterations", "2", "--device-batch-size", "2", "--target-examples-per-step", "4",
        "--eval-every", "-1", "--eval-steps", "1", "--eval-metrics-every", "-1",
    ]  # fmt: skip
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    sft_logs = [sft_dir / "node0.log", sft_dir / "node1.log"]
    check_ok(two_nodes(home, sft, sft_dir), sft_logs)
    out = home / "checkpoints" / "sft" / TAG
    assert meta_steps(out) == [2], sorted(p.name for p in out.iterdir()) if out.is_dir() else "no sft dir"
    assert (out / "model_000002.pt").is_file()
    assert (out / "optim_000002_rank0.pt").is_file() and (out / "optim_000002_rank1.pt").is_file()
    meta = json.loads((out / "meta_000002.json").read_text())
    assert meta["parent"]["stage"] == "base" and meta["parent"]["step"] == ITERS


@pytest.mark.slow
def test_sigterm_both_nodes_then_resume_matches(
    seed_home: Path, single_node: dict[int, float], tmp_path: Path
) -> None:
    home = copy_home(seed_home, tmp_path / "shared-home")
    ckpt = home / "checkpoints" / "base" / TAG
    first = tmp_path / "first"
    first.mkdir()
    logs = [first / "node0.log", first / "node1.log"]
    # slow steps so the signal lands mid-run (a scheduler's preemption: SIGTERM to every process)
    procs = two_nodes(home, ["pretrain", *ARGS], first, env={"NANOCTL_STEP_SLEEP": "0.3"})
    t0 = time.time()
    while not (ckpt / "meta_000002.json").exists():
        if any(p.poll() is not None for p in procs) or time.time() - t0 > TIMEOUT:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(
                "no step-2 checkpoint:\n" + "\n".join(log.read_text()[-2000:] for log in logs)
            )
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    codes = wait_all(procs, logs)
    assert codes == [130, 130], [log.read_text()[-2000:] for log in logs]
    assert "rerun the same command to resume" in logs[0].read_text()
    stopped = meta_steps(ckpt)[-1]
    assert 2 <= stopped < ITERS  # really interrupted, and saved where it stopped
    assert (ckpt / f"optim_{stopped:06d}_rank1.pt").is_file()

    again = tmp_path / "again"
    again.mkdir()
    logs = [again / "node0.log", again / "node1.log"]
    check_ok(two_nodes(home, ["pretrain", *ARGS, "--resume"], again), logs)
    assert f"resuming from step {stopped}" in logs[0].read_text()
    got = losses(home)
    assert sorted(got) == list(range(1, ITERS + 1))  # no step lost or logged twice
    assert got == single_node
