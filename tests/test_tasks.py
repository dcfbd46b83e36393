"""Tasks: rendering to conversations exactly as nanochat, scoring, mixtures, local loaders, validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nanoctl.conversations import load_conversations, validate_conversation
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.tasks import TASK_INFO, TaskMixture, TaskSequence, get_task, list_tasks, render_mc
from nanoctl.tasks.arc import ARC, normalize_row
from nanoctl.tasks.common import Task, TaskSlice, extract_answer, hub_permutation
from nanoctl.tasks.gsm8k import GSM8K, parse_solution
from nanoctl.tasks.humaneval import extract_imports, extract_program
from nanoctl.tasks.mixtures import build_mixture
from nanoctl.tasks.mmlu import MMLU
from nanoctl.tasks.spelling import SimpleSpelling, SpellingBee


class Numbers(Task):
    """A toy task: example i is a conversation whose answer is str(base + i)."""

    def __init__(self, n: int, base: int = 0, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.n, self.base = n, base
        self.name = f"numbers{base}"

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {
            "messages": [
                {"role": "user", "content": "n?"},
                {"role": "assistant", "content": str(self.base + index)},
            ]
        }


def answers(task: Task) -> list[str]:
    return [conv["messages"][-1]["content"] for conv in task]


# --- multiple choice ---------------------------------------------------------------------------------------


def test_render_mc_exact_format() -> None:
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\nRespond only with the letter of the correct answer."
    )


def test_mmlu_local_csv_both_layouts(tmp_path: Path, shared_data: Path) -> None:
    task = MMLU("all", "dev", path=shared_data / "mmlu" / "dev" / "abstract_algebra_dev.csv")
    assert len(task) == 5
    conv = next(c for c in task if "Z_3[x]/(x^2 + c)" in c["messages"][0]["content"])
    assert conv["messages"][0]["content"] == (
        "Multiple Choice question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
        "- 0=A\n- 1=B\n- 2=C\n- 3=D\n\nRespond only with the letter of the correct answer."
    )
    assert conv["messages"][1]["content"] == "B"
    assert conv["subject"] == "abstract_algebra" and tuple(conv["letters"]) == ("A", "B", "C", "D")
    assert task.eval_type == "categorical"
    assert task.evaluate(conv, "B") and not task.evaluate(conv, "A")
    # the raw hendrycks layout: no header, the answer as a letter
    raw = tmp_path / "mmlu" / "test"
    raw.mkdir(parents=True)
    (raw / "anatomy_test.csv").write_text('"Q one?",a,b,c,d,C\n"Q two?",e,f,g,h,A\n')
    t2 = MMLU("all", "test", data_dir=tmp_path)
    got = {c["messages"][0]["content"].split("\n")[0]: c["messages"][1]["content"] for c in t2}
    assert got == {"Multiple Choice question: Q one?": "C", "Multiple Choice question: Q two?": "A"}


def test_mmlu_full_test_split(shared_data: Path) -> None:
    task = MMLU("all", "test", data_dir=shared_data)
    assert len(task) == 14042
    assert len(MMLU("all", "test", data_dir=shared_data, stop=5200)) == 5200


def test_arc_core_bundle_adapter(shared_data: Path) -> None:
    path = shared_data / "eval_bundle" / "eval_data" / "world_knowledge" / "arc_easy.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    question, letters, choices, answer = normalize_row(first, "x")
    assert question == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert letters == ["A", "B", "C", "D"] and answer == "A" and choices[0].startswith("Sunlight")
    easy = ARC("ARC-Easy", "test", data_dir=shared_data)
    assert len(easy) == 2376 and easy.eval_type == "categorical"
    assert len(ARC("ARC-Challenge", "test", data_dir=shared_data)) == 1172
    conv = easy[0]
    assert conv["messages"][0]["content"].startswith("Multiple Choice question: ")
    assert conv["messages"][1]["content"] in conv["letters"]
    assert easy.evaluate(conv, conv["messages"][1]["content"])


def test_arc_hub_and_ai2_formats() -> None:
    hub = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    assert normalize_row(hub, "r") == ("Q?", ["1", "2", "3"], ["x", "y", "z"], "2")
    ai2 = {
        "question": {"stem": "S?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
        "answerKey": "B",
    }
    assert normalize_row(ai2, "r") == ("S?", ["A", "B"], ["a", "b"], "B")
    with pytest.raises(NanoctlError, match="not one of the labels"):
        normalize_row({**hub, "answerKey": "E"}, "r")


# --- GSM8K --------------------------------------------------------------------------------------------------


def test_gsm8k_tool_call_parts() -> None:
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    assert parse_solution(answer) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert parse_solution("<<5>>") == [
        {"type": "text", "text": ""},
        {"type": "python", "text": "5"},
        {"type": "python_output", "text": ""},
        {"type": "text", "text": ""},
    ]


def test_gsm8k_local_file_and_scoring(shared_data: Path) -> None:
    task = GSM8K("main", "train", data_dir=shared_data)
    assert len(task) == 7473 and task.eval_type == "generative"
    # shuffled like datasets.shuffle(seed=42): row 0 is original row perm[0]
    raw = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()]
    assert task[0]["messages"][0]["content"] == hub_permutation(raw)[0]["question"]
    conv = task[0]
    gold = extract_answer(conv["messages"][1]["content"][-1]["text"])
    assert gold is not None
    assert task.evaluate(conv, f"blah\n#### {gold}") is True
    assert task.reward(conv, f"#### {gold}") == 1.0
    assert task.reward(conv, f"#### {gold}1") == 0.0
    assert task.reward(conv, "no marker") == 0.0
    assert extract_answer("so #### 1,234.") == "1234."
    assert extract_answer("#### -7") == "-7"


def test_hub_permutation_is_numpy_default_rng() -> None:
    import numpy as np

    rows = list(range(50))
    assert hub_permutation(rows) == [int(i) for i in np.random.default_rng(42).permutation(50)]


# --- spelling -----------------------------------------------------------------------------------------------


def test_spellingbee_deterministic_and_correct(shared_data: Path) -> None:
    a = SpellingBee(50, "train", data_dir=shared_data)
    b = SpellingBee(50, "train", data_dir=shared_data)
    test = SpellingBee(50, "test", data_dir=shared_data)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert a[0] != test[0]
    for conv in a:
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        expr = parts[2]["text"]  # 'word'.count('x')
        word, letter = expr.split("'")[1], expr.split("'")[3]
        assert parts[3]["text"] == str(word.count(letter))
        assert parts[4]["text"].endswith(f"#### {word.count(letter)}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert a.evaluate(conv, f"#### {word.count(letter)}")
        assert not a.evaluate(conv, f"#### {word.count(letter) + 1}")


def test_simplespelling(shared_data: Path) -> None:
    task = SimpleSpelling(20, "train", data_dir=shared_data)
    for conv in task:
        word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
        assert conv["messages"][1]["content"] == f"{word}:{','.join(word)}"


def test_missing_word_list_names_flag(home: Path) -> None:
    with pytest.raises(NanoctlError) as e:
        SpellingBee(10, "train", data_dir=home / "nothing")
    assert "words_alpha.txt" in e.value.message and "--data-dir" in (e.value.hint or "")


# --- mixtures -----------------------------------------------------------------------------------------------


def test_task_slicing() -> None:
    t = Numbers(10, start=2, stop=9, step=3)
    assert len(t) == 3 and answers(t) == ["2", "5", "8"]
    assert len(Numbers(10, stop=100)) == 10  # stop beyond the size is capped
    assert answers(Numbers(4)) == ["0", "1", "2", "3"] and Numbers(4)[-1]["messages"][1]["content"] == "3"
    with pytest.raises(IndexError):
        Numbers(4)[4]
    with pytest.raises(UsageError):
        Numbers(4, step=0)
    with pytest.raises(UsageError):
        Numbers(4, start=3, stop=2)
    assert answers(TaskSlice(Numbers(10), start=7)) == ["7", "8", "9"]


def test_task_mixture_deterministic_oversampling_slicing() -> None:
    a, b = Numbers(5, base=0), Numbers(3, base=100)
    m1, m2 = TaskMixture([a, b]), TaskMixture([a, b])
    assert answers(m1) == answers(m2)  # same shuffle every time (random.Random(42))
    assert sorted(answers(m1)) == sorted([str(i) for i in range(5)] + ["100", "101", "102"])
    assert answers(m1) != [str(i) for i in range(5)] + ["100", "101", "102"]  # actually shuffled
    over = TaskMixture([a, b, b])  # passing a task twice oversamples it
    counts = {x: answers(over).count(x) for x in set(answers(over))}
    assert all(counts[str(i)] == 1 for i in range(5)) and all(counts[f"10{i}"] == 2 for i in range(3))
    sliced = TaskMixture([a, b], start=1, stop=7, step=2)
    assert answers(sliced) == answers(m1)[1:7:2]
    assert m1.source_of(0) in (a, b)


def test_task_sequence_is_curriculum() -> None:
    seq = TaskSequence([Numbers(2), Numbers(2, base=10)])
    assert answers(seq) == ["0", "1", "10", "11"]
    assert answers(TaskSequence([Numbers(2), Numbers(2, base=10)], start=1, stop=3)) == ["1", "10"]


def test_build_mixture_records_used_and_missing(
    tmp_path: Path, shared_data: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # offline: no hub
    d = tmp_path / "data"
    (d / "gsm8k").mkdir(parents=True)
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]
    (d / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    mix = build_mixture("sft", data_dir=d, home=Home(home))
    used = {s.name: s.rows for s in mix.train_sources if s.ok}
    missing = {s.name for s in mix.train_sources if not s.ok}
    assert used == {"GSM8K": 40}
    assert {"ARC-Easy", "SmolTalk[:10000]", "identity", "SpellingBee"} <= missing
    assert len(mix.train) + len(mix.val) == 40 and len(mix.val) == 1  # held out 1% (at least 1)
    assert any("MISSING" in line for line in mix.summary_lines())
    # custom data alone replaces the mixture; with mix=True it joins it
    custom = tmp_path / "mine.jsonl"
    custom.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n' * 10)
    alone = build_mixture("sft", data_dir=d, home=Home(home), data=[custom])
    assert [s.name for s in alone.train_sources] == ["--data mine.jsonl"]
    assert len(alone.train) + len(alone.val) == 10
    mixed = build_mixture("sft", data_dir=d, home=Home(home), data=[custom], mix=True)
    assert len(mixed.train) + len(mixed.val) == 50
    with pytest.raises(NanoctlError, match="no mid training data"):
        build_mixture("mid", data_dir=tmp_path / "empty", home=Home(home))


def test_offline_missing_dataset_is_one_line(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(NanoctlError) as e:
        GSM8K("main", "test", data_dir=home / "none")
    assert "GSM8K test split" in e.value.message and "datasets" in e.value.message
    assert "--data-dir" in (e.value.hint or "") and "\n" not in e.value.message


# --- registry -----------------------------------------------------------------------------------------------


def test_registry(shared_data: Path) -> None:
    names = list_tasks()
    assert {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"} <= set(names)
    assert TASK_INFO["MMLU"].baseline == 0.25 and TASK_INFO["GSM8K"].eval_type == "generative"
    t = get_task("arc-easy", data_dir=shared_data, stop=10)
    assert len(t) == 10 and t.eval_type == "categorical"
    with pytest.raises(UsageError, match="unknown task"):
        get_task("nope")


def test_humaneval_helpers() -> None:
    prompt = "from typing import List\nimport math\n\n\ndef f(x: List[int]) -> int:\n"
    assert extract_imports(prompt) == "from typing import List\nimport math"
    assert extract_program("Sure:\n```python\ndef f(x):\n    return 1\n```\nbye") == "def f(x):\n    return 1"
    assert extract_program("  def g(): pass ") == "def g(): pass"


# --- custom conversations -----------------------------------------------------------------------------------


def test_custom_jsonl_validation_errors(tmp_path: Path) -> None:
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    cases = {
        "{not json": "malformed JSON",
        '[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]': "'user' was expected",
        '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]': "empty assistant turn",
        '[{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]': "unknown role 'robot'",
        '[{"role": "user", "content": "x"}]': "at least a user and an assistant",
        '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]': "ends with a user message",
        '{"msgs": []}': "no 'messages' key",
        '[{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "bad", "text": "y"}]}]': "content part 0",
    }
    for i, (line, expected) in enumerate(cases.items()):
        f = tmp_path / f"c{i}.jsonl"
        f.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(NanoctlError) as e:
            load_conversations(f)
        assert f"{f}:3:" in e.value.message, e.value.message
        assert expected in e.value.message, e.value.message
    ok = tmp_path / "ok.jsonl"
    sys_first = '{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    ok.write_text(good + "\n" + sys_first + "\n")
    convs = load_conversations(ok)
    assert len(convs) == 2 and convs[1]["messages"][0]["role"] == "system"
    assert (
        validate_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "x")[
            "messages"
        ][1]["content"]
        == "b"
    )


def test_identity_file_validates(shared_data: Path) -> None:
    from nanoctl.tasks.customjson import Identity

    task = Identity(data_dir=shared_data)
    assert len(task) == 1000 and task[0]["messages"][0]["role"] == "user"


def test_ingest_then_found_without_data_dir(
    tmp_path: Path, shared_data: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanoctl.tasks.ingest import ingest_task_data, task_availability

    monkeypatch.setitem(sys.modules, "datasets", None)
    src = tmp_path / "src"
    (src / "gsm8k").mkdir(parents=True)
    (src / "gsm8k" / "train.jsonl").write_text(
        (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[0] + "\n"
    )
    (src / "unrelated.txt").write_text("x")
    copied = ingest_task_data(src, home)
    assert copied == [home / "data" / "tasks" / "gsm8k" / "train.jsonl"]
    assert len(GSM8K("main", "train", home=Home(home))) == 1  # under <home>/data/tasks/, no --data-dir
    with pytest.raises(NanoctlError, match="not found locally"):
        GSM8K("main", "train")  # no home given: only data dirs are searched, never an ambient one
    avail = {(a.name, a.split): a for a in task_availability(None, home)}
    assert avail[("GSM8K", "train")].rows == 1 and avail[("GSM8K", "test")].rows is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NanoctlError, match="no task dataset files"):
        ingest_task_data(empty, home)
