"""Safety of the training-stage framework (train/stage.py), through the CLI, for mid, sft and rl:

- a SIGKILL between checkpoints, then the same command: resumes and reproduces the uninterrupted run's
  per-step losses (rl: rewards) and final weights exactly, with no missing or duplicated step;
- the run-directory lock: a second run on the same directory fails at once naming the first one's pid,
  and a killed run's stale lock does not block the next;
- NaN never lands on disk: rows with no assistant token within the context never give a NaN loss
  (nanochat #590), and a diverging run stops with one error line, every checkpoint on disk still finite;
- a truncated checkpoint is one error line naming the file, with a `--step` hint, no traceback.

Tiny on purpose (a depth-2 model, 128-token context, a few steps): most of the time is process start-up.
"""

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
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from nanoctl.tasks.common import Task  # noqa: E402

VOCAB = 512
SEQ = 128
TAG = "d2"
OUT = "t"  # output tag of the runs under test (the fixture's own sft checkpoint stays sft/d2)


# --- fixtures ------------------------------------------------------------------------------------------------


def conversation(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class CountFormat(Task):
    """SpellingBee's questions answered with a bare `#### N` (N = the true count half of the time): a few SFT
    steps teach the format, so RL rollouts then earn mixed rewards and RL really updates the weights."""

    name = "CountFormat"

    def __init__(self, home: Any, **kw: Any) -> None:
        super().__init__(**kw)
        from nanoctl.tasks.spelling import SpellingBee

        self.bee = SpellingBee(200, "train", home=home)

    def num_examples(self) -> int:
        return len(self.bee)

    def get_example(self, index: int) -> dict[str, Any]:
        from nanoctl.tasks.common import extract_answer

        conv = self.bee[index]
        truth = extract_answer(conv["messages"][-1]["content"][-1]["text"])
        answer = truth if index % 2 else str(index % 3)
        return {"messages": [conv["messages"][0], {"role": "assistant", "content": f"#### {answer}"}]}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A home with a tiny tokenizer, a random-init depth-2 base checkpoint (base/d2@0), an sft checkpoint
    (sft/d2, steps 15 and 30) that answers in SpellingBee's `#### N` format, and conversation files."""
    from nanoctl.checkpoint import save_checkpoint, save_tokenizer_copy
    from nanoctl.home import Home
    from nanoctl.model.gpt import build_model, config_for_depth
    from nanoctl.tasks.starter import install_starter_task_data
    from nanoctl.tokenizer import Tokenizer
    from nanoctl.train.sft import SFTOptions, sft

    root = tmp_path_factory.mktemp("safety") / "home"
    texts = [
        json.loads(line)["question"] + " " + json.loads(line)["answer"]
        for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:500]
    ]
    texts += [
        m["content"]
        for line in (shared_data / "identity" / "identity_conversations.jsonl").read_text().splitlines()[:100]
        for m in json.loads(line)
    ]
    tok = Tokenizer.train_from_iterator(iter(texts), VOCAB)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    config = config_for_depth(2, tok.get_vocab_size(), SEQ, head_dim=64, window_pattern="L")
    model = build_model(config, device="cpu", dtype=torch.float32)
    ckpt = root / "checkpoints" / "base" / TAG
    meta = {"model_config": config.to_dict(), "stage": "base", "device_batch_size": 4}
    save_checkpoint(ckpt, 0, model.state_dict(), None, meta)
    home = Home(root)
    save_tokenizer_copy(ckpt, home)
    install_starter_task_data(home)

    words = ["apple", "banana", "cherry", "grape", "lemon", "melon", "peach", "plum", "kiwi", "mango"]
    write_jsonl(
        root / "convs.jsonl",
        [
            conversation(f"How many a are in {w}? ({i})", f"{w} has {w.count('a')} a. #### {w.count('a')}")
            for i, w in enumerate(words * 7)
        ],
    )
    sft(
        SFTOptions(
            train_task=CountFormat(home), device="cpu", threads=1, num_iterations=30, save_every=15,
            device_batch_size=4, target_examples_per_step=4, init_lr_frac=1.0, eval_every=-1, eval_steps=1,
            eval_metrics_every=-1, metric_tasks=[],
        ),
        home,
    )  # fmt: skip
    assert (root / "checkpoints" / "sft" / TAG / "meta_000030.json").exists()
    return root


