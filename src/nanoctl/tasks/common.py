"""Task base class, mixtures, the multiple-choice prompt format and dataset location.

A Task is a sliceable, indexable dataset of conversations (`{"messages": [...]}` dicts, as nanochat) plus,
for evaluation tasks, a scorer: `evaluate(conversation, response)` and `reward(conversation, response)`.

Data is found, in order: an explicit path argument > `data_dir` (the `--data-dir` flag) >
`$NANOCTL_TASK_DATA` > `<home>/data/tasks/` (ingested copies; searched when a `home=` Home is given) > the HF hub through `datasets` (imported
lazily; not a hard dependency). Rows loaded from local files are shuffled with the same permutation
`datasets.Dataset.shuffle(seed=42)` uses (numpy `default_rng(42).permutation(n)`), so a local copy of a
hub split yields the same example order as nanochat.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

Conversation = dict[str, Any]
TASK_DATA_ENV = "NANOCTL_TASK_DATA"
SHUFFLE_SEED = 42  # nanochat shuffles every hub dataset with seed 42

# "#### 72" answers, shared by GSM8K and SpellingBee (the official GSM8K normalization: strip commas).
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(completion: str) -> str | None:
    """The number after the first `####` marker, commas removed; None when there is none."""
    match = ANSWER_RE.search(completion)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


class Rows(Protocol):
    """What a task needs from its backing data: a length and integer indexing to a row dict."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class Task:
    """A lightweight, sliceable view over a dataset of conversations.

    `start`/`stop`/`step` select physical rows `start, start+step, ...` below `stop` (capped at the size).
    Subclasses implement `num_examples()` and `get_example(physical_index)`; eval tasks also `evaluate`.
    """

    name: str = "task"
    eval_type: str = "generative"  # "categorical" (pick a letter) | "generative" (sample and score)
    letters: Sequence[str] | None = None  # the answer letters of multiple-choice tasks

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        if start < 0:
            raise UsageError(f"{type(self).__name__}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise UsageError(f"{type(self).__name__}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise UsageError(f"{type(self).__name__}: step must be >= 1, got {step}")
        self.start = start
        self.stop = stop
        self.step = step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)  # a too-large stop is capped, as nanochat
        span = max(0, stop - self.start)
        return (span + self.step - 1) // self.step

    def __getitem__(self, index: int) -> Conversation:
        if not isinstance(index, int):
            raise TypeError(f"task index must be an int, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        # IndexError (not an assert) so `for conv in task` and list(task) terminate.
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} of size {len(self)}")
        return self.get_example(self.start + index * self.step)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def evaluate(self, conversation: Conversation, response: str) -> bool | float:
        raise NanoctlError(f"task {self.name} has no scorer", "use it for training only")

    def reward(self, conversation: Conversation, response: str) -> float:
        """RL reward; by default the evaluation outcome as a float (nanochat's 0/1 reward)."""
        return float(self.evaluate(conversation, response))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)})"


