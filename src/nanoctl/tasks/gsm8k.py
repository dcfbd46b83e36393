"""GSM8K grade-school math (openai/gsm8k), with calculator tool calls.

Solutions mark calculator use as `<<48/2=24>>`; each becomes a `python` part (the expression, trained on)
followed by a `python_output` part (the result, not trained on: at inference the engine injects it).
Local format: the original jsonl (`{"question", "answer"}` per line), e.g. `gsm8k/train.jsonl`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nanoctl.errors import UsageError
from nanoctl.home import Home
from nanoctl.tasks.common import Conversation, LocalOrHub, extract_answer, find_local, load_hub, local_rows

TOOL_RE = re.compile(r"(<<[^>]+>>)")


def parse_solution(answer: str) -> list[dict[str, str]]:
    """Split a GSM8K solution into text / python / python_output parts (as nanochat)."""
    parts: list[dict[str, str]] = []
    for piece in TOOL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def _candidates(subset: str, split: str) -> list[str]:
    return [
        f"gsm8k/{subset}/{split}.jsonl",
        f"gsm8k/{split}.jsonl",
        f"gsm8k/{subset}/{split}-*.parquet",
        f"gsm8k/{split}.parquet",
        f"gsm8k_{split}.jsonl",
    ]


class GSM8K(LocalOrHub):
    name = "GSM8K"
    eval_type = "generative"

    def __init__(
        self,
        subset: str = "main",
        split: str = "train",
        *,
        path: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: Home | None = None,
        **kwargs: Any,
    ) -> None:
        if subset not in ("main", "socratic"):
            raise UsageError(f"GSM8K subset must be main|socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise UsageError(f"GSM8K split must be train|test, got {split!r}")
        self.subset, self.split = subset, split
        local = Path(path) if path else find_local(_candidates(subset, split), data_dir, home)
        if local is not None:
            rows: Any = local_rows(local)
            source = str(local)
        else:
            rows = load_hub(
                "openai/gsm8k",
                subset,
                split,
                what=f"GSM8K {split} split",
                expected=f"gsm8k/{split}.jsonl (the original GSM8K jsonl)",
                data_dir=data_dir,
                home=home,
            )
            source = "hf:openai/gsm8k"
        super().__init__(rows, source, **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": parse_solution(row["answer"])},
            ]
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        """Correct iff the number after `####` matches the reference's (commas stripped)."""
        content = conversation["messages"][-1]["content"]
        reference = content[-1]["text"] if isinstance(content, list) else content
        ref = extract_answer(reference)
        return ref is not None and extract_answer(response) == ref
