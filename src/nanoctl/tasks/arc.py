"""ARC-Easy / ARC-Challenge (allenai/ai2_arc) as multiple choice.

Local formats, sniffed per row:
- hub rows: `{"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": "A"}`;
- the original AI2 jsonl: `{"question": {"stem": str, "choices": [{"text", "label"}]}, "answerKey"}`;
- the CORE eval bundle (`world_knowledge/arc_{easy,challenge}.jsonl`: `{"query": "Question: ...",
  "choices": [...], "gold": int}`), which holds the *test* splits (2,376 / 1,172 rows). CORE rows carry no
  labels, so the letters are A, B, C, ... in order. The installed bundle (`<home>/eval/bundle`) is used too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.tasks.common import Conversation, LocalOrHub, find_local, load_hub, local_rows, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
ABC = "ABCDEFGHIJ"


def normalize_row(row: dict[str, Any], where: str) -> tuple[str, list[str], list[str], str]:
    """(question, letters, choices, answer letter) from any of the three row formats."""
    if "query" in row and "gold" in row:  # CORE bundle
        question = row["query"]
        if question.startswith("Question: "):
            question = question[len("Question: ") :]
        choices = list(row["choices"])
        letters = list(ABC[: len(choices)])
        return question, letters, choices, letters[int(row["gold"])]
    q = row["question"]
    if isinstance(q, dict):  # original AI2 jsonl
        question = q["stem"]
        choices = [c["text"] for c in q["choices"]]
        letters = [c["label"] for c in q["choices"]]
    else:
        question = q
        choices = list(row["choices"]["text"])
        letters = list(row["choices"]["label"])
    answer = str(row["answerKey"])
    if answer not in letters:
        raise NanoctlError(f"{where}: ARC answer {answer!r} is not one of the labels {letters}")
    return question, letters, choices, answer


class ARC(LocalOrHub):
    eval_type = "categorical"

    def __init__(
        self,
        subset: str = "ARC-Easy",
        split: str = "test",
        *,
        path: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: Home | None = None,
        **kwargs: Any,
    ) -> None:
        if subset not in SUBSETS:
            raise UsageError(f"ARC subset must be ARC-Easy|ARC-Challenge, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise UsageError(f"ARC split must be train|validation|test, got {split!r}")
        self.name = subset
        self.subset, self.split = subset, split
        short = "easy" if subset == "ARC-Easy" else "challenge"
        orig = {"validation": "Dev"}.get(split, split.capitalize())
        cands = [
            f"arc/{subset}/{split}.jsonl",
            f"arc/{subset}/{split}-*.parquet",
            f"{subset}/{split}.jsonl",
            f"{subset}/{subset}-{orig}.jsonl",  # the original AI2 zip layout
            f"arc/{subset}-{orig}.jsonl",
        ]
        if split == "test":  # the CORE bundle's ARC files are the test splits
            cands += [f"eval_bundle/eval_data/world_knowledge/arc_{short}.jsonl", f"arc_{short}.jsonl"]
        local = Path(path) if path else find_local(cands, data_dir, home)
        if local is None and split == "test" and home is not None:
            bundled = home.eval_bundle_dir / "eval_data" / "world_knowledge" / f"arc_{short}.jsonl"
            local = bundled if bundled.exists() else None
        if local is not None:
            rows: Any = local_rows(local)
            source = str(local)
        else:
            rows = load_hub(
                "allenai/ai2_arc",
                subset,
                split,
                what=f"{subset} {split} split",
                expected=f"arc/{subset}/{split}.jsonl (ARC jsonl; the CORE bundle's arc_{short}.jsonl for test)",
                data_dir=data_dir,
                home=home,
            )
            source = "hf:allenai/ai2_arc"
        super().__init__(rows, source, **kwargs)

    def get_example(self, index: int) -> Conversation:
        question, letters, choices, answer = normalize_row(self.rows[index], f"{self.source} row {index}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]
