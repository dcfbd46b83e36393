"""bits-per-byte by hand, chat-eval scoring (categorical batching, pass@k, ChatCORE), `eval base` end to end
on a tiny checkpoint, and the CLI's one-line errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from eval_helpers import make_bundle, one_thread, populate_home, tiny_model, tiny_tokenizer
from nanoctl.cli.main import app
from nanoctl.engine import SamplingParams
from nanoctl.errors import UsageError
from nanoctl.evaluate import chat as CH
from nanoctl.evaluate.bpb import bpb_sums, evaluate_bpb
from nanoctl.home import Home


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


# --- bits per byte ------------------------------------------------------------------------------------------


def test_bpb_sums_by_hand() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, float("inf")])
    targets = torch.tensor([0, -1, 2, 1, 3])
    token_bytes = torch.tensor([1, 3, 2, 0], dtype=torch.int32)  # id 3 is a special token (0 bytes)
    nats, nbytes = bpb_sums(losses, targets, token_bytes)
    # counted: pos0 (1 byte, 1.0 nat), pos2 (2 bytes, 3.0), pos3 (3 bytes, 4.0); -1 and the special skipped
    assert nats.item() == pytest.approx(8.0) and nbytes.item() == 6


def test_bpb_of_a_known_string_matches_hand_computation() -> None:
    tok = tiny_tokenizer()
    model = tiny_model(seed=4)
    text = "The quick brown fox jumps over the lazy dog."  # ASCII: each token decodes to whole bytes
    ids = tok.encode(text, prepend=tok.get_bos_token_id())
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([ids[1:]])
    with torch.no_grad():
        logp = F.log_softmax(model(x)[0], dim=-1)
    nats = -sum(logp[i, t].item() for i, t in enumerate(ids[1:]))
    nbytes = sum(len(tok.decode([t]).encode("utf-8")) for t in ids[1:])
    assert nbytes == len(text)
    expected = nats / (math.log(2) * nbytes)
    from nanoctl.tokenizer import SPECIAL_TOKENS

    specials = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    token_bytes = torch.tensor(
        [0 if i in specials else len(tok.decode([i]).encode()) for i in range(tok.get_vocab_size())],
        dtype=torch.int32,
    )
    got = evaluate_bpb(model, [(x, y)], 1, token_bytes)
    assert got == pytest.approx(expected, rel=1e-5)
    # two identical batches give the same mean; BOS as a target (0 bytes) does not count
    y2 = y.clone()
    y2[0, 0] = tok.get_bos_token_id()
    assert evaluate_bpb(model, [(x, y), (x, y)], 2, token_bytes) == pytest.approx(expected, rel=1e-5)
    assert evaluate_bpb(model, [(x, y2)], 1, token_bytes) != pytest.approx(expected, rel=1e-9)
    assert evaluate_bpb(model, [], 1, token_bytes) == math.inf


# --- chat eval ----------------------------------------------------------------------------------------------


class TinyMC:
    """A categorical task in the tasks package's conversation format (letters + evaluate)."""

    eval_type = "categorical"
    name = "TinyMC"

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q = f"Multiple Choice question: item {i} {'x' * i}\n- red=A\n- blue=B\n- green=C\n\nRespond only with the letter."
        return {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": self.answers[i]}],
            "letters": ["A", "B", "C"],
        }

    def evaluate(self, conv: dict[str, Any], response: str) -> bool:
        return response == conv["messages"][-1]["content"]


class EchoTask:
    eval_type = "generative"
    name = "Echo"

    def __init__(self, n: int, ok: bool) -> None:
        self.n, self.ok = n, ok

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]
        }

    def evaluate(self, conv: dict[str, Any], response: str) -> bool:
        return self.ok and isinstance(response, str)


def test_categorical_batched_equals_one_by_one_full_logits() -> None:
    tok = tiny_tokenizer()
    model = tiny_model(seed=5)
    task = TinyMC(["A", "B", "C", "A", "B", "C", "A"])
    letter_ids = CH.letter_token_ids(tok, ["A", "B", "C"])
    expected = 0
    for i in range(len(task)):
        conv = task[i]
        ids = tok.render_for_completion(conv)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        pred = "ABC"[int(logits[letter_ids].argmax())]
        expected += pred == conv["messages"][-1]["content"]
    for bs in (1, 3, 8):
        seen: list[tuple[int, int]] = []
        acc = CH.categorical_accuracy(
            model,
            tok,
            task,
            max_problems=None,
            batch_size=bs,
            device="cpu",
            progress=lambda d, n, a, seen=seen: seen.append((d, n)),
        )
        assert acc == expected / 7
        assert seen[-1] == (7, 7)
    seen = []
    tick = lambda d, n, a: seen.append((d, n))
    CH.categorical_accuracy(model, tok, task, max_problems=2, batch_size=4, device="cpu", progress=tick)
    assert seen == [(2, 2)]


