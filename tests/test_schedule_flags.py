"""Schedule flags do what their help says. Every stage's `--*-every N` options and `--save-every` follow one
rule, written once (train/schedules.Every, used through Stage.due): N > 0 runs the work every N steps and at
the end, 0 never, -1 at the end only (or never, for the two flags whose help has always said so:
--core-metric-every and rl's --eval-every). Each stage runs 4 steps with N = 2, -1 and 0, and the steps at
which each piece of work ran are read back from metrics.jsonl and the checkpoint directory.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from nanoctl.errors import UsageError  # noqa: E402
from nanoctl.tasks.common import Task  # noqa: E402
from nanoctl.train.schedules import EVERY, EVERY_AFTER_START, EVERY_OR_OFF, Every  # noqa: E402

VOCAB = 512
SEQ = 128
STEPS = 4


def test_the_rule() -> None:
    def steps(rule: Every, every: int) -> list[int]:
        return [s for s in range(STEPS + 1) if rule.due(every, s, s == STEPS)]

    assert steps(EVERY, 2) == [0, 2, 4] and steps(EVERY, 3) == [0, 3, 4]
    assert steps(EVERY, -1) == [4] and steps(EVERY, 0) == [] and steps(EVERY, None) == []  # type: ignore[arg-type]
    assert steps(EVERY_AFTER_START, 2) == [2, 4] and steps(EVERY_AFTER_START, -1) == [4]
    assert steps(EVERY_OR_OFF, 2) == [0, 2, 4] and steps(EVERY_OR_OFF, -1) == [] and steps(EVERY_OR_OFF, 0) == []
    assert EVERY.rule == "-1 = at the end only, 0 = never" and EVERY_OR_OFF.rule == "-1 or 0 = never"
    assert [EVERY.describe(v) for v in (5, -1, 0)] == ["every 5 steps and at the end", "at the end only", "never"]
    assert EVERY_OR_OFF.describe(-1) == "never"


def test_every_help_states_the_sentinels() -> None:
    """Each stage's help says what -1 and 0 mean, in the words of the rule the stage applies."""
    from dataclasses import fields

    from nanoctl.train import mid, pretrain, rl, sft

    for module, cls, stage in (
        (pretrain, pretrain.PretrainOptions, pretrain.Pretrain),
        (mid, mid.MidOptions, mid.Mid),
        (sft, sft.SFTOptions, sft.SFT),
        (rl, rl.RLOptions, rl.RL),
    ):
        helps = {f.name: f.metadata["help"] for f in fields(cls)}
        assert stage.every_flags and set(stage.every_flags) <= set(helps), module
        for name, rule in stage.every_flags.items():
            assert rule.rule in helps[name], (cls.__name__, name, helps[name])
        assert "-1 or 0 = only at the end" in helps["save_every"], cls.__name__


# --- helpers ----------------------------------------------------------------------------------------------------


def logged_steps(metrics: Path, key: str) -> list[int]:
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if key in r]


def saved_steps(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in directory.glob("model_*.pt"))


# --- pretrain -----------------------------------------------------------------------------------------------------


@pytest.fixture
def base_home(home: Path, shared_data: Path) -> Path:
    """A tokenizer, 3 real shards and a 4-row CORE bundle in the home (CORE during training is local only)."""
    import pyarrow.parquet as pq

    from eval_helpers import make_bundle
    from nanoctl.tokenizer import Tokenizer

    texts = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:100]
    Tokenizer.train_from_iterator(iter(texts), vocab_size=VOCAB).save(home / "tokenizer")
    data = home / "data" / "base"
    data.mkdir(parents=True)
    for i, src in enumerate(["shard_00000", "shard_00001", "shard_00008"]):
        shutil.copyfile(shared_data / "pretrain" / f"{src}.parquet", data / f"shard_{i:05d}.parquet")
    make_bundle(shared_data, home / "eval" / "bundle", rows=4, missing=False)
    return home


@pytest.mark.parametrize(
    ("every", "val", "samples", "core", "saves"),
    [(2, [0, 2, 4], [2, 4], [2, 4], [2, 4]), (-1, [4], [4], [], [4]), (0, [], [], [], [4])],
    ids=["N=2", "-1", "0"],
)
def test_pretrain_schedule_flags(
    base_home: Path, monkeypatch: pytest.MonkeyPatch, every: int, val: list[int], samples: list[int],
    core: list[int], saves: list[int],
) -> None:  # fmt: skip
    from nanoctl.train import pretrain as P

    sampled: list[int] = []
    real = P.greedy_samples

    def recording(model: Any, tokenizer: Any, max_tokens: int = 16) -> list[str]:
        sampled.append(inspect.currentframe().f_back.f_locals["step"])  # type: ignore[union-attr]
        return real(model, tokenizer, max_tokens=2)

    monkeypatch.setattr(P, "greedy_samples", recording)
    res = P.pretrain(
        P.PretrainOptions(
            depth=2, head_dim=32, max_seq_len=64, window_pattern="L", device_batch_size=2, total_batch_size=128,
            num_iterations=STEPS, warmup_steps=1, eval_tokens=128, core_metric_max_per_task=2, device="cpu",
            threads=1, eval_every=every, sample_every=every, core_metric_every=every, save_every=every,
            keep_last=0,  # 0 = keep every checkpoint
        ),
        base_home,
    )  # fmt: skip
    metrics = base_home / "reports" / res.model_tag / "metrics.jsonl"
    assert logged_steps(metrics, "val_bpb") == val  # --eval-every -1: once, at the end (it used to be never)
    assert (res.val_bpb is not None) == bool(val)
    assert sampled == samples
    assert logged_steps(metrics, "core_metric") == core
    assert saved_steps(Path(res.checkpoint_dir)) == saves  # N = 2 with --keep-last 0: both kept


