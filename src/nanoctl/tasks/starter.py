"""Starter task data: the identity conversations and word list shipped in `nanoctl/sample_data`.

mid/sft (and `nanoctl run`) unpack them under `<home>/data/tasks/` so the post-training tasks that read
them (identity conversations, SpellingBee's word list) work offline on a fresh home.
"""

from __future__ import annotations

import gzip
import shutil
from importlib import resources
from pathlib import Path

from nanoctl.atomic import atomic_path
from nanoctl.home import Home

# Files shipped in nanoctl/sample_data that the post-training tasks look for under <home>/data/tasks/.
STARTER_TASK_FILES = {
    "identity_conversations.jsonl.gz": Path("identity") / "identity_conversations.jsonl",
    "words_alpha.txt.gz": Path("words") / "words_alpha.txt",
}


def install_starter_task_data(home: Home) -> list[Path]:
    """Unpack the bundled identity conversations and word list under <home>/data/tasks/ (once)."""
    tasks_dir = home.tasks_dir
    written = []
    for packaged, target in STARTER_TASK_FILES.items():
        dest = tasks_dir / target
        if dest.exists():
            continue
        src = resources.files("nanoctl.sample_data") / packaged
        with (
            src.open("rb") as raw,
            gzip.open(raw) as unpacked,
            atomic_path(dest) as tmp,
            open(tmp, "wb") as f,
        ):
            shutil.copyfileobj(unpacked, f)
        written.append(dest)
    return written
