"""`nanoctl pretrain`: the depth dial, schedules, a tiny CPU run end to end, exact resume after SIGKILL,
Ctrl+C, config checks, and two gloo processes vs one."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanoctl.cli import app
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.train.pretrain import PretrainOptions, plan_pretrain, pretrain
from nanoctl.train.progress import LossEMA
from nanoctl.train.runtime import LossScaler
from nanoctl.train.schedules import lr_multiplier, muon_momentum, muon_weight_decay

runner = CliRunner()
TAG = "tiny"
# depth 2, seq 64, 2 rows: a step is tens of milliseconds on one core
TINY = [
    "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "L",
    "--device-batch-size", "2", "--total-batch-size", "256", "--warmup-steps", "2",
    "--eval-every", "4", "--eval-tokens", "256", "--sample-every", "-1",
    "--device", "cpu", "--threads", "1", "--model-tag", TAG,
]  # fmt: skip


def tiny_opts(**kw: object) -> PretrainOptions:
    base = dict(
        depth=2, head_dim=32, max_seq_len=64, window_pattern="L", device_batch_size=2, total_batch_size=256,
        warmup_steps=2, eval_every=4, eval_tokens=256, sample_every=-1, device="cpu", threads=1,
        model_tag=TAG, num_iterations=8,
    )  # fmt: skip
    base.update(kw)
    return PretrainOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A 512-token BPE tokenizer trained on real text (seconds), saved once per session."""
    import pyarrow.parquet as pq

    from nanoctl.tokenizer import Tokenizer

    texts = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:200]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=512)
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture
def run_home(home: Path, tokenizer_dir: Path, shared_data: Path) -> Path:
    """A home with the tiny tokenizer and 3 real shards (2 train + val)."""
    shutil.copytree(tokenizer_dir, home / "tokenizer")
    data = home / "data" / "base"
    data.mkdir(parents=True)
    for i, src in enumerate(["shard_00000", "shard_00001", "shard_00008"]):
        shutil.copyfile(shared_data / "pretrain" / f"{src}.parquet", data / f"shard_{i:05d}.parquet")
    return home


