"""nanochat's mid-training and SFT data mixtures, built from whatever sources are available.

Each source is tried in turn; one that cannot be found (offline, no local copy) is recorded as missing
with the reason instead of failing the stage, so `nanoctl mid` works with a partial set of data and says
which sources it used. `--data FILE.jsonl` replaces the mixture, or joins it with `--mix`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.tasks.common import Task, TaskMixture, TaskSlice
from nanoctl.tasks.identity import Persona

PathLike = str | os.PathLike[str]


@dataclass
class SourceStatus:
    """One mixture source: what it is, how many rows it gave (times `repeat`), or why it is missing."""

    name: str
    repeat: int = 1
    rows: int = 0
    source: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "repeat": self.repeat,
            "rows": self.rows,
            "source": self.source,
            "error": self.error,
        }


@dataclass
class Mixture:
    """The train and val tasks of a stage, plus which sources went into them."""

    train: Task
    val: Task
    train_sources: list[SourceStatus] = field(default_factory=list)
    val_sources: list[SourceStatus] = field(default_factory=list)
    val_note: str = ""  # e.g. "held out 12 conversations of the train mixture"
    searched: list[str] = field(default_factory=list)  # the local directories searched for task data

    def summary_lines(self) -> list[str]:
        lines = []
        for label, sources in (("train", self.train_sources), ("val", self.val_sources)):
            for s in sources:
                if s.ok:
                    rep = f" x{s.repeat}" if s.repeat > 1 else ""
                    lines.append(f"  {label}: {s.name}{rep}: {s.rows:,} rows ({s.source})")
                else:
                    lines.append(f"  {label}: {s.name}: MISSING ({s.error})")
        if self.val_note:
            lines.append(f"  val: {self.val_note}")
        if self.searched and any(not s.ok for s in self.train_sources + self.val_sources):
            lines.append(f"  (task data searched in: {', '.join(self.searched)}; see --data-dir)")
        lines.append(f"  total: {len(self.train):,} train / {len(self.val):,} val conversations")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": [s.to_dict() for s in self.train_sources],
            "val": [s.to_dict() for s in self.val_sources],
            "val_note": self.val_note,
            "train_rows": len(self.train),
            "val_rows": len(self.val),
        }


Builder = Callable[[], Task]


def _sources(
    stage: str, split: str, data_dir: PathLike | None, home: Home | None, persona: Persona | None = None
) -> list[tuple[str, Builder, int]]:
    """(name, builder, repeat) per source of nanochat's OLD mixtures."""
    from nanoctl.tasks.arc import ARC
    from nanoctl.tasks.customjson import Identity
    from nanoctl.tasks.gsm8k import GSM8K
    from nanoctl.tasks.mmlu import MMLU
    from nanoctl.tasks.smoltalk import SmolTalk
    from nanoctl.tasks.spelling import SimpleSpelling, SpellingBee

    kw: dict[str, Any] = {"data_dir": data_dir, "home": home}
    if stage == "mid" and split == "train":
        return [
            ("SmolTalk", lambda: SmolTalk("train", **kw), 1),  # 460K general conversations
            (
                "MMLU auxiliary_train",
                lambda: MMLU("auxiliary_train", "train", **kw),
                1,
            ),  # 100K MC (ARC, RACE, ...)
            ("GSM8K", lambda: GSM8K("main", "train", **kw), 1),  # 8K math with calculator calls
            ("identity", lambda: Identity(persona=persona, **kw), 2),  # 2 epochs of ~1K identity chats
            ("SimpleSpelling", lambda: SimpleSpelling(200_000, "train", **kw), 1),
            ("SpellingBee", lambda: SpellingBee(80_000, "train", **kw), 1),
        ]
    if stage == "mid":  # val, sized to match the train ratios as nanochat
        return [
            ("SmolTalk test", lambda: SmolTalk("test", **kw), 1),
            ("MMLU test[:5200]", lambda: MMLU("all", "test", stop=5200, **kw), 1),
            ("GSM8K test[:420]", lambda: GSM8K("main", "test", stop=420, **kw), 1),
        ]
    if stage == "sft" and split == "train":
        return [
            ("ARC-Easy", lambda: ARC("ARC-Easy", "train", **kw), 1),
            ("ARC-Challenge", lambda: ARC("ARC-Challenge", "train", **kw), 1),
            ("GSM8K", lambda: GSM8K("main", "train", **kw), 1),
            ("SmolTalk[:10000]", lambda: SmolTalk("train", stop=10_000, **kw), 1),
            ("identity", lambda: Identity(persona=persona, **kw), 1),
            ("SimpleSpelling", lambda: SimpleSpelling(300, "train", **kw), 1),
            ("SpellingBee", lambda: SpellingBee(300, "train", **kw), 1),
        ]
    if stage == "sft":
        return [("SmolTalk test", lambda: SmolTalk("test", **kw), 1)]
    raise UsageError(f"no data mixture for stage {stage!r}")


