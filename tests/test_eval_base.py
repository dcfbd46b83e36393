"""`nanoctl eval base` sized to the machine: typed CPU/CUDA presets (as pretrain's), the CLI derived from
BaseEvalOptions, and `--dry-run`: the plan and a time estimate measured on the model at hand (slow test: the
estimate is within 2x of the measured run)."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval_helpers import make_bundle, populate_home
from nanoctl.cli.main import app
from nanoctl.errors import UsageError
from nanoctl.evaluate.base import CPU_PRESET, GPU_PRESET, PRESETS, BaseEvalOptions, eval_base, resolve_options

runner = CliRunner()


def test_presets_cuda_keeps_nanochat_cpu_is_small() -> None:
    gpu, name = resolve_options(BaseEvalOptions(), "cuda")
    assert name == "gpu" and (gpu.max_per_task, gpu.split_tokens, gpu.device_batch_size) == (-1, 40 * 524288, 32)
    for device in ("cpu", "mps"):
        cpu, name = resolve_options(BaseEvalOptions(), device)
        assert name == "cpu" and (cpu.max_per_task, cpu.split_tokens, cpu.device_batch_size) == (8, 8192, 8)
    # explicit values win over the preset; --eval takes a comma-separated list too
    mine, _ = resolve_options(BaseEvalOptions(max_per_task=-1, split_tokens=10, evals=["core,bpb", "sample"]), "cpu")
    assert (mine.max_per_task, mine.split_tokens, mine.device_batch_size) == (-1, 10, 8)
    assert mine.evals == ["core", "bpb", "sample"]
    # every preset field is None in the plain options (so the preset can fill it) and set in both presets
    preset_fields = {f.name for f in fields(CPU_PRESET) if getattr(CPU_PRESET, f.name) != getattr(BaseEvalOptions(), f.name)}
    assert preset_fields == {"max_per_task", "split_tokens", "device_batch_size"}
    assert all(getattr(BaseEvalOptions(), n) is None and getattr(GPU_PRESET, n) is not None for n in preset_fields)
    assert set(PRESETS) == {"CUDA", "CPU"}


def test_help_shows_both_presets_values() -> None:
    r = runner.invoke(app, ["eval", "base", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "[default: CUDA -1, CPU 8]" in r.output  # --max-per-task
    assert "[default: CUDA 20971520, CPU 8192]" in r.output  # --split-tokens
    assert "--dry-run" in r.output


@pytest.fixture
def eval_home(home: Path, shared_data: Path) -> Path:
    populate_home(home, tag="d2", step=5)
    make_bundle(shared_data, home / "eval" / "bundle", rows=12)
    return home


def test_no_flags_on_cpu_uses_the_cpu_preset(eval_home: Path) -> None:
    res = eval_base(BaseEvalOptions(device="cpu", progress=False, unconditioned_samples=1, unconditioned_tokens=4),
                    home=eval_home)
    settings = res.record["settings"]
    assert (settings["preset"], settings["max_per_task"], settings["split_tokens"]) == ("cpu", 8, 8192)
    assert res.core is not None and all(t["examples"] == 8 for t in res.core["tasks"])
    assert res.plan["preset"] == "cpu" and not res.dry_run and res.json_path


def test_dry_run_prints_the_plan_and_an_estimate_and_writes_nothing(
    eval_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = eval_base(BaseEvalOptions(device="cpu", dry_run=True), home=eval_home)
    assert res.dry_run and res.json_path is None and not (eval_home / "reports").exists()
    assert not res.bpb and res.core is None and not res.samples
    est = res.plan["estimate"]
    assert set(est) == {"load", "CORE", "bpb", "samples", "total"} and all(v >= 0 for v in est.values())
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    assert [t["examples"] for t in res.plan["core_tasks"]] == [8, 8, 8, 8] and res.plan["core_missing"] == ["hellaswag"]
    assert res.plan["split_tokens"] == {"train": 8192, "val": 8192}  # 4 batches of 8 x 256
    err = capsys.readouterr().err
    for what in ("preset: cpu defaults", "CORE: 4 of 5 tasks x <= 8 examples = 32 examples", "bpb: train 8,192",
                 "samples: 7 greedy x 16 tokens", "estimate: "):
        assert what in err, (what, err)


def test_cli_dry_run_and_json(eval_home: Path) -> None:
    r = runner.invoke(app, ["eval", "base", "--dry-run", "--device", "cpu", "--eval", "bpb,sample", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["dry_run"] and set(out["plan"]["estimate"]) == {"load", "bpb", "samples", "total"}
    assert any(line.startswith("estimate: ") for line in out["plan"]["lines"])


def test_bad_budgets_are_usage_errors(eval_home: Path) -> None:
    for bad in ({"split_tokens": 0}, {"max_per_task": 0}, {"device_batch_size": 0}, {"evals": ["nope"]}):
        with pytest.raises(UsageError):
            eval_base(BaseEvalOptions(device="cpu", dry_run=True, **bad), home=eval_home)  # type: ignore[arg-type]


@pytest.mark.slow
def test_estimate_is_within_2x_of_the_run(home: Path, shared_data: Path) -> None:
    """A random-init depth-4 model on the shared bundle: `--dry-run`'s estimate vs the run, each in its own
    process as a user runs them (first-call costs, e.g. per-shape kernel set-up while sampling, count)."""
    import os
    import subprocess
    import sys

    from eval_helpers import tiny_model

    populate_home(home, tag="d4", step=1, model=tiny_model(n_layer=4, n_embd=256))
    args = [sys.executable, "-m", "nanoctl", "--home", str(home), "eval", "base", "--device", "cpu", "--json",
            "--bundle", str(shared_data / "eval_bundle"), "--max-per-task", "4", "--no-progress"]
    for task in ("arc_easy", "copa", "lambada_openai", "winograd", "bigbench_operators"):
        args += ["--core-task", task]

    def run(*extra: str) -> dict:
        done = subprocess.run([*args, *extra], capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    planned = run("--dry-run")["plan"]["estimate"]["total"]
    t0 = time.perf_counter()
    actual = run()["seconds"]
    wall = time.perf_counter() - t0
    print(f"estimate {planned:.1f}s vs actual {actual:.1f}s ({wall:.1f}s with interpreter start-up)")
    assert 0.5 <= planned / actual <= 2.0, (planned, actual)