def losses(home: Path, tag: str = TAG) -> dict[int, float]:
    recs = [json.loads(x) for x in (home / "reports" / tag / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def cli(home: Path, *args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    e = dict(os.environ, NANOCTL_HOME=str(home), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "nanoctl", "pretrain", *args],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


# --- the depth dial (no weights) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "batch", "iters"),
    [(12, 2**19, 2520), (20, 2**20, 4980), (26, 2**20, 10510), (32, 2**21, 9600)],
)
def test_plan_matches_nanochat_head(depth: int, batch: int, iters: int) -> None:
    opts = PretrainOptions(
        depth=depth,
        max_seq_len=2048,
        head_dim=128,
        window_pattern="SSSL",
        device_batch_size=32,
        total_batch_size=-1,
        num_iterations=-1,
    )
    plan = plan_pretrain(opts, vocab_size=32768, device_type="cuda", world_size=8)
    assert plan.total_batch_size == batch
    assert plan.num_iterations == iters
    assert plan.grad_accum_steps == batch // (32 * 2048 * 8)
    assert plan.batch_lr_scale == pytest.approx(math.sqrt(batch / 2**19))
    assert plan.tokens_per_param == pytest.approx(12, rel=1e-3)


def test_plan_cpu_preset_and_gpu_defaults() -> None:
    cpu = plan_pretrain(PretrainOptions(), vocab_size=32768, device_type="cpu")
    assert (cpu.preset, cpu.depth, cpu.max_seq_len, cpu.model_config["window_pattern"]) == (
        "cpu",
        4,
        256,
        "L",
    )
    assert cpu.total_batch_size == cpu.device_batch_size * cpu.max_seq_len  # no grad accumulation
    gpu = plan_pretrain(PretrainOptions(), vocab_size=32768, device_type="cuda")
    assert (gpu.depth, gpu.max_seq_len, gpu.model_config["window_pattern"]) == (20, 2048, "SSSL")
    flops = plan_pretrain(PretrainOptions(target_flops=1e18), vocab_size=32768, device_type="cuda")
    assert flops.num_iterations == round(1e18 / (flops.flops_per_token * flops.total_batch_size))


def test_plan_rejects_batch_that_does_not_divide() -> None:
    opts = PretrainOptions(depth=4, max_seq_len=256, device_batch_size=3, total_batch_size=2048)
    with pytest.raises(UsageError, match="--total-batch-size 2,048 is not a multiple") as e:
        plan_pretrain(opts, vocab_size=512, device_type="cpu")
    assert "--device-batch-size" in str(e.value.hint)


def test_plan_rejects_head_math_that_does_not_divide() -> None:
    with pytest.raises(UsageError, match="depth 5"):
        plan_pretrain(
            PretrainOptions(depth=5, arch="classic", head_dim=128), vocab_size=512, device_type="cpu"
        )


def test_schedules() -> None:
    n = 1000
    assert lr_multiplier(0, n, 40, 0.65, 0.05) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(350, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(1000, n, 40, 0.65, 0.05) == pytest.approx(0.05)
    assert lr_multiplier(675, n, 40, 0.65, 0.05) == pytest.approx(0.5 + 0.5 * 0.05)
    assert muon_momentum(0, 2000, 0.65) == pytest.approx(0.85)
    assert muon_momentum(200, 2000, 0.65) == pytest.approx(0.91)
    assert muon_momentum(400, 2000, 0.65) == pytest.approx(0.97)
    assert muon_momentum(1350, 2000, 0.65) == pytest.approx(0.935)
    assert muon_momentum(2000, 2000, 0.65) == pytest.approx(0.90)
    assert muon_weight_decay(0, n, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(500, n, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(1000, n, 0.2) == pytest.approx(0.0, abs=1e-12)
    ema = LossEMA()
    assert ema.update(4.0) == pytest.approx(4.0)  # debiased: the first value is exact
    assert ema.update(2.0) == pytest.approx((0.9 * 0.1 * 4 + 0.1 * 2) / (1 - 0.81))


def test_dry_run_prints_plan_and_torchrun_command(home: Path) -> None:
    res = runner.invoke(
        app, ["pretrain", "--depth", "12", "--dry-run", "--nproc-per-node", "2", "--device", "cpu", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["details"]["depth"] == 12 and out["details"]["world_size"] == 2
    assert (
        "torch.distributed.run --nproc-per-node=2 --standalone -m nanoctl pretrain"
        in out["details"]["torchrun_command"]
    )
    assert "--dry-run" not in out["details"]["torchrun_command"].split(" -m nanoctl ")[1]
    assert "FLOPs/token" in res.stderr and "grad accum" in res.stderr
    assert not (home / "checkpoints").exists()


# --- bad input ------------------------------------------------------------------------------------------


def test_no_tokenizer_is_a_one_line_error(home: Path) -> None:
    res = runner.invoke(app, ["pretrain", "--device", "cpu", "--num-iterations", "1"])
    assert res.exit_code == 1
    assert "nanoctl tok train" in res.stderr
    assert "Traceback" not in res.output


def test_batch_that_does_not_divide_is_usage_error(run_home: Path) -> None:
    res = runner.invoke(app, ["pretrain", *TINY, "--device-batch-size", "3", "--num-iterations", "2"])
    assert res.exit_code == 2
    assert "error: --total-batch-size 256 is not a multiple" in res.stderr
    # checked before launching workers too: no torchrun noise
    res = runner.invoke(app, ["pretrain", *TINY, "--total-batch-size", "64", "--nproc-per-node", "2"])
    assert res.exit_code == 2
    assert "x 2 = 256" in res.stderr and "launching" not in res.stderr


# --- real runs ------------------------------------------------------------------------------------------


def test_tiny_run_end_to_end_then_skip_then_config_check(run_home: Path) -> None:
    res = pretrain(tiny_opts(save_every=4, keep_last=1))
    ckpt = run_home / "checkpoints" / "base" / TAG
    assert res.final_step == 8 and res.num_iterations == 8
    assert res.val_bpb is not None and math.isfinite(res.val_bpb)
    assert sorted(p.name for p in ckpt.glob("meta_*.json")) == ["meta_000008.json"]  # --keep-last 1
    assert (ckpt / "optim_000008_rank0.pt").exists()
    meta = json.loads((ckpt / "meta_000008.json").read_text())
    assert meta["final"] and meta["val_bpb"] == res.val_bpb and meta["loader_state"]["world_size"] == 1
    got = losses(run_home)
    assert sorted(got) == list(range(1, 9))
    assert got[8] < got[1]  # it learns
    assert (run_home / "reports" / TAG / "pretrain_config.json").exists()

    from nanoctl.checkpoint import load_model

    model, tok, _ = load_model(stage="base", tag=TAG, device="cpu")
    assert model.config.n_layer == 2 and tok.get_vocab_size() == 512

    again = pretrain(tiny_opts())
    assert again.skipped and again.final_step == 8

    with pytest.raises(UsageError, match="different config.*--device-batch-size: 2 -> 4"):
        pretrain(tiny_opts(device_batch_size=4, num_iterations=8))


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 600) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended before {path.name} appeared: {proc.stderr.read() if proc.stderr else ''}"
            )
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(run_home: Path, tmp_path: Path) -> None:
    args = [*TINY, "--num-iterations", "12", "--save-every", "4"]
    # reference: uninterrupted, in another home with the same tokenizer and shards
    ref_home = tmp_path / "ref"
    shutil.copytree(run_home, ref_home)
    ref = cli(ref_home, *args)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    expected = losses(ref_home)
    assert sorted(expected) == list(range(1, 13))

    killed = cli(run_home, *args, env={"NANOCTL_STEP_SLEEP": "0.3"})
    _wait_for(run_home / "checkpoints" / "base" / TAG / "meta_000004.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    ckpt = run_home / "checkpoints" / "base" / TAG
    assert not (ckpt / "meta_000012.json").exists()  # really interrupted

    resumed = cli(run_home, *args)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from step" in err
    got = losses(run_home)
    assert sorted(got) == list(range(1, 13))  # no duplicate or missing steps
    assert got == expected  # bit-identical: same data, same weights, same optimizer state


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(run_home: Path) -> None:
    proc = cli(run_home, *TINY, "--num-iterations", "50", env={"NANOCTL_STEP_SLEEP": "0.3"})
    ckpt = run_home / "checkpoints" / "base" / TAG
    t0 = time.time()
    metrics = run_home / "reports" / TAG / "metrics.jsonl"
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None and time.time() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "rerun the same command to resume" in err
    steps = sorted(int(p.name[5:11]) for p in ckpt.glob("meta_*.json"))
    assert steps and 0 < steps[-1] < 50
    meta = json.loads((ckpt / f"meta_{steps[-1]:06d}.json").read_text())
    assert not meta["final"]


def test_resume_with_different_config_is_one_line_error(run_home: Path) -> None:
    pretrain(tiny_opts(num_iterations=4))
    res = runner.invoke(app, ["pretrain", *TINY, "--num-iterations", "6", "--matrix-lr", "0.05"])
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "different config" in line and "--num-iterations: 4 -> 6" in line and "matrix" in line
    assert "--force" in res.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_grad_accum(run_home: Path, tmp_path: Path) -> None:
    # nanochat's own LR rule (sqrt(B/2^19)) rather than the CPU preset's 0.5: the two runs read different
    # row groups, and at small LRs their per-step losses differ only by the data, not by the learning.
    args = [*TINY, "--num-iterations", "6", "--eval-every", "-1", "--matrix-lr", "0.05", "--lr-scale", "0.05"]
    one_home = tmp_path / "one"
    shutil.copytree(run_home, one_home)
    one = cli(one_home, *args)  # 1 process, grad accumulation 2
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    assert "x 1 process(es) x 2 grad accum" in err

    two = cli(run_home, *args, "--nproc-per-node", "2")  # 2 gloo processes, grad accumulation 1
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    assert "x 2 process(es) x 1 grad accum" in err
    ckpt = run_home / "checkpoints" / "base" / TAG
    assert (ckpt / "optim_000006_rank0.pt").exists() and (ckpt / "optim_000006_rank1.pt").exists()
    a, b = losses(one_home), losses(run_home)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # same init, same total batch and schedule; the ranks read different row groups, so not bit-equal
    for s in a:
        assert abs(a[s] - b[s]) < 0.15, (s, a[s], b[s])
    assert b[6] < b[1] and a[6] < a[1]  # both learn (tiny batch => tiny scaled LRs, so slowly)


@pytest.mark.slow
def test_worker_failure_is_reported_readably(run_home: Path) -> None:
    # a failure inside the workers (not caught by the launcher's own checks) comes back as one line
    proc = cli(run_home, *TINY, "--num-iterations", "2", "--nproc-per-node", "2", "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "worker rank" in err and "--resume: no complete checkpoint" in err


def test_errors_are_nanoctl_errors() -> None:
    assert issubclass(UsageError, NanoctlError)


def test_loss_scaler_skips_overflow_halves_and_grows() -> None:
    import torch

    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    off = LossScaler(False)
    loss = (w * 3).sum()
    assert off.scale_loss(loss) is loss and off.unscale_and_check(opt) and off.state_dict() == {}

    scaler = LossScaler(True, growth_interval=2)
    assert scaler.scale == 2.0**16
    scaler.scale_loss((w * 3).sum()).backward()
    assert scaler.unscale_and_check(opt)
    torch.testing.assert_close(w.grad, torch.full((4,), 3.0))  # divided back exactly
    w.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    assert not scaler.unscale_and_check(opt) and scaler.scale == 2.0**15 and scaler.good_steps == 0
    for _ in range(2):
        w.grad = torch.ones(4)
        assert scaler.unscale_and_check(opt)
    assert scaler.scale == 2.0**16  # grew after growth_interval clean steps
    again = LossScaler(True, scaler.state_dict())
    assert (again.scale, again.good_steps) == (scaler.scale, scaler.good_steps)


def test_fp16_run_uses_loss_scaling_and_saves_its_state(run_home: Path) -> None:
    res = pretrain(tiny_opts(dtype="float16", num_iterations=3, eval_every=-1, model_tag="fp16"))
    meta = json.loads((run_home / "checkpoints" / "base" / "fp16" / "meta_000003.json").read_text())
    scaler = meta["loop_state"]["loss_scaler"]
    assert scaler["scale"] <= 2.0**16 and 1 <= scaler["good_steps"] <= 3
    assert res.final_step == 3 and math.isfinite(losses(run_home, "fp16")[3])


def test_core_metric_during_pretraining(run_home: Path, shared_data: Path) -> None:
    """--core-metric-every runs CORE from the home's bundle and records it; no bundle = a note, no crash."""
    skipped = pretrain(tiny_opts(num_iterations=4, eval_every=-1, core_metric_every=2, model_tag="nocore"))
    assert skipped.core_metric is None and skipped.final_step == 4

    bundle = run_home / "eval" / "bundle"
    bundle.parent.mkdir(parents=True)
    shutil.copytree(shared_data / "eval_bundle", bundle)
    res = pretrain(
        tiny_opts(num_iterations=4, eval_every=-1, core_metric_every=2, core_metric_max_per_task=2,
                  model_tag="core")
    )  # fmt: skip
    assert res.core_metric is not None and -1.0 <= res.core_metric <= 1.0
    meta = json.loads((run_home / "checkpoints" / "base" / "core" / "meta_000004.json").read_text())
    assert meta["core_metric"] == res.core_metric
    logged = [json.loads(x) for x in (run_home / "reports" / "core" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "core_metric" in r] == [2, 4]
