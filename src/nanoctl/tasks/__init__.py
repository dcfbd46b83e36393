"""Tasks: datasets of conversations with scorers (ARC, MMLU, GSM8K, HumanEval, SmolTalk, spelling, custom).

`TASKS` maps the chat-eval task names (nanochat's) to constructors taking `split=`, `data_dir=`, `home=`
and slicing `start=/stop=/step=`; `get_task(name, ...)` builds one, `list_tasks()` lists them, and
`TASK_INFO[name]` gives eval type and the ChatCORE random baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanoctl.errors import UsageError
from nanoctl.tasks.common import Task, TaskMixture, TaskSequence, TaskSlice, render_mc

__all__ = [
    "TASKS",
    "TASK_INFO",
    "Task",
    "TaskInfo",
    "TaskMixture",
    "TaskSequence",
    "TaskSlice",
    "get_task",
    "list_tasks",
    "render_mc",
]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    eval_type: str  # categorical | generative
    baseline: float  # random-guess accuracy, for ChatCORE centering (0.25 for 4-way MC)
    default_split: str
    description: str


def _arc_easy(split: str = "test", **kw: Any) -> Task:
    from nanoctl.tasks.arc import ARC

    return ARC("ARC-Easy", split, **kw)


def _arc_challenge(split: str = "test", **kw: Any) -> Task:
    from nanoctl.tasks.arc import ARC

    return ARC("ARC-Challenge", split, **kw)


def _mmlu(split: str = "test", **kw: Any) -> Task:
    from nanoctl.tasks.mmlu import MMLU

    subset = "auxiliary_train" if split == "train" else "all"
    return MMLU(subset, split, **kw)


def _gsm8k(split: str = "test", **kw: Any) -> Task:
    from nanoctl.tasks.gsm8k import GSM8K

    return GSM8K("main", split, **kw)


def _humaneval(split: str = "test", **kw: Any) -> Task:
    from nanoctl.tasks.humaneval import HumanEval

    if split != "test":
        raise UsageError(f"HumanEval only has the test split, got {split!r}")
    return HumanEval(**kw)


def _spellingbee(split: str = "test", size: int | None = None, **kw: Any) -> Task:
    from nanoctl.tasks.spelling import SpellingBee

    return SpellingBee(size if size is not None else (256 if split == "test" else 1000), split, **kw)


def _simplespelling(split: str = "test", size: int | None = None, **kw: Any) -> Task:
    from nanoctl.tasks.spelling import SimpleSpelling

    return SimpleSpelling(size if size is not None else (256 if split == "test" else 1000), split, **kw)


def _smoltalk(split: str = "test", **kw: Any) -> Task:
    from nanoctl.tasks.smoltalk import SmolTalk

    return SmolTalk(split, **kw)


def _identity(split: str = "train", **kw: Any) -> Task:
    from nanoctl.tasks.customjson import Identity

    return Identity(**kw)


TASKS: dict[str, Callable[..., Task]] = {
    "ARC-Easy": _arc_easy,
    "ARC-Challenge": _arc_challenge,
    "MMLU": _mmlu,
    "GSM8K": _gsm8k,
    "HumanEval": _humaneval,
    "SpellingBee": _spellingbee,
    "SimpleSpelling": _simplespelling,
    "SmolTalk": _smoltalk,
    "identity": _identity,
}

TASK_INFO: dict[str, TaskInfo] = {
    "ARC-Easy": TaskInfo("ARC-Easy", "categorical", 0.25, "test", "grade-school science, easy (4-way MC)"),
    "ARC-Challenge": TaskInfo(
        "ARC-Challenge", "categorical", 0.25, "test", "grade-school science, hard (4-way MC)"
    ),
    "MMLU": TaskInfo("MMLU", "categorical", 0.25, "test", "57 subjects (4-way MC)"),
    "GSM8K": TaskInfo("GSM8K", "generative", 0.0, "test", "grade-school math with a calculator tool"),
    "HumanEval": TaskInfo("HumanEval", "generative", 0.0, "test", "Python functions, run against tests"),
    "SpellingBee": TaskInfo("SpellingBee", "generative", 0.0, "test", "count a letter in a word"),
    "SimpleSpelling": TaskInfo("SimpleSpelling", "generative", 0.0, "test", "spell a word letter by letter"),
    "SmolTalk": TaskInfo("SmolTalk", "generative", 0.0, "test", "general chat (training data, no scorer)"),
    "identity": TaskInfo(
        "identity", "generative", 0.0, "train", "who the model is (training data, no scorer)"
    ),
}

# The tasks `nanoctl eval chat` runs by default (nanochat OLD/MID chat_eval).
CHAT_EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")


def list_tasks(scored_only: bool = False) -> list[str]:
    """Registered task names; `scored_only` drops the training-only ones (SmolTalk, identity)."""
    return [n for n in TASKS if not scored_only or n not in ("SmolTalk", "identity")]


def get_task(name: str, split: str | None = None, **kwargs: Any) -> Task:
    """Build task `name` (case-insensitive) on `split` (default: its eval split)."""
    lookup = {n.lower(): n for n in TASKS}
    key = lookup.get(name.lower())
    if key is None:
        raise UsageError(f"unknown task {name!r}", f"choose from {', '.join(TASKS)}")
    return TASKS[key](split=split or TASK_INFO[key].default_split, **kwargs)