def test_pretrain_plan_describes_the_schedule(base_home: Path) -> None:
    from nanoctl.train.pretrain import PretrainOptions, plan_pretrain

    o = dict(depth=2, head_dim=32, max_seq_len=64, num_iterations=4)
    lines = plan_pretrain(PretrainOptions(eval_every=-1, sample_every=0, **o), VOCAB, "cpu").lines()  # type: ignore[arg-type]
    schedule = next(line for line in lines if line.startswith("schedule:"))
    assert "val bpb at the end only" in schedule and "samples never" in schedule and "CORE never" in schedule


def test_every_below_minus_one_is_a_usage_error(base_home: Path) -> None:
    from nanoctl.train.pretrain import PretrainOptions, pretrain

    for bad in ({"eval_every": -2}, {"save_every": -5}):
        with pytest.raises(UsageError) as e:
            pretrain(PretrainOptions(depth=2, head_dim=32, max_seq_len=64, device="cpu", dry_run=True, **bad), base_home)  # type: ignore[arg-type]
        assert "expected N > 0 steps, -1 or 0" in e.value.message and "-1" in (e.value.hint or "")


# --- post-training ------------------------------------------------------------------------------------------------


class PickLetter(Task):
    """A verifiable toy task: 'pick a letter', reward 1 for B."""

    name = "PickLetter"

    def num_examples(self) -> int:
        return 16

    def get_example(self, index: int) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "user", "content": "Pick a letter: A, B, C or D."},
                {"role": "assistant", "content": "ABCD"[index % 4]},
            ]
        }

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        return response.strip() == "B"


@pytest.fixture(scope="module")
def post_artifacts(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A tokenizer, a random-init depth-2 base checkpoint and a conversations file."""
    from nanoctl.checkpoint import save_checkpoint, save_tokenizer_copy
    from nanoctl.home import Home
    from nanoctl.model.gpt import build_model, config_for_depth
    from nanoctl.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("every") / "home"
    lines = (shared_data / "identity" / "identity_conversations.jsonl").read_text().splitlines()[:60]
    texts = [m["content"] for line in lines for m in json.loads(line)]
    tok = Tokenizer.train_from_iterator(iter(texts), VOCAB)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    config = config_for_depth(2, tok.get_vocab_size(), SEQ, head_dim=64, window_pattern="L")
    ckpt = root / "checkpoints" / "base" / "d2"
    model = build_model(config, device="cpu", dtype=torch.float32)
    save_checkpoint(ckpt, 0, model.state_dict(), None, {"model_config": config.to_dict(), "stage": "base"})
    save_tokenizer_copy(ckpt, Home(root))
    (root / "convs.jsonl").write_text("".join(line + "\n" for line in lines[:40]))
    return root


@pytest.fixture
def post_home(post_artifacts: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(post_artifacts, home)
    return home


SENTINELS = pytest.mark.parametrize("every", [2, -1, 0], ids=["N=2", "-1", "0"])
COMMON: dict[str, Any] = dict(device="cpu", threads=1, num_iterations=STEPS)


def post_run(stage: str, opts: Any, home: Path) -> tuple[Path, list[int]]:
    from importlib import import_module

    res = getattr(import_module(f"nanoctl.train.{stage}"), stage)(opts, home)
    assert res.final_step == STEPS
    return home / "reports" / res.model_tag / stage / "metrics.jsonl", saved_steps(Path(res.checkpoint_dir))


def ends(every: int, at_start: bool = True, end_only: bool = True) -> list[int]:
    if every > 0:
        return [0, 2, 4] if at_start else [2, 4]
    return [4] if every == -1 and end_only else []


@SENTINELS
def test_mid_schedule_flags(post_home: Path, every: int) -> None:
    from nanoctl.train.mid import MidOptions

    opts = MidOptions(
        data=[str(post_home / "convs.jsonl")], val_holdout=4, device_batch_size=2, max_seq_len=64,
        eval_tokens=128, eval_every=every, save_every=every, **COMMON,
    )  # fmt: skip
    metrics, saves = post_run("mid", opts, post_home)
    assert logged_steps(metrics, "val_bpb") == ends(every)
    assert saves == ([2, 4] if every > 0 else [4])


@SENTINELS
def test_sft_schedule_flags(post_home: Path, shared_data: Path, every: int) -> None:
    from nanoctl.train.sft import SFTOptions

    opts = SFTOptions(
        data=[str(post_home / "convs.jsonl")], val_holdout=4, data_dir=str(shared_data), metric_tasks=["MMLU"],
        eval_metrics_max_problems=2, device_batch_size=2, target_examples_per_step=2, eval_steps=1,
        eval_every=every, eval_metrics_every=every, save_every=every, **COMMON,
    )  # fmt: skip
    metrics, saves = post_run("sft", opts, post_home)
    assert logged_steps(metrics, "val_loss") == ends(every)
    assert logged_steps(metrics, "acc/MMLU") == ends(every, at_start=False)
    assert saves == ([2, 4] if every > 0 else [4])


@SENTINELS
def test_rl_schedule_flags(post_home: Path, every: int) -> None:
    from nanoctl.train.rl import RLOptions

    opts = RLOptions(
        source="base", train_task=PickLetter(), examples_per_step=1, num_samples=2, device_batch_size=2, max_new_tokens=2,
        eval_examples=2, eval_every=every, save_every=every, **COMMON,
    )  # fmt: skip
    metrics, saves = post_run("rl", opts, post_home)
    assert logged_steps(metrics, "pass@1") == ends(every, end_only=False)  # rl: -1 = never, as its help says
    assert saves == ([2, 4] if every > 0 else [4])
