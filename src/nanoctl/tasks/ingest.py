"""Copy task datasets from a directory into `<home>/data/tasks/`, and report which tasks are available.

Ingested copies keep their relative layout (gsm8k/train.jsonl, mmlu/test/*.csv, ...), so the same
loaders find them later without `--data-dir`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError
from nanoctl.home import Home

# Relative globs of the files the task loaders understand.
PATTERNS = (
    "gsm8k/**/*.jsonl",
    "gsm8k/**/*.parquet",
    "mmlu/**/*.csv",
    "mmlu/**/*.parquet",
    "mmlu/*.jsonl",
    "arc/**/*.jsonl",
    "arc/**/*.parquet",
    "ARC-Easy/*.jsonl",
    "ARC-Challenge/*.jsonl",
    "smoltalk/**/*.jsonl",
    "smoltalk/**/*.parquet",
    "smol-smoltalk/**/*.parquet",
    "humaneval/*",
    "HumanEval.jsonl*",
    "identity/identity_conversations.jsonl",
    "identity_conversations.jsonl",
    "words/words_alpha.txt",
    "words_alpha.txt",
    "eval_bundle/eval_data/world_knowledge/arc_*.jsonl",
)


def ingest_task_data(
    source: str | os.PathLike[str], home: Home | str | os.PathLike[str] | None = None
) -> list[Path]:
    """Copy every recognized dataset file under `source` into `<home>/data/tasks/`; returns the copies.

    An entry point (`nanoctl tasks ingest`): `home` is resolved here.
    """
    from nanoctl.atomic import atomic_path

    home = Home.resolve(home)

    src = Path(source).expanduser()
    if not src.is_dir():
        raise NanoctlError(
            f"{src} is not a directory", "pass the directory holding gsm8k/, mmlu/, identity/, ..."
        )
    dest_root = home.tasks_dir
    copied: list[Path] = []
    seen: set[Path] = set()
    for pattern in PATTERNS:
        for f in sorted(src.glob(pattern)):
            rel = f.relative_to(src)
            if not f.is_file() or rel in seen:
                continue
            seen.add(rel)
            dest = dest_root / rel
            with atomic_path(dest) as tmp:
                shutil.copyfile(f, tmp)
            copied.append(dest)
    if not copied:
        raise NanoctlError(
            f"no task dataset files found under {src}",
            "expected e.g. gsm8k/train.jsonl, mmlu/test/*.csv, identity/identity_conversations.jsonl, words/words_alpha.txt",
        )
    return copied


@dataclass
class TaskAvailability:
    name: str
    split: str
    eval_type: str
    rows: int | None
    source: str
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def task_availability(
    data_dir: str | os.PathLike[str] | None = None, home: Home | str | os.PathLike[str] | None = None
) -> list[TaskAvailability]:
    """Try to load each registered task's eval split (and the train split) locally.

    An entry point (`nanoctl tasks list`): `home` is resolved here.
    """
    import re
    import sys

    from nanoctl.tasks import TASK_INFO, TASKS, get_task

    home = Home.resolve(home)

    rows: list[TaskAvailability] = []
    saved = sys.modules.get("datasets", ...)
    sys.modules["datasets"] = None  # type: ignore[assignment]  # local files only: never wait on the hub here
    try:
        for name in TASKS:
            info = TASK_INFO[name]
            splits = ["train", "test"] if name not in ("HumanEval", "identity") else [info.default_split]
            for split in splits:
                try:
                    task = get_task(name, split=split, data_dir=data_dir, home=home)
                    rows.append(
                        TaskAvailability(
                            name, split, info.eval_type, len(task), getattr(task, "source", ""), None
                        )
                    )
                except NanoctlError as e:
                    msg = re.sub(r" \(looked in [^)]*\)", "", e.message)
                    msg = msg.split(" and ", 1)[-1] if " not found locally" in msg else msg
                    rows.append(TaskAvailability(name, split, info.eval_type, None, "", msg))
    finally:
        if saved is ...:
            sys.modules.pop("datasets", None)
        else:
            sys.modules["datasets"] = saved  # type: ignore[assignment]
    return rows
