"""Post-training: rendering masks, batch building, and the base -> mid -> sft -> rl chain on CPU.

A tiny tokenizer (vocab 512, trained on the shared GSM8K + identity text) and a randomly initialized
depth-2 base checkpoint are made once per module; every stage then runs a few steps in a fresh home.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from nanoctl.errors import NanoctlError  # noqa: E402
from nanoctl.tasks.common import Task  # noqa: E402

VOCAB = 512
SEQ = 256


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A home with a tokenizer and a random-init base checkpoint (base/d2@0); copied per test."""
    from nanoctl.checkpoint import save_checkpoint, save_tokenizer_copy
    from nanoctl.home import Home
    from nanoctl.model.gpt import build_model, config_for_depth
    from nanoctl.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("post") / "home"
    texts = [
        json.loads(line)["question"] + " " + json.loads(line)["answer"]
        for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:1500]
    ]
    texts += [
        m["content"]
        for line in (shared_data / "identity" / "identity_conversations.jsonl").read_text().splitlines()[:200]
        for m in json.loads(line)
    ]
    texts += ["Multiple Choice question: Respond only with the letter of the correct answer. A B C D"] * 20
    tok = Tokenizer.train_from_iterator(iter(texts), VOCAB)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    config = config_for_depth(2, tok.get_vocab_size(), SEQ, head_dim=64, window_pattern="L")
    model = build_model(config, device="cpu", dtype=torch.float32)
    ckpt = root / "checkpoints" / "base" / "d2"
    save_checkpoint(
        ckpt,
        0,
        model.state_dict(),
        None,
        {"model_config": config.to_dict(), "stage": "base", "device_batch_size": 4},
    )
    save_tokenizer_copy(ckpt, Home(root))
    return root


