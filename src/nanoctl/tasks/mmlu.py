"""MMLU (cais/mmlu): 57 subjects of 4-way multiple choice; `auxiliary_train` feeds mid-training.

Local formats (a directory `mmlu/<split>/` of per-subject CSVs, subject from `<subject>_<split>.csv`):
- with a header `question,choice0,choice1,choice2,choice3,answer` (answer an int 0-3 or a letter), or
- the raw hendrycks layout: no header, columns question, A, B, C, D, answer letter.
Also the hub's parquet/jsonl rows (`question`, `subject`, `choices`, `answer`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.tasks.common import (
    Conversation,
    LocalOrHub,
    find_local,
    hub_permutation,
    load_hub,
    read_records,
    render_mc,
)

LETTERS = ("A", "B", "C", "D")


def _answer_index(value: Any, where: str) -> int:
    text = str(value).strip()
    if text in LETTERS:
        return LETTERS.index(text)
    try:
        idx = int(text)
    except ValueError:
        raise NanoctlError(f"{where}: MMLU answer {value!r} is neither 0-3 nor A-D") from None
    if not 0 <= idx < 4:
        raise NanoctlError(f"{where}: MMLU answer {idx} is out of range 0-3")
    return idx


def _subject_of(path: Path, split: str) -> str:
    stem = path.stem
    for suffix in (f"_{split}", "_val", "_dev", "_test", "_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_mmlu_csv(path: Path, split: str) -> list[dict[str, Any]]:
    """Rows `{question, subject, choices, answer}` from one CSV of either layout."""
    subject = _subject_of(path, split)
    rows: list[dict[str, Any]] = []
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    if not records:
        return rows
    has_header = [c.strip().lower() for c in records[0][:2]] == ["question", "choice0"]
    for lineno, rec in enumerate(records[1:] if has_header else records, 2 if has_header else 1):
        if len(rec) < 6:
            raise NanoctlError(
                f"{path}:{lineno}: expected 6 columns (question, 4 choices, answer), got {len(rec)}"
            )
        rows.append(
            {
                "question": rec[0],
                "subject": subject,
                "choices": rec[1:5],
                "answer": _answer_index(rec[5], f"{path}:{lineno}"),
            }
        )
    return rows


def read_mmlu_local(path: Path, split: str) -> list[dict[str, Any]]:
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if csvs:  # subjects in alphabetical order, like the hub's "all" config
            return [row for p in csvs for row in read_mmlu_csv(p, split)]
    elif path.suffix.lower() == ".csv":
        return read_mmlu_csv(path, split)
    rows = read_records(path)
    return [r["train"] if "train" in r and isinstance(r["train"], dict) else r for r in rows]


class MMLU(LocalOrHub):
    name = "MMLU"
    eval_type = "categorical"
    letters = LETTERS

    def __init__(
        self,
        subset: str = "all",
        split: str = "test",
        *,
        path: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: Home | None = None,
        **kwargs: Any,
    ) -> None:
        if subset not in ("all", "auxiliary_train"):
            raise UsageError(f"MMLU subset must be all|auxiliary_train, got {subset!r}")
        if split not in ("train", "validation", "dev", "test"):
            raise UsageError(f"MMLU split must be train|validation|dev|test, got {split!r}")
        if subset == "auxiliary_train" and split != "train":
            raise UsageError("MMLU auxiliary_train only has the train split")
        self.subset, self.split = subset, split
        folder = "auxiliary_train" if subset == "auxiliary_train" else {"validation": "val"}.get(split, split)
        cands = [
            f"mmlu/{folder}",
            f"mmlu/{split}",
            f"mmlu/{subset}/{split}-*.parquet",
            f"mmlu/{folder}.jsonl",
        ]
        local = Path(path) if path else find_local(cands, data_dir, home)
        if local is not None:
            rows: Any = hub_permutation(read_mmlu_local(local, folder))
            source = str(local)
        else:
            rows = load_hub(
                "cais/mmlu",
                subset,
                split,
                what=f"MMLU {subset}/{split}",
                expected=f"mmlu/{folder}/*.csv (per-subject MMLU CSVs)",
                data_dir=data_dir,
                home=home,
            )
            source = "hf:cais/mmlu"
        super().__init__(rows, source, **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        if "train" in row and isinstance(row["train"], dict):  # hub auxiliary_train rows are wrapped
            row = row["train"]
        choices = list(row["choices"])
        if len(choices) != 4:
            raise NanoctlError(f"MMLU row {index}: expected 4 choices, got {len(choices)}")
        answer = _answer_index(row["answer"], f"MMLU row {index}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "subject": row.get("subject", ""),
            "letters": LETTERS,
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]