class TaskSlice(Task):
    """A start/stop/step view over another task (e.g. `--max-problems` on an eval task)."""

    def __init__(self, task: Task, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        self.task = task
        self.name = task.name
        self.eval_type = task.eval_type
        self.letters = task.letters

    def num_examples(self) -> int:
        return len(self.task)

    def get_example(self, index: int) -> Conversation:
        return self.task[index]

    def evaluate(self, conversation: Conversation, response: str) -> bool | float:
        return self.task.evaluate(conversation, response)

    def reward(self, conversation: Conversation, response: str) -> float:
        return self.task.reward(conversation, response)


class TaskMixture(Task):
    """All examples of several tasks, interleaved by a deterministic `random.Random(42)` shuffle.

    Passing a task several times oversamples it (each copy contributes all its examples).
    """

    name = "mixture"

    def __init__(self, tasks: Sequence[Task], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]
        self.index_map: list[tuple[int, int]] = [
            (ti, li) for ti, n in enumerate(self.lengths) for li in range(n)
        ]
        random.Random(SHUFFLE_SEED).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> Conversation:
        ti, li = self.index_map[index]
        return self.tasks[ti][li]

    def source_of(self, index: int) -> Task:
        """The task that logical example `index` comes from (for per-source statistics)."""
        ti, _ = self.index_map[self.start + index * self.step]
        return self.tasks[ti]


class TaskSequence(Task):
    """Tasks one after another (a curriculum), no shuffling."""

    name = "sequence"

    def __init__(self, tasks: Sequence[Task], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> Conversation:
        for task, n in zip(self.tasks, self.lengths, strict=True):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(index)


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt.

    The letter comes *after* the choice (small models bind better) with no space after '=', so the
    prompt's letter is the same token as the assistant's one-letter answer ("A", not " A").
    """
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    query += "\nRespond only with the letter of the correct answer."
    return query


# ---------------------------------------------------------------------------------------------------------
# Locating and reading data


def search_dirs(data_dir: str | os.PathLike[str] | None = None, home: Home | None = None) -> list[Path]:
    """Directories searched for task files, most specific first (`<home>/data/tasks/` when a home is given)."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(TASK_DATA_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    if home is not None:
        dirs.append(home.tasks_dir)
    return dirs


def find_local(
    candidates: Sequence[str],
    data_dir: str | os.PathLike[str] | None = None,
    home: Home | None = None,
) -> Path | None:
    """The first existing `dir/candidate` over `search_dirs`; candidates may be globs (first sorted match)."""
    for d in search_dirs(data_dir, home):
        for cand in candidates:
            if any(ch in cand for ch in "*?["):
                matches = sorted(d.glob(cand))
                if matches:
                    return matches[0]
            elif (d / cand).exists():
                return d / cand
    return None


def missing_dataset(
    what: str,
    expected: str,
    data_dir: str | os.PathLike[str] | None,
    home: Home | None,
    why: str,
) -> NanoctlError:
    looked = ", ".join(str(d) for d in search_dirs(data_dir, home))
    return NanoctlError(
        f"{what} not found locally (looked in {looked}) and {why}",
        f"pass --data-dir DIR holding {expected}, or copy it under <home>/data/tasks/, "
        "or `pip install datasets` with network access",
    )


def load_hub(
    repo: str,
    subset: str | None,
    split: str,
    *,
    what: str,
    expected: str,
    data_dir: str | os.PathLike[str] | None = None,
    home: Home | None = None,
) -> Rows:
    """`datasets.load_dataset(repo, subset, split=split).shuffle(seed=42)`, with one-line offline errors."""
    try:
        import datasets  # lazy: an optional dependency (the `hub` extra)
    except ImportError:
        raise missing_dataset(
            what, expected, data_dir, home, "the `datasets` package is not installed"
        ) from None
    try:
        ds = datasets.load_dataset(repo, subset, split=split)
    except Exception as e:  # offline, unknown split, hub errors: all mean "not available here"
        raise missing_dataset(
            what, expected, data_dir, home, f"loading {repo} from the HF hub failed ({type(e).__name__})"
        ) from None
    return ds.shuffle(seed=SHUFFLE_SEED)


def hub_permutation(rows: list[Any], seed: int = SHUFFLE_SEED) -> list[Any]:
    """Reorder like `datasets.Dataset.shuffle(seed)`: numpy `default_rng(seed).permutation(len)`."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(len(rows))
    return [rows[int(i)] for i in perm]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json/.parquet/.csv file (or every such file in a directory, sorted)."""
    if path.is_dir():
        rows: list[dict[str, Any]] = []
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet", ".csv"))
        for f in files:
            rows.extend(read_records(f))
        return rows
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or similar single-key wrappers
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        return list(data)
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise NanoctlError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})",
                    "each line must be one JSON object",
                ) from None
    return out


class LocalOrHub(Task):
    """A task backed by rows from a local file (shuffled like the hub) or from the hub itself."""

    def __init__(self, rows: Rows, source: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows = rows
        self.source = source  # a path or "hf:<repo>" (shown in summaries)

    def num_examples(self) -> int:
        return len(self.rows)


def local_rows(path: Path, shuffle: bool = True) -> list[dict[str, Any]]:
    rows = read_records(path)
    return hub_permutation(rows) if shuffle else rows


TaskFactory = Callable[..., Task]