def test_generative_pass_at_k() -> None:
    tok = tiny_tokenizer()
    model = tiny_model(seed=6, sequence_len=64)
    sampled = SamplingParams(temperature=1.0, top_k=5, max_tokens=4)
    solved, total, passk = CH.run_generative(model, tok, EchoTask(3, True), sampled, num_samples=2)
    assert (solved, total, passk) == (3, 3, [1.0, 1.0])
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    solved, total, passk = CH.run_generative(model, tok, EchoTask(2, False), greedy, max_problems=1)
    assert (solved, total, passk) == (0, 1, [0.0])


def test_chatcore_math() -> None:
    rows = [
        CH.ChatTaskResult("ARC-Easy", "categorical", 4, 2, 0.5, 0.25, CH.centered(0.5, 0.25), 0.0),
        CH.ChatTaskResult("GSM8K", "generative", 10, 1, 0.1, 0.0, CH.centered(0.1, 0.0), 0.0),
    ]
    assert rows[0].centered == pytest.approx(1 / 3)
    assert CH.chatcore(rows) == pytest.approx((1 / 3 + 0.1) / 2)
    assert CH.chatcore(rows, categorical_only=True) == pytest.approx(1 / 3)
    assert CH.chatcore([]) is None


def test_unknown_task_lists_valid_ones(home: Path) -> None:
    with pytest.raises(UsageError) as e:
        CH.build_tasks(["GSM9K"], None, Home(home))
    assert "GSM8K" in (e.value.hint or "") and "MMLU" in (e.value.hint or "")
    with pytest.raises(UsageError):
        CH.run_chat_eval(CH.ChatEvalOptions(tasks=["ARC-Easy"], num_samples=0), home=home)


# --- eval base end to end + CLI --------------------------------------------------------------------------------


def test_eval_base_end_to_end(home: Path, shared_data: Path, tmp_path: Path) -> None:
    from nanoctl.evaluate.base import BaseEvalOptions, eval_base

    populate_home(home, tag="d2", step=5)
    bundle = make_bundle(shared_data, tmp_path / "bundle", rows=4)
    res = eval_base(
        BaseEvalOptions(
            bundle=str(bundle),
            max_per_task=3,
            core_tasks=["copa", "winograd"],
            device="cpu",
            device_batch_size=2,
            split_tokens=512,
            sample_tokens=4,
            unconditioned_samples=2,
            unconditioned_tokens=8,
            progress=False,
        ),
        home=home,
    )
    assert (res.stage, res.tag, res.step) == ("base", "d2", 5)
    assert res.core is not None and [t["label"] for t in res.core["tasks"]] == ["copa", "winograd"]
    assert set(res.bpb) == {"train", "val"} and all(0 < v < 20 for v in res.bpb.values())
    assert len(res.samples) == 7 + 2
    saved = json.loads(Path(res.json_path).read_text())  # type: ignore[arg-type]
    assert saved["kind"] == "base" and saved["results"]["bpb"] == res.bpb
    assert saved["settings"]["max_per_task"] == 3 and saved["hardware"]["device"] == "cpu"
    assert Path(res.json_path).parent == home / "reports" / "d2"  # type: ignore[arg-type]
    md = Path(res.markdown_path).read_text()  # type: ignore[arg-type]
    assert "## CORE" in md and "| copa |" in md and "## Bits per byte" in md