@pytest.fixture
def safe_home(artifacts: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(artifacts, home)
    return home


# --- helpers ---------------------------------------------------------------------------------------------------


def cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m nanoctl --home HOME ARGS...` with the hub switched off (everything here is local)."""
    e = {k: v for k, v in os.environ.items() if k != "NANOCTL_STEP_SLEEP"}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "nanoctl", "--home", str(home), *args],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {err[-3000:]}") from None
    return proc.returncode, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def records(home: Path, stage: str, key: str, tag: str = OUT) -> list[dict[str, Any]]:
    """The metrics.jsonl lines holding `key`, in file order (duplicates kept)."""
    path = home / "reports" / tag / stage / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if key in r]


def wait_until(cond: Any, proc: subprocess.Popen[str], what: str, timeout: float = 240) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def load_weights(directory: Path, step: int) -> dict[str, Any]:
    from nanoctl.checkpoint import load_checkpoint

    return load_checkpoint(directory, step)[0]


# --- 1. SIGKILL, then the same command resumes exactly -------------------------------------------------------------

COMMON = ["--device", "cpu", "--threads", "1", "--model-tag", TAG, "--output-tag", OUT]
STAGES = {
    "mid": (
        "loss",
        ["mid", "--data", "{convs}", "--num-iterations", "6", "--save-every", "2", "--device-batch-size", "2",
         "--max-seq-len", "64", "--eval-every", "-1", "--eval-tokens", "128"],
    ),
    "sft": (
        "loss",
        ["sft", "--data", "{convs}", "--num-iterations", "6", "--save-every", "2", "--device-batch-size", "2",
         "--target-examples-per-step", "2", "--eval-every", "-1", "--eval-steps", "1", "--eval-metrics-every",
         "-1"],
    ),
    "rl": (
        "reward",
        ["rl", "--task", "SpellingBee", "--num-iterations", "6", "--save-every", "2", "--examples-per-step", "1",
         "--num-samples", "4", "--device-batch-size", "4", "--max-new-tokens", "6", "--eval-every", "-1",
         "--init-lr-frac", "1.0"],
    ),
}  # fmt: skip


def stage_args(stage: str, home: Path) -> list[str]:
    return [a.replace("{convs}", str(home / "convs.jsonl")) for a in STAGES[stage][1]] + COMMON


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_rerun_resumes_exactly(stage: str, safe_home: Path, tmp_path: Path) -> None:
    key = STAGES[stage][0]
    ref_home = tmp_path / "ref"
    shutil.copytree(safe_home, ref_home)
    code, err = finish(cli(ref_home, *stage_args(stage, ref_home)))
    assert code == 0, err
    expected = records(ref_home, stage, key)
    assert [r["step"] for r in expected] == list(range(1, 7))

    ckpt = safe_home / "checkpoints" / stage / OUT
    killed = cli(safe_home, *stage_args(stage, safe_home), env={"NANOCTL_STEP_SLEEP": "0.3"})
    wait_until((ckpt / "meta_000002.json").exists, killed, "the step-2 checkpoint")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (ckpt / "meta_000006.json").exists()  # really interrupted before the end
    assert killed.returncode == -signal.SIGKILL

    code, err = finish(cli(safe_home, *stage_args(stage, safe_home)))
    assert code == 0, err
    assert "resuming from step" in err, err
    resumed_from = int(err.split("resuming from step ")[1].split()[0])
    assert resumed_from in (2, 4)
    got = records(safe_home, stage, key)
    assert [r["step"] for r in got] == list(range(1, 7))  # none missing, none logged twice
    assert [r[key] for r in got] == [r[key] for r in expected]  # bit-identical, not approximately
    if stage == "rl":  # the rollouts themselves (seeds and data position), not only their mean reward
        assert [r["sequence_length"] for r in got] == [r["sequence_length"] for r in expected]
    ref_w, got_w = load_weights(ref_home / "checkpoints" / stage / OUT, 6), load_weights(ckpt, 6)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    base_w = load_weights(safe_home / "checkpoints" / ("sft" if stage == "rl" else "base") / TAG,
                          30 if stage == "rl" else 0)  # fmt: skip
    assert any(not torch.equal(base_w[k], got_w[k]) for k in got_w)  # it trained: the check is not vacuous


# --- 2. the run-directory lock -------------------------------------------------------------------------------------


def test_second_run_fails_at_once_and_stale_lock_does_not_block(safe_home: Path) -> None:
    args = [*stage_args("sft", safe_home)]
    args[args.index("--num-iterations") + 1] = "10"
    ckpt = safe_home / "checkpoints" / "sft" / OUT
    metrics = safe_home / "reports" / OUT / "sft" / "metrics.jsonl"
    first = cli(safe_home, *args, env={"NANOCTL_STEP_SLEEP": "3"})
    try:
        wait_until(lambda: metrics.exists() and '"loss"' in metrics.read_text(), first, "the first step")
        t0 = time.time()
        code, err = finish(cli(safe_home, *args), timeout=60)
        elapsed = time.time() - t0
        assert first.poll() is None  # the first run was still training when the second gave up
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert code == 1, err
    assert elapsed < 30, elapsed
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert f"is in use by another training run (pid {first.pid})" in errors[0] and str(ckpt) in errors[0]
    assert "Traceback" not in err
    assert not (ckpt / "meta_000010.json").exists()

    code, err = finish(cli(safe_home, *args))  # the killed run's lock file is still there: not a lock
    assert code == 0, err
    assert (ckpt / ".lock").exists() and (ckpt / "meta_000010.json").exists()
    assert [r["step"] for r in records(safe_home, "sft", "loss")] == list(range(1, 11))


# --- 3. NaN never lands on disk --------------------------------------------------------------------------------------


def test_rows_without_assistant_tokens_in_context_never_give_nan(safe_home: Path) -> None:
    """nanochat #590: at --max-seq-len 64, conversations whose user turn alone fills the context have no
    supervised token; here whole runs of them come in a row, so a micro-batch can be made of nothing else."""
    long_q = " ".join(f"word{i}" for i in range(80))  # well over 64 tokens
    rows = []
    for i in range(40):
        rows.append(conversation(f"{long_q} {i}", f"long answer {i}") if i % 4 else conversation(f"q{i}", f"a{i}"))
    data = write_jsonl(safe_home / "long.jsonl", rows)
    from nanoctl.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(safe_home / "tokenizer")
    assert len(tok.encode(long_q)) > 64
    args = ["sft", "--data", str(data), "--max-seq-len", "64", "--num-iterations", "6", "--device-batch-size", "2",
            "--target-examples-per-step", "2", "--eval-every", "2", "--eval-steps", "2", "--eval-metrics-every",
            "-1", "--val-holdout", "8", *COMMON]  # fmt: skip
    code, err = finish(cli(safe_home, *args))
    assert code == 0, err
    losses = [r["loss"] for r in records(safe_home, "sft", "loss")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    vals = [r["val_loss"] for r in records(safe_home, "sft", "val_loss")]
    assert vals and all(math.isfinite(v) for v in vals), vals
    meta = json.loads((safe_home / "checkpoints" / "sft" / OUT / "meta_000006.json").read_text())
    assert meta["data"]["render"]["dropped"] >= 6  # the long rows were really there, and skipped
    assert "dropped (no assistant token left)" in err


@pytest.mark.parametrize(
    ("lr", "stops_on"),
    [
        ("1e30", "training loss became nan at step 2"),  # weights huge but finite after step 1: the loss check
        ("1e38", "training weights became non-finite at step 1"),  # step 1's update overflows: caught at the save
    ],
)
def test_diverging_run_stops_with_one_line_and_leaves_only_finite_checkpoints(
    lr: str, stops_on: str, safe_home: Path
) -> None:
    args = [*stage_args("sft", safe_home), "--matrix-lr", lr, "--embedding-lr", lr, "--unembedding-lr", lr,
            "--scalar-lr", lr]  # fmt: skip
    args[args.index("--save-every") + 1] = "1"
    code, err = finish(cli(safe_home, *args))
    assert code == 1, err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert "became" in errors[0] and "at step" in errors[0] and stops_on in errors[0], errors[0]
    assert "Traceback" not in err
    hint = [line for line in err.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1 and "lr" in hint[0].lower(), err
    from nanoctl.cache import checkpoint_steps

    ckpt = safe_home / "checkpoints" / "sft" / OUT
    steps = checkpoint_steps(ckpt)
    nan_step = int(errors[0].split("at step ")[1].split(";")[0])
    assert all(s < nan_step for s in steps), (steps, nan_step)
    if steps:
        assert f"the last good checkpoint (step {steps[-1]}) is kept" in errors[0]
    else:
        assert "no checkpoint was written" in errors[0]
    for s in steps:
        weights = load_weights(ckpt, s)
        bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
        assert not bad, (s, bad)
    assert not list(ckpt.glob(".*.tmp"))


# --- 4. a corrupt checkpoint is one line ------------------------------------------------------------------------------


def test_truncated_checkpoint_is_one_error_line(safe_home: Path) -> None:
    ckpt = safe_home / "checkpoints" / "sft" / TAG
    latest = ckpt / "model_000030.pt"
    size = latest.stat().st_size
    with open(latest, "r+b") as f:
        f.truncate(size // 2)
    code, err = finish(cli(safe_home, "chat", "-p", "hi", "--stage", "sft", "--tag", TAG, "--device", "cpu",
                           "--max-tokens", "4"), timeout=120)  # fmt: skip
    assert code == 1, err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert str(latest) in errors[0] and "truncated" in errors[0], errors[0]
    hint = [line for line in err.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1 and "--step 15" in hint[0], err
    assert "Traceback" not in err
