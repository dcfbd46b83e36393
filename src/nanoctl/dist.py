"""Process groups, rank helpers and the torchrun re-launch.

A stage started with `--nproc-per-node N` (or `--nnodes > 1`) re-executes the same `nanoctl ...` argv
under `python -m torch.distributed.run` (never a `torchrun` binary, so the active interpreter is used);
the workers see RANK/WORLD_SIZE in their environment and call `init_distributed`. Rank 0 alone prints
and writes shared files. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import HOME_ENV, Home

if TYPE_CHECKING:
    import torch

# Flags consumed by the launcher; stripped from the argv the workers get.
LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint")
CHILD_ENV = "NANOCTL_DIST_CHILD"


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) when not launched by it."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def is_master() -> bool:
    return env_world()[0] == 0


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Resolve the device and, under torchrun, join the process group (nccl on CUDA, gloo otherwise)."""
    import torch
    import torch.distributed as dist

    from nanoctl.device import resolve_device

    rank, local_rank, world = env_world()
    device = resolve_device(device_name)
    if device.type == "cuda":
        if world > 1 or local_rank:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Join whenever torchrun launched us, one process included (as nanochat): `--nproc-per-node 1` under
    # torchrun then exercises the same NCCL/gloo set-up as a multi-GPU node.
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if (world > 1 or launched) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float, device: torch.device) -> float:
    """Max of a scalar over ranks (identity in one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(value: float, device: torch.device) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device=device, dtype=torch.float64 if device.type != "mps" else None)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- re-launch ----------------------------------------------------------------------------------


def wants_relaunch(nproc_per_node: int, nnodes: int) -> bool:
    """True in the parent process when more than one process was asked for."""
    if os.environ.get(CHILD_ENV) == "1" or "RANK" in os.environ:
        return False
    return nproc_per_node > 1 or nnodes > 1


def strip_flags(argv: list[str], flags: tuple[str, ...] = LAUNCH_FLAGS) -> list[str]:
    """Remove `--flag value` and `--flag=value` for each launcher flag (both dash spellings)."""
    names = set(flags) | {f.replace("-", "_").replace("__", "--", 1) for f in flags}
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def torchrun_command(
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    argv: list[str] | None = None,
    log_dir: str | None = None,
) -> list[str]:
    """The exact command the re-launch runs: `python -m torch.distributed.run ... -m nanoctl <argv>`."""
    if nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if nnodes < 1:
        raise UsageError(f"--nnodes must be >= 1, got {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError(
            "--nnodes > 1 needs --rdzv-endpoint", "pass --rdzv-endpoint HOST:PORT of node 0 on every node"
        )
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank must be in [0, {nnodes - 1}], got {node_rank}")
    argv = strip_flags(list(sys.argv[1:] if argv is None else argv))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        # static rendezvous: the only backend that honours --node-rank (c10d ignores it and hands out
        # node ranks in join order), so global rank = node_rank * nproc_per_node + local_rank and global
        # rank 0 -- the one that prints and writes model + meta -- is on node 0, which hosts the store
        # at the endpoint.
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={rdzv_endpoint}",
        ]
    if log_dir:
        # every rank's output goes to files (read back on failure); only local rank 0 is echoed live
        cmd += [f"--log-dir={log_dir}", "--tee=3", "--local-ranks-filter=0"]
    cmd += ["-m", "nanoctl", *argv]
    return cmd


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def relaunch_with_torchrun(
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    argv: list[str] | None = None,
    *,
    home: Home,
) -> int:
    """Run the same command under torch.distributed.run and wait; on failure raise a readable error.

    The workers get this process's environment plus NANOCTL_HOME set to `home` (in their environment
    only; this process's os.environ is not touched), so their CLI entry point resolves the same home.
    Rank 0's output is shown live without torchrun's `[default0]:` prefix; torchrun's own log lines and
    traceback are kept back and boiled down to one line (which rank, exit code, its last error) when a
    worker fails.
    """
    import threading

    with tempfile.TemporaryDirectory(prefix="nanoctl-torchrun-") as log_dir:
        cmd = torchrun_command(nproc_per_node, nnodes, node_rank, rdzv_endpoint, argv, log_dir=log_dir)
        env = {**os.environ, HOME_ENV: str(home.root), CHILD_ENV: "1"}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))))
        env["PYTHONUNBUFFERED"] = "1"
        launcher_lines: list[str] = []
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )

        def pump(src: Any, dst: Any, keep: bool) -> None:
            for line in src:
                m = _PREFIX.match(line)
                if m:
                    dst.write(line[m.end() :])
                    dst.flush()
                elif keep:
                    launcher_lines.append(line)
                else:
                    dst.write(line)
                    dst.flush()

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, sys.stdout, False), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, sys.stderr, True), daemon=True),
        ]
        for t in threads:
            t.start()
        interrupted = False
        # SIGTERM (a scheduler's preemption, `kill`) takes the Ctrl+C path instead of killing this
        # process and orphaning torchrun with nobody reading its output or reporting the exit.
        old_term = _catch_sigterm()
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:
                    # Ctrl+C / a process-group SIGTERM reached torchrun too, which passes it to the
                    # workers once: they save a checkpoint and exit 130. A SIGTERM sent to this process
                    # alone did not: pass it on, unless torchrun says it is already shutting down.
                    if _TERM_RECEIVED[0] and not interrupted and proc.poll() is None:
                        deadline = time.monotonic() + 1.0
                        while time.monotonic() < deadline and not any(
                            "death signal" in ln for ln in launcher_lines
                        ):
                            time.sleep(0.05)
                        if proc.poll() is None and not any("death signal" in ln for ln in launcher_lines):
                            proc.send_signal(signal.SIGTERM)
                    interrupted = True
        finally:
            _restore_sigterm(old_term)
        for t in threads:
            t.join(timeout=5)
        if rc == 0:
            return 0
        failure = describe_failure(Path(log_dir), "".join(launcher_lines))
        if interrupted or (failure and failure[1] == 130):
            from nanoctl.errors import Interrupted

            raise Interrupted(
                "interrupted; the workers saved a checkpoint", "rerun the same command to resume"
            )
        if failure:
            rank, code, last = failure
            detail = f": {last}" if last else ""
            raise NanoctlError(
                f"worker rank {rank} exited with code {code}{detail}",
                "rerun with --nproc-per-node 1 (or NANOCTL_DEBUG=1) to see the full error",
            )
        tail = " | ".join(ln.strip() for ln in launcher_lines[-3:])
        raise NanoctlError(
            f"torch.distributed.run exited with code {rc}: {tail}", "rerun with NANOCTL_DEBUG=1 for details"
        )


_PREFIX = re.compile(r"^\[default\d+\]:")
_TERM_RECEIVED = [False]


def _catch_sigterm() -> Any:
    """Turn SIGTERM into KeyboardInterrupt (main thread only); returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: Any) -> None:
        _TERM_RECEIVED[0] = True
        raise KeyboardInterrupt

    _TERM_RECEIVED[0] = False
    return signal.signal(signal.SIGTERM, on_term)


def _restore_sigterm(old: Any) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)


def describe_failure(log_dir: Path, launcher_log: str = "") -> tuple[int, int, str] | None:
    """(rank, exit code, last error line) of the failed worker torchrun names as the root cause."""
    rank = code = None
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", launcher_log, re.S)
    if m:
        rank, code = int(m.group(1)), int(m.group(2))
    last_by_rank: dict[int, str] = {}
    for err_file in sorted(log_dir.rglob("stderr.log")):
        try:
            r = int(err_file.parent.name)
        except ValueError:
            continue
        lines = [ln.strip() for ln in err_file.read_text(errors="replace").splitlines() if ln.strip()]
        errs = [ln[len("error:") :].strip() for ln in lines if ln.startswith("error:")]
        if errs:
            last_by_rank[r] = errs[-1]
        elif lines and r not in last_by_rank:
            last_by_rank[r] = lines[-1]
    if rank is None:
        with_errors = sorted(r for r in last_by_rank)
        if not with_errors:
            return None
        rank, code = with_errors[0], 1
    # local rank == global rank on one node; on several nodes the log dir holds local ranks
    last = last_by_rank.get(rank) or next(iter(last_by_rank.values()), "")
    return rank, code if code is not None else 1, last
