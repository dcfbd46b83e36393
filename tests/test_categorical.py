"""`nanoctl.evaluate.chat.categorical_accuracy`: the one multiple-choice scorer, behind `nanoctl eval chat`
(ARC-Easy, ARC-Challenge, MMLU) and SFT's in-training accuracy. Checked against a one-problem-at-a-time
full-logits reference, against `eval chat` on a tiny trained checkpoint, and on prompts longer than the
context (cropped to their end, not a crash)."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoctl.errors import NanoctlError
from nanoctl.evaluate import chat as CH
from tiny_chat import random_model, save_model, single_thread, tiny_config, tiny_tokenizer, trained_chat_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


class LongMC:
    """A 3-way multiple-choice task whose odd questions are far longer than a 128-token context."""

    eval_type = "categorical"

    def __init__(self, answers: str, pad: int = 400) -> None:
        self.answers, self.pad = answers, pad

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> dict[str, Any]:
        filler = "Zq9 " * (self.pad // 4) if i % 2 else ""  # bytes the tiny tokenizer never merged
        q = f"{filler}Multiple Choice question: item {i}\n- red=A\n- blue=B\n- green=C\n\nRespond only with the letter."
        return {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": self.answers[i]}],
            "letters": ["A", "B", "C"],
        }

    def evaluate(self, conv: dict[str, Any], response: str) -> bool:
        return response == conv["messages"][-1]["content"]


def reference_correct(model: Any, tok: Any, task: Any, n: int) -> int:
    """The definition, one problem at a time: full logits of the prompt's last `ctx` tokens, the last
    position restricted to the answer letters, argmax."""
    ctx = model.config.sequence_len
    correct = 0
    for i in range(n):
        conv = task[i]
        ids = tok.render_for_completion(conv)[-ctx:]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        letters = conv["letters"]
        predicted = letters[int(logits[CH.letter_token_ids(tok, letters)].argmax())]
        correct += bool(task.evaluate(conv, predicted))
    return correct


def test_prompts_longer_than_the_context_keep_their_end() -> None:
    tok = tiny_tokenizer()
    model = random_model(tiny_config(sequence_len=128), seed=3)
    task = LongMC("ABCABCAB")
    assert len(tok.render_for_completion(task[1])) > 2 * model.config.sequence_len  # must be cropped
    assert len(tok.render_for_completion(task[0])) < model.config.sequence_len
    expected = reference_correct(model, tok, task, len(task)) / len(task)
    fed: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda _m, args: fed.append(args[0].clone()))
    try:
        for batch_size in (1, 3, 8):  # long and short prompts in one BOS-padded batch
            fed.clear()
            acc = CH.categorical_accuracy(
                model, tok, task, max_problems=None, batch_size=batch_size, device="cpu"
            )
            assert acc == expected
            rows = [row for batch in fed for row in batch.tolist()]
            assert len(rows) == len(task)
            for i, row in enumerate(rows):
                prompt = tok.render_for_completion(task[i])[-model.config.sequence_len :]
                assert row[: len(prompt)] == prompt  # the end of a long prompt, then BOS padding
                assert set(row[len(prompt) :]) <= {tok.get_bos_token_id()}
            assert max(len(r) for r in rows) == model.config.sequence_len
    finally:
        hook.remove()
    # max_problems None or <= 0 means all (SFT passes -1)
    assert CH.categorical_accuracy(model, tok, task, max_problems=-1, batch_size=4, device="cpu") == expected


def test_ranks_stride_batches_and_train_mode_is_restored() -> None:
    tok = tiny_tokenizer()
    model = random_model(tiny_config(sequence_len=128), seed=4)
    task = LongMC("ABCABCABCAB")
    full = CH.categorical_accuracy(model, tok, task, max_problems=9, batch_size=2, device="cpu")
    assert full == reference_correct(model, tok, task, 9) / 9
    # batches of 2 over 9 problems, 2 ranks: rank 0 gets problems 0-1, 4-5, 8; rank 1 gets 2-3, 6-7
    model.train()
    parts = [
        CH.categorical_accuracy(
            model, tok, task, max_problems=9, batch_size=2, device="cpu", rank=r, world_size=2
        )
        for r in (0, 1)
    ]
    assert model.training  # put in eval mode for the scoring only
    assert parts[0] * 5 + parts[1] * 4 == pytest.approx(full * 9)
    empty = CH.categorical_accuracy(model, tok, LongMC(""), max_problems=None, batch_size=2, device="cpu")
    assert math.isnan(empty)  # no problem to score


def test_counts_are_summed_when_a_process_group_is_up() -> None:
    import torch.distributed as dist

    tok = tiny_tokenizer()
    model = random_model(tiny_config(sequence_len=128), seed=5)
    task = LongMC("ABCABC")
    alone = CH.categorical_accuracy(model, tok, task, max_problems=None, batch_size=4, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        acc = CH.categorical_accuracy(model, tok, task, max_problems=None, batch_size=4, device="cpu")
    finally:
        dist.destroy_process_group()
    assert acc == alone


def test_letters_must_be_single_tokens() -> None:
    tok = tiny_tokenizer()
    ids = CH.letter_token_ids(tok, ["A", "B", "C", "D"])
    assert ids == [tok.encode(letter)[0] for letter in "ABCD"] and len(set(ids)) == 4

    class TwoTokenLetters:
        def encode(self, text: str) -> list[int]:
            return [1, 2]

    with pytest.raises(NanoctlError, match="single token"):
        CH.letter_token_ids(TwoTokenLetters(), ["A"])


def test_mmlu_score_equals_eval_chat(home: Path, shared_data: Path, tmp_path: Path) -> None:
    """Same checkpoint, same max problems: the function and `nanoctl eval chat -t MMLU` agree (and both
    equal the one-by-one reference; the tiny tokenizer makes every MMLU prompt longer than the context)."""
    from nanoctl.tasks.mmlu import MMLU

    model = trained_chat_model()
    save_model(home, model)  # sft/d2@100 in the NANOCTL_HOME the fixture exported
    data_dir = tmp_path / "tasks"
    data_dir.mkdir()
    (data_dir / "mmlu").symlink_to(shared_data / "mmlu")
    tok = tiny_tokenizer()
    task = MMLU("all", "test", data_dir=data_dir)
    n = 12
    assert all(len(tok.render_for_completion(task[i])) > model.config.sequence_len for i in range(n))
    acc = CH.categorical_accuracy(model, tok, task, max_problems=n, batch_size=5, device="cpu")
    assert acc == reference_correct(model, tok, task, n) / n
    result = CH.run_chat_eval(
        CH.ChatEvalOptions(
            tasks=["MMLU"],
            max_problems=n,
            batch_size=5,
            data_dir=str(data_dir),
            device="cpu",
            progress=False,
            write=False,
        )
    )
    (mmlu,) = result.tasks
    assert (result.stage, result.tag, result.step) == ("sft", "d2", 100)
    assert mmlu.name == "MMLU" and mmlu.problems == n
    assert mmlu.accuracy == acc and mmlu.correct == round(acc * n)