def _collect(specs: list[tuple[str, Builder, int]]) -> tuple[list[Task], list[SourceStatus]]:
    tasks: list[Task] = []
    statuses: list[SourceStatus] = []
    for name, build, repeat in specs:
        try:
            task = build()
        except NanoctlError as e:  # missing data: record and carry on with the rest
            # the summary drops the "(looked in ...)" list: it is the same for every source
            statuses.append(SourceStatus(name, repeat, error=re.sub(r" \(looked in [^)]*\)", "", e.message)))
            continue
        tasks.extend([task] * repeat)  # a task listed twice is oversampled (TaskMixture semantics)
        statuses.append(SourceStatus(name, repeat, rows=len(task), source=getattr(task, "source", "")))
    return tasks, statuses


def build_mixture(
    stage: str,
    *,
    data_dir: PathLike | None = None,
    home: Home | None = None,
    data: Sequence[PathLike] = (),
    mix: bool = False,
    val_holdout: int | None = None,
    persona: Persona | None = None,
) -> Mixture:
    """Train/val mixture for `stage` ("mid" | "sft").

    `data`: custom conversation JSONL files; alone they are the whole training set, with `mix=True` they
    join the stage's mixture. When no val source is available, the last `val_holdout` (default: 1%,
    1..500) conversations of the shuffled train mixture are held out as val. `persona` renames the model
    and its creator in the identity conversations (tasks/identity.py).
    """
    from nanoctl.tasks.customjson import CustomJSON

    train_tasks: list[Task] = []
    train_status: list[SourceStatus] = []
    val_tasks: list[Task] = []
    val_status: list[SourceStatus] = []
    if not data or mix:
        train_tasks, train_status = _collect(_sources(stage, "train", data_dir, home, persona))
        val_tasks, val_status = _collect(_sources(stage, "val", data_dir, home))
    for path in data:
        task = CustomJSON(path, name=Path(path).name)
        train_tasks.append(task)
        train_status.append(SourceStatus(f"--data {Path(path).name}", rows=len(task), source=str(path)))
    if not train_tasks:
        missing = "; ".join(f"{s.name}: {s.error}" for s in train_status)
        raise NanoctlError(
            f"no {stage} training data is available ({missing})",
            "pass --data-dir DIR with the datasets (e.g. gsm8k/train.jsonl), or --data FILE.jsonl with your conversations",
        )
    train: Task = TaskMixture(train_tasks)
    note = ""
    if data and not mix:
        val_tasks = []  # custom data alone: validate on a slice of it, not on unrelated sets
    if val_tasks:
        val: Task = TaskMixture(val_tasks)
    else:
        n = len(train)
        k = val_holdout if val_holdout is not None else min(500, max(1, n // 100))
        k = min(k, n - 1) if n > 1 else 0
        val = TaskSlice(train, start=n - k) if k > 0 else TaskSlice(train)
        if k > 0:
            train = TaskSlice(train, stop=n - k)
        note = (
            f"held out the last {k} conversations of the train mixture"
            if k
            else "no held-out set: validating on the training conversations"
        )
    from nanoctl.tasks.common import search_dirs

    searched = [str(d) for d in search_dirs(data_dir, home)]
    return Mixture(train, val, train_status, val_status, note, searched)
