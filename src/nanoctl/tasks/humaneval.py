"""HumanEval (openai/openai_humaneval): 164 Python function completions, scored by running the tests.

Local format: the original `HumanEval.jsonl` (or .jsonl.gz) with `task_id, prompt, canonical_solution,
test, entry_point` per line. Scoring runs the first ``` block of the response (or the whole response) with
the prompt's imports, the tests and `check(entry_point)` in the sandbox (`nanoctl.tools.sandbox`), 5 s.
Where the kernel sandbox is unavailable every completion fails unless `unsafe_exec=True`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

from nanoctl.home import Home
from nanoctl.tasks.common import Conversation, LocalOrHub, find_local, hub_permutation, load_hub, read_records

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (stops at the first other non-comment line)."""
    imports = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first fenced code block, else the whole completion."""
    matches = CODE_BLOCK_RE.findall(completion)
    return (matches[0] if matches else completion).strip()


def _read(path: Path) -> list[dict[str, Any]]:
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return read_records(path)


class HumanEval(LocalOrHub):
    name = "HumanEval"
    eval_type = "generative"

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: Home | None = None,
        timeout: float = 5.0,
        unsafe_exec: bool = False,
        **kwargs: Any,
    ) -> None:
        cands = [
            "humaneval/HumanEval.jsonl",
            "humaneval/HumanEval.jsonl.gz",
            "humaneval/test.jsonl",
            "humaneval/test-*.parquet",
            "HumanEval.jsonl",
            "HumanEval.jsonl.gz",
        ]
        local = Path(path) if path else find_local(cands, data_dir, home)
        if local is not None:
            rows: Any = hub_permutation(_read(local))
            source = str(local)
        else:
            rows = load_hub(
                "openai/openai_humaneval",
                None,
                "test",
                what="HumanEval",
                expected="humaneval/HumanEval.jsonl (the original HumanEval jsonl)",
                data_dir=data_dir,
                home=home,
            )
            source = "hf:openai/openai_humaneval"
        self.timeout = timeout
        # True: run completions with the Python guard alone where the kernel sandbox is unavailable.
        self.unsafe_exec = unsafe_exec
        super().__init__(rows, source, **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        prompt = row["prompt"]
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{prompt}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def program(self, conversation: Conversation, completion: str) -> str:
        imports = extract_imports(conversation["messages"][0]["content"])
        return (
            f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
            f"check({conversation['entry_point']})"
        )

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        from nanoctl.tools import sandbox

        unsafe = self.unsafe_exec and not sandbox.layers().isolated
        return sandbox.execute_code(self.program(conversation, response), timeout=self.timeout, unsafe=unsafe).success
