"""CORE: bundle parsing, nanochat's prompt rendering and sampling rules, scoring, the centered metric."""

from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eval_helpers import TINY_TASKS, make_bundle, one_thread, tiny_model, tiny_tokenizer
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.evaluate import core as C
from nanoctl.home import Home


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def test_centered_accuracy_by_hand() -> None:
    assert C.centered_accuracy(0.5, 25.0) == pytest.approx(0.25 / 0.75)
    assert C.centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert C.centered_accuracy(1.0, 62.0) == pytest.approx(1.0)
    assert C.centered_accuracy(0.0, 50.0) == pytest.approx(-1.0)
    assert C.centered_accuracy(0.3, 0.0) == pytest.approx(0.3)


def test_shared_bundle_tasks(shared_data: Path) -> None:
    tasks = C.load_bundle(shared_data / "eval_bundle")
    assert len(tasks) == 22
    by = {t.label: t for t in tasks}
    assert {t.label for t in tasks if not t.present} == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert (by["copa"].baseline, by["copa"].num_fewshot, by["copa"].continuation_delimiter) == (50.0, 0, " ")
    assert (by["arc_easy"].num_fewshot, by["arc_easy"].continuation_delimiter) == (10, "\nAnswer: ")
    assert by["agi_eval_lsat_ar"].num_fewshot == 3 and by["boolq"].baseline == 62.0
    assert by["winograd"].task_type == "schema" and by["jeopardy"].task_type == "language_modeling"
    assert by["bigbench_language_identification"].baseline == pytest.approx(9.1)


def test_render_prompts_match_nanochat_templates() -> None:
    shot = {"query": "Q1?", "choices": ["a1", "b1"], "gold": 1}
    item = {"query": "Q2?", "choices": ["x", "y"], "gold": 0}
    assert C.render_prompts_mc(item, "\nAnswer: ", [shot]) == [
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: x",
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: y",
    ]
    assert C.render_prompts_mc(item, " ") == ["Q2? x", "Q2? y"]
    s_shot = {"context_options": ["c0", "c1"], "gold": 0, "continuation": "cont0"}
    s_item = {"context_options": ["A said", "B said"], "continuation": "it rained", "gold": 1}
    assert C.render_prompts_schema(s_item, " ", [s_shot]) == [
        "c0 cont0\n\nA said it rained",
        "c0 cont0\n\nB said it rained",
    ]
    lm_shot = {"context": "2 + 2 =  ", "continuation": "4"}
    lm_item = {"context": " 3 + 3 = ", "continuation": "6"}
    # contexts are trimmed in the template; the prompt without continuation is stripped
    assert C.render_prompts_lm(lm_item, " ", [lm_shot]) == ["2 + 2 = 4\n\n3 + 3 =", "2 + 2 = 4\n\n3 + 3 = 6"]


def test_find_common_length() -> None:
    assert C.find_common_length([[1, 2, 3, 4], [1, 2, 5]], "left") == 2
    assert C.find_common_length([[9, 3, 4], [1, 2, 3, 4]], "right") == 2
    assert C.find_common_length([[1, 2], [1, 2, 3]], "left") == 2
    assert C.find_common_length([[1], [2]], "left") == 0


def test_fewshot_sampling_is_nanochats() -> None:
    data = [{"i": i} for i in range(20)]
    for idx in (0, 7, 19):
        got = C.fewshot_for(idx, data, 5)
        expected = random.Random(1234 + idx).sample([i for i in range(20) if i != idx], 5)
        assert [d["i"] for d in got] == expected
        assert data[idx] not in got
    # more shots than other items: capped at len - 1 (nanochat raises ValueError here)
    assert len(C.fewshot_for(0, data[:3], 10)) == 2
    assert C.fewshot_for(0, data[:1], 10) == []


def test_shuffle_then_max_per_task(shared_data: Path, tmp_path: Path) -> None:
    bundle = make_bundle(shared_data, tmp_path / "b")
    task = next(t for t in C.load_bundle(bundle) if t.label == "copa")
    lines = [json.loads(x) for x in task.path.read_text().splitlines()]
    random.Random(1337).shuffle(lines)
    assert C.load_task_data(task) == lines
    assert C.load_task_data(task, 5) == lines[:5]