@pytest.fixture
def post_home(artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    shutil.copytree(artifacts, home)
    monkeypatch.setenv("NANOCTL_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tok(artifacts: Path) -> Any:
    from nanoctl.tokenizer import Tokenizer

    return Tokenizer.from_directory(artifacts / "tokenizer")


def special(tok: Any, name: str) -> int:
    return tok.encode_special(name)


# --- rendering: ids and masks exactly ------------------------------------------------------------------------


def test_render_gsm8k_tool_conversation(tok: Any) -> None:
    from nanoctl.tasks.gsm8k import parse_solution

    question = "Natalia sold 48 clips. How many?"
    answer = "She sold 48/2 = <<48/2=24>>24 in May.\n#### 24"
    conv = {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": parse_solution(answer)},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    S = lambda name: [special(tok, name)]  # noqa: E731
    E = tok.encode
    # hand-assembled: BOS, user turn (not trained), assistant text (trained), python call (trained),
    # tool output (NOT trained: the engine injects it), more text, <|assistant_end|> (trained)
    pieces = [
        (S("<|bos|>"), 0),
        (S("<|user_start|>") + E(question) + S("<|user_end|>"), 0),
        (S("<|assistant_start|>"), 0),
        (E("She sold 48/2 = "), 1),
        (S("<|python_start|>") + E("48/2") + S("<|python_end|>"), 1),
        (S("<|output_start|>") + E("24") + S("<|output_end|>"), 0),
        (E("24 in May.\n#### 24"), 1),
        (S("<|assistant_end|>"), 1),
    ]
    assert ids == [t for p, _ in pieces for t in p]
    assert mask == [m for p, m in pieces for _ in p]
    # the completion prompt is everything up to and including <|assistant_start|>
    assert tok.render_for_completion(conv) == [t for p, _ in pieces[:3] for t in p]


def test_render_multiple_choice_conversation(tok: Any) -> None:
    from nanoctl.tasks.common import render_mc

    prompt = render_mc("Which is a fruit?", ["A", "B"], ["apple", "rock"])
    assert (
        prompt
        == "Multiple Choice question: Which is a fruit?\n- apple=A\n- rock=B\n\nRespond only with the letter of the correct answer."
    )
    conv = {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A"}],
        "letters": ["A", "B"],
    }
    ids, mask = tok.render_conversation(conv)
    user = [special(tok, "<|user_start|>"), *tok.encode(prompt), special(tok, "<|user_end|>")]
    expected = [
        special(tok, "<|bos|>"),
        *user,
        special(tok, "<|assistant_start|>"),
        *tok.encode("A"),
        special(tok, "<|assistant_end|>"),
    ]
    assert ids == expected
    assert mask == [0] * (1 + len(user) + 1) + [1] * len(tok.encode("A")) + [1]
    assert len(tok.encode("A")) == 1  # the answer letter is one token, as in the prompt's "=A"


# --- batches -----------------------------------------------------------------------------------------------------


class Fixed(Task):
    """Conversations given as a list (name kept for metadata)."""

    def __init__(self, convs: list[dict[str, Any]], name: str = "fixed", **kw: Any) -> None:
        super().__init__(**kw)
        self.convs, self.name = convs, name

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> dict[str, Any]:
        return self.convs[index]


def chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_sft_batches_pad_mask_crop_and_drop(tok: Any) -> None:
    from nanoctl.train.sft import SFTBatches

    convs = [chat("hi", "hello there"), chat("another question", "ok"), chat("x " * 300, "never seen")]
    batches = SFTBatches(tok, Fixed(convs), batch_size=2, max_seq_len=64)
    x, y = next(batches)
    pad = special(tok, "<|assistant_end|>")
    rows = [tok.render_conversation(c) for c in convs[:2]]
    width = max(len(ids) for ids, _ in rows) - 1
    assert x.shape == y.shape == (2, width)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert x[i, :n].tolist() == ids[:-1] and all(t == pad for t in x[i, n:].tolist())
        expect = [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)] + [-1] * (width - n)
        assert y[i].tolist() == expect
    # the third conversation's prompt alone overflows the 64-token context: cropped, then dropped (no
    # assistant token left), never a NaN loss; the stream moves on to the next conversation
    x2, y2 = next(batches)
    assert batches.stats.cropped == 1 and batches.stats.dropped == 1
    assert x2.shape[1] <= 64 and (y2 >= 0).any(dim=1).all()


def test_mid_batches_stream_full_blocks(tok: Any) -> None:
    from nanoctl.train.mid import MidBatches

    convs = [chat(f"question {i}", f"answer number {i} " * (1 + i % 5)) for i in range(20)]
    stream: list[int] = []
    for c in convs:
        stream += tok.render_conversation(c, max_tokens=1 << 30)[0]
    mb = MidBatches(tok, Fixed(convs), 2, 16)
    x, y = next(mb)
    assert x.shape == (2, 16)
    assert x.flatten().tolist() == stream[:32] and y.flatten().tolist() == stream[1:33]  # no masking, no gaps
    while not mb.wrapped:
        next(mb)
    assert mb.cursor >= 20


# --- the chain ---------------------------------------------------------------------------------------------------


def read_meta(directory: Path) -> dict[str, Any]:
    metas = sorted(directory.glob("meta_*.json"))
    return json.loads(metas[-1].read_text())


@pytest.mark.slow
def test_chain_base_mid_sft_rl(post_home: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoctl.train.mid import MidOptions, mid
    from nanoctl.train.rl import RLOptions, rl
    from nanoctl.train.sft import SFTOptions, sft

    monkeypatch.setitem(sys.modules, "datasets", None)  # offline
    d = str(shared_data)
    r_mid = mid(
        MidOptions(
            data_dir=d,
            device="cpu",
            num_iterations=3,
            device_batch_size=2,
            eval_every=-1,
            eval_tokens=2 * 2 * SEQ,
        )
    )
    assert r_mid.final_step == 3 and r_mid.parent == {"stage": "base", "tag": "d2", "step": 0}
    used = {s["name"] for s in r_mid.data["train"] if s["error"] is None}
    assert {"GSM8K", "identity", "SimpleSpelling", "SpellingBee"} <= used
    assert r_mid.val_loss is not None and r_mid.val_loss > 0
    mid_meta = read_meta(post_home / "checkpoints" / "mid" / "d2")
    assert mid_meta["stage"] == "mid" and mid_meta["final"] and mid_meta["parent"]["stage"] == "base"
    assert (post_home / "reports" / "d2" / "mid" / "metrics.jsonl").exists()

    r_sft = sft(
        SFTOptions(
            data_dir=d,
            device="cpu",
            num_iterations=3,
            device_batch_size=2,
            target_examples_per_step=2,
            eval_every=-1,
            eval_steps=1,
            eval_metrics_every=-1,
            eval_metrics_max_problems=4,
        )
    )
    assert r_sft.parent == {"stage": "mid", "tag": "d2", "step": 3}  # sft starts from mid
    assert r_sft.val_loss is not None and r_sft.val_loss == r_sft.val_loss  # finite, not NaN
    assert set(r_sft.metrics) == {"MMLU", "ARC-Easy"} and all(0 <= a <= 1 for a in r_sft.metrics.values())

    r_rl = rl(
        RLOptions(
            data_dir=d,
            device="cpu",
            num_iterations=2,
            examples_per_step=1,
            num_samples=2,
            device_batch_size=2,
            max_new_tokens=8,
            eval_every=2,
            eval_examples=2,
        )
    )
    assert r_rl.parent == {"stage": "sft", "tag": "d2", "step": 3}
    assert len(r_rl.metrics["reward_history"]) == 2 and len(r_rl.metrics["pass@k"]) == 2
    assert "held out" in r_rl.data["note"]  # GSM8K test is not available offline
    assert read_meta(post_home / "checkpoints" / "rl" / "d2")["parent"]["stage"] == "sft"

    # a finished stage is left alone; --force redoes it
    again = sft(
        SFTOptions(
            data_dir=d,
            device="cpu",
            num_iterations=3,
            device_batch_size=2,
            target_examples_per_step=2,
            eval_every=-1,
            eval_steps=1,
            eval_metrics_every=-1,
            eval_metrics_max_problems=4,
        )
    )
    assert again.skipped and again.final_step == 3


def test_sft_resume_after_stop(post_home: Path, tmp_path: Path) -> None:
    """A run stopped mid-way (save_every) resumes from its checkpoint to the same final step."""
    from nanoctl.train.sft import SFTOptions, sft

    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
            for i in range(40)
        )
        + "\n"
    )
    opts = dict(
        data=[str(data)],
        device="cpu",
        num_iterations=6,
        device_batch_size=2,
        target_examples_per_step=2,
        eval_every=-1,
        eval_steps=1,
        eval_metrics_every=-1,
        metric_tasks=[],
        save_every=3,
    )
    full = sft(SFTOptions(**opts))
    ckpt = Path(full.checkpoint_dir)
    final_state = torch.load(ckpt / "model_000006.pt", weights_only=True)
    # simulate a kill after step 3: drop the final step, rerun the same command
    for f in ckpt.glob("*_000006*"):
        f.unlink()
    resumed = sft(SFTOptions(**opts))
    assert resumed.resumed_from == 3 and resumed.final_step == 6
    again = torch.load(ckpt / "model_000006.pt", weights_only=True)
    assert all(
        torch.allclose(final_state[k], again[k], atol=1e-5) for k in final_state
    )  # exact data position


@pytest.mark.slow
def test_sft_learns_identity_answer(post_home: Path, tmp_path: Path) -> None:
    """SFT on a toy identity task drives the loss down and the model then answers it (greedy)."""
    from nanoctl.checkpoint import load_model
    from nanoctl.engine import Engine, SamplingParams
    from nanoctl.train.sft import SFTOptions, sft

    data = tmp_path / "identity.jsonl"
    rows = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": "My name is Zorblax."}]
        for q in ("What is your name?", "Who are you?", "Your name?", "Name please")
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows * 8) + "\n")
    result = sft(
        SFTOptions(
            data=[str(data)],
            device="cpu",
            num_iterations=60,
            device_batch_size=4,
            target_examples_per_step=4,
            init_lr_frac=1.0,
            eval_every=30,
            eval_steps=1,
            eval_metrics_every=-1,
            metric_tasks=[],
            val_holdout=0,
            output_tag="toy",
        )
    )
    losses = [
        json.loads(line)["loss"]
        for line in (post_home / "reports" / "toy" / "sft" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    model, tok, meta = load_model(stage="sft", tag="toy", device="cpu")
    assert meta["parent"]["stage"] == "base"  # no mid checkpoint here: sft falls back to base
    prompt = tok.render_for_completion(
        {
            "messages": [
                {"role": "user", "content": "What is your name?"},
                {"role": "assistant", "content": ""},
            ]
        }
    )
    seqs, _ = Engine(model, tok).generate_batch(prompt, SamplingParams(temperature=0.0, max_tokens=32))
    assert "Zorblax" in tok.decode(seqs[0][len(prompt) :]), result


class PickLetter(Task):
    """Synthetic verifiable task: 'pick a letter'; the reward is 1 for B only."""

    name = "PickLetter"

    def __init__(self, n: int = 64, **kw: Any) -> None:
        super().__init__(**kw)
        self.n = n

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict[str, Any]:
        return chat("Pick a letter: A, B, C or D.", "ABCD"[index % 4])

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        return response.strip() == "B"


@pytest.mark.slow
def test_rl_raises_mean_reward(post_home: Path) -> None:
    """SFT teaches uniform answers (reward ~0.25); RL then measurably prefers the rewarded one."""
    from nanoctl.train.rl import RLOptions, rl
    from nanoctl.train.sft import SFTOptions, sft

    sft(
        SFTOptions(
            train_task=PickLetter(),
            device="cpu",
            num_iterations=40,
            device_batch_size=4,
            target_examples_per_step=4,
            init_lr_frac=1.0,
            eval_every=-1,
            eval_steps=1,
            eval_metrics_every=-1,
            metric_tasks=[],
        )
    )
    result = rl(
        RLOptions(
            train_task=PickLetter(),
            device="cpu",
            num_iterations=8,
            examples_per_step=2,
            num_samples=8,
            device_batch_size=8,
            max_new_tokens=3,
            init_lr_frac=0.5,
            eval_every=-1,
            seed=0,
        )
    )
    hist = result.metrics["reward_history"]  # step 1's rollouts come before any update
    assert hist[0] < 0.5, hist  # the SFT model is not already solved (~0.25 expected)
    assert sum(hist[-3:]) / 3 > hist[0] + 0.3, hist


# --- errors and CLI ----------------------------------------------------------------------------------------------


def test_missing_parent_names_command(home: Path) -> None:
    from nanoctl.train.rl import RLOptions, rl
    from nanoctl.train.sft import SFTOptions, sft

    with pytest.raises(NanoctlError) as e:
        sft(SFTOptions(device="cpu"))
    assert "no mid or base checkpoint" in e.value.message and "nanoctl pretrain" in (e.value.hint or "")
    with pytest.raises(NanoctlError) as e:
        rl(RLOptions(device="cpu"))
    assert "nanoctl sft" in (e.value.hint or "")


def test_cli_errors_and_dry_run(post_home: Path, tmp_path: Path, shared_data: Path) -> None:
    from nanoctl.cli.main import app

    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n[{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]\n'
    )
    r = runner.invoke(app, ["sft", "--data", str(bad), "--device", "cpu"])
    assert r.exit_code == 1
    assert f"{bad}:2: message 1 has unknown role 'bot'" in r.stderr and r.stderr.count("\n") <= 2
    r = runner.invoke(app, ["sft", "--data", str(tmp_path / "nope.jsonl"), "--device", "cpu"])
    assert r.exit_code == 1 and "does not exist" in r.stderr
    r = runner.invoke(
        app,
        [
            "sft",
            "--target-examples-per-step",
            "6",
            "--device-batch-size",
            "4",
            "--device",
            "cpu",
            "--data-dir",
            str(shared_data),
        ],
    )
    assert r.exit_code == 2 and "--target-examples-per-step 6" in r.stderr
    r = runner.invoke(app, ["mid", "--dry-run", "--device", "cpu", "--data-dir", str(shared_data), "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert (
        plan["skipped"]
        and any("MISSING" in line for line in plan["plan"])
        and plan["parent"]["stage"] == "base"
    )
    r = runner.invoke(app, ["rl", "--device", "cpu"])
    assert r.exit_code == 1 and "nanoctl sft" in r.stderr