def test_cli_errors_are_one_line(home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "chat", "-t", "Nope"])
    assert r.exit_code == 2 and "unknown chat eval task" in r.output and "GSM8K" in r.output
    r = runner.invoke(app, ["eval", "base", "--bundle", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such directory" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "base", "--eval", "core,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output
    r = runner.invoke(app, ["eval", "base", "--eval", "bpb"])
    assert r.exit_code == 1 and "nanoctl pretrain" in r.output  # no checkpoint yet
    r = runner.invoke(app, ["eval", "chat", "-t", "ARC-Easy", "--data-dir", str(tmp_path)])
    assert r.exit_code != 0 and "Traceback" not in r.output


def _task_data_dir(shared: Path, dest: Path) -> Path:
    """ARC/MMLU/words from the shared data; a GSM8K "test" file and a 2-problem HumanEval file made here."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("eval_bundle", "mmlu", "words"):
        (dest / name).symlink_to(shared / name)
    (dest / "gsm8k").mkdir()
    with open(shared / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        (dest / "gsm8k" / "test.jsonl").write_text("".join(next(f) for _ in range(3)), encoding="utf-8")
    (dest / "humaneval").mkdir()
    problems = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f"def f{i}(x):\n    '''return x + {i}'''\n",
            "canonical_solution": f"    return x + {i}\n",
            "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
            "entry_point": f"f{i}",
        }
        for i in range(2)
    ]
    (dest / "humaneval" / "HumanEval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    return dest


def test_eval_chat_end_to_end_all_six_tasks(home: Path, shared_data: Path, tmp_path: Path) -> None:
    populate_home(home, tag="d2", step=3, stage="sft", model=tiny_model(seed=7, sequence_len=512))
    data_dir = _task_data_dir(shared_data, tmp_path / "tasks")
    res = CH.run_chat_eval(
        CH.ChatEvalOptions(
            max_problems=2,
            max_new_tokens=6,
            batch_size=2,
            data_dir=str(data_dir),
            device="cpu",
            progress=False,
        ),
        home=home,
    )
    assert (res.stage, res.tag, res.step) == ("sft", "d2", 3) and res.complete
    names = [t.name for t in res.tasks]
    assert names == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    for t in res.tasks:
        assert t.problems == 2 and 0.0 <= t.accuracy <= 1.0
        assert t.centered == pytest.approx((t.accuracy - t.baseline) / (1 - t.baseline))
        assert (t.pass_at_k is None) == (t.eval_type == "categorical")
    assert res.chatcore == pytest.approx(sum(t.centered for t in res.tasks) / 6)
    saved = json.loads(Path(res.json_path).read_text())  # type: ignore[arg-type]
    assert saved["kind"] == "chat" and saved["results"]["chatcore"] == pytest.approx(res.chatcore)
    assert "| **ChatCORE** |" in Path(res.markdown_path).read_text()  # type: ignore[arg-type]
    # the CLI path: --json on stdout, a subset of tasks, stage picked as the newest chat stage
    r = CliRunner().invoke(
        app, ["eval", "chat", "-t", "mmlu", "-x", "2", "--data-dir", str(data_dir), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert [t["name"] for t in json.loads(r.output)["tasks"]] == ["MMLU"]


def test_humaneval_without_a_sandbox_stops_or_skips(
    home: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No bwrap on PATH: asked for by name, HumanEval stops with one line naming what is missing and
    # --unsafe-exec; in the default set it is skipped with a warning; --unsafe-exec runs it anyway.
    from nanoctl.tools import isolation

    populate_home(home, tag="d2", step=3, stage="sft", model=tiny_model(seed=7, sequence_len=512))
    data_dir = _task_data_dir(shared_data, tmp_path / "tasks")
    monkeypatch.setenv("PATH", "/nonexistent")
    isolation.probe.cache_clear()
    try:
        r = CliRunner().invoke(app, ["eval", "chat", "-t", "HumanEval", "-x", "1", "--data-dir", str(data_dir)])
        assert r.exit_code == 1
        assert "sandbox is unavailable" in r.output and "bubblewrap" in r.output and "--unsafe-exec" in r.output
        assert "Traceback" not in r.output
        r = CliRunner().invoke(app, ["eval", "--check-sandbox"])
        assert r.exit_code == 1 and "refused" in r.output
        opts = dict(max_problems=1, max_new_tokens=4, batch_size=2, data_dir=str(data_dir), device="cpu", progress=False)
        res = CH.run_chat_eval(CH.ChatEvalOptions(**opts), home=home)  # type: ignore[arg-type]
        assert "HumanEval" not in [t.name for t in res.tasks] and not res.complete
        assert "skipping HumanEval" in capsys.readouterr().err
        res = CH.run_chat_eval(CH.ChatEvalOptions(tasks=["HumanEval"], unsafe_exec=True, **opts), home=home)  # type: ignore[arg-type]
        assert [t.name for t in res.tasks] == ["HumanEval"] and res.tasks[0].problems == 1
        assert "--unsafe-exec" in capsys.readouterr().err
    finally:
        isolation.probe.cache_clear()


def test_check_sandbox_and_doctor_report_the_layers(home: Path) -> None:
    from nanoctl.tools import sandbox

    isolated = sandbox.layers().isolated
    r = CliRunner().invoke(app, ["eval", "--check-sandbox"])
    assert r.exit_code == (0 if isolated else 1), r.output
    for layer in ("bubblewrap", "namespaces", "seccomp", "rlimits", "python guard"):
        assert layer in r.output
    r = CliRunner().invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["sandbox"]["isolated"] is isolated
    assert {row["layer"] for row in report["sandbox"]["layers"]} >= {"bubblewrap", "seccomp", "python guard"}
    assert report["home"] == str(home.resolve())