def test_prepare_example_spans(shared_data: Path, tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    bos = tok.get_bos_token_id()
    tasks = {t.label: t for t in C.load_bundle(make_bundle(shared_data, tmp_path / "b"))}
    for _label, task in tasks.items():
        if not task.present:
            continue
        data = C.load_task_data(task)
        ex = C.prepare_example(0, data, task, tok, None)
        for toks, s, e in zip(ex.tokens, ex.starts, ex.ends, strict=True):
            assert toks[0] == bos and 1 <= s < e == len(toks)
        if task.task_type == "multiple_choice":
            assert len(ex.tokens) == len(data[0]["choices"]) and len(set(ex.starts)) == 1
        if task.task_type == "schema":
            suffixes = {tuple(t[s:]) for t, s in zip(ex.tokens, ex.starts, strict=True)}
            assert len(suffixes) == 1  # the shared continuation
        if task.task_type == "language_modeling":
            assert len(ex.tokens) == 1
            assert tok.decode(ex.tokens[0][ex.starts[0] :]).strip() == data[0]["continuation"].strip()
    # cropping keeps the last max_len tokens and shifts the spans
    task = tasks["arc_easy"]
    data = C.load_task_data(task)
    full = C.prepare_example(1, data, task, tok, None)
    cropped = C.prepare_example(1, data, task, tok, 40)
    for ft, fs, ct, cs, ce in zip(
        full.tokens, full.starts, cropped.tokens, cropped.starts, cropped.ends, strict=True
    ):
        assert ct == ft[-40:] and ce == 40 and cs == max(fs - (len(ft) - 40), 1)


def test_core_on_tiny_model_is_deterministic_and_matches_naive(shared_data: Path, tmp_path: Path) -> None:
    bundle = make_bundle(shared_data, tmp_path / "b", rows=6)
    tok = tiny_tokenizer()
    model = tiny_model(seed=1)
    r1 = C.evaluate_core(model, tok, "cpu", bundle)
    r2 = C.evaluate_core(model, tok, "cpu", bundle, batch_rows=3, batch_tokens=1200)
    naive = C.evaluate_core(model, tok, "cpu", bundle, naive=True)
    assert r1.missing == ["hellaswag"] and r1.total_tasks == 5
    assert [t.label for t in r1.tasks] == list(TINY_TASKS)
    for a, b, c in zip(r1.tasks, r2.tasks, naive.tasks, strict=True):
        assert a.accuracy == b.accuracy == c.accuracy
        assert a.examples == 6
        assert (a.accuracy * 6) == pytest.approx(round(a.accuracy * 6))
        base = TINY_TASKS[a.label][4] / 100
        assert a.centered == pytest.approx((a.accuracy - base) / (1 - base))
    assert r1.core == pytest.approx(sum(t.centered for t in r1.tasks) / 4)


def test_batched_scoring_flags_equal_naive_per_example(shared_data: Path, tmp_path: Path) -> None:
    bundle = make_bundle(shared_data, tmp_path / "b", rows=5)
    tok = tiny_tokenizer()
    model = tiny_model(seed=3)
    pad = tok.get_bos_token_id()
    cpu = torch.device("cpu")
    for task in C.load_bundle(bundle):
        if not task.present:
            continue
        data = C.load_task_data(task)
        exs = [C.prepare_example(i, data, task, tok, C.max_positions(model)) for i in range(len(data))]
        naive = [C.evaluate_example_naive(model, e, pad, cpu) for e in exs]
        for share in (False, True):
            batched = C.score_examples_batched(
                model, exs, pad, cpu, batch_rows=5, batch_tokens=2000, share_prefix=share
            )
            assert batched == naive, (task.label, share)
        if task.label == "arc_easy":  # few-shot MC: the shared-context path is really taken
            assert all(C._shares_prefix(e) for e in exs)
    # per-choice losses agree between the shared-context path and a plain forward
    task = next(t for t in C.load_bundle(bundle) if t.label == "arc_easy")
    data = C.load_task_data(task)
    ex = C.prepare_example(0, data, task, tok, None)
    means, _ = C.score_example_shared_prefix(model, ex, pad, cpu)
    for r, (toks, st, en) in enumerate(zip(ex.tokens, ex.starts, ex.ends, strict=True)):
        with torch.no_grad():
            logits = model(torch.tensor([toks]))[0]
        ref = torch.nn.functional.cross_entropy(logits[st - 1 : en - 1], torch.tensor(toks[st:en])).item()
        assert means[r] == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_max_per_task_below_fewshot_count(shared_data: Path, tmp_path: Path) -> None:
    bundle = make_bundle(shared_data, tmp_path / "b")
    res = C.evaluate_core(tiny_model(), tiny_tokenizer(), "cpu", bundle, max_per_task=2, tasks=["arc_easy"])
    (t,) = res.tasks
    assert t.examples == 2 and t.num_fewshot == 2 and t.fewshot_used == 1
    with pytest.raises(UsageError, match="valid"):
        C.evaluate_core(tiny_model(), tiny_tokenizer(), "cpu", bundle, tasks=["nope"])


def test_bundle_resolution(shared_data: Path, tmp_path: Path, home: Path) -> None:
    with pytest.raises(NanoctlError, match="no such directory"):
        C.resolve_bundle(tmp_path / "absent", home=Home(home))
    with pytest.raises(NanoctlError) as e:
        C.resolve_bundle(None, home=Home(home), download=False)
    assert "--bundle" in (e.value.hint or "")
    with pytest.raises(NanoctlError, match="not a CORE eval bundle"):
        C.load_bundle(tmp_path)
    # "download" from a local zip laid out as nanochat's (eval_bundle/ at the top)
    src = make_bundle(shared_data, tmp_path / "src", rows=3)
    zpath = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in src.rglob("*"):
            if p.is_file():
                zf.write(p, Path("eval_bundle") / p.relative_to(src))
    seen: list[int] = []
    got = C.download_bundle(
        home / "eval" / "bundle", lambda done, total: seen.append(done), url=zpath.as_uri()
    )
    assert got == home / "eval" / "bundle" and seen
    assert C.resolve_bundle(None, home=Home(home)) == got
    assert len(C.load_bundle(got)) == 5
    # offline: one clear error naming the way out
    with pytest.raises(NanoctlError) as e:
        C.download_bundle(tmp_path / "x" / "bundle", url="http://127.0.0.1:9/eval_bundle.zip")
    assert "--bundle" in (e.value.hint or "") and not (tmp_path / "x" / "bundle").exists()
