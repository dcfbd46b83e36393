"""Conversations from a JSONL file: the identity conversations and user data (`--data FILE.jsonl`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nanoctl.conversations import load_conversations
from nanoctl.errors import NanoctlError
from nanoctl.home import Home
from nanoctl.tasks.common import Conversation, Task, find_local
from nanoctl.tasks.identity import Persona

IDENTITY_CANDIDATES = ("identity/identity_conversations.jsonl", "identity_conversations.jsonl")


class CustomJSON(Task):
    """Every line of a JSONL file is one conversation (validated with line numbers on load)."""

    eval_type = "generative"

    def __init__(self, filepath: str | os.PathLike[str], name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filepath = Path(filepath)
        self.name = name or self.filepath.stem
        self.source = str(self.filepath)
        self.conversations = load_conversations(self.filepath)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return self.conversations[index]


def identity_path(data_dir: str | os.PathLike[str] | None = None, home: Home | None = None) -> Path | None:
    """Where the identity conversations live, if anywhere: data dirs, then `<home>/identity_conversations.jsonl`."""
    found = find_local(IDENTITY_CANDIDATES, data_dir, home)
    if found is None and home is not None:
        legacy = home.root / "identity_conversations.jsonl"  # where nanochat keeps it
        found = legacy if legacy.exists() else None
    return found


def Identity(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    home: Home | None = None,
    persona: Persona | None = None,
    **kwargs: Any,
) -> CustomJSON:
    """nanochat's identity conversations (about 1K synthetic chats teaching the model who it is), saying
    `persona`'s name and creator instead of nanochat's when one is given (tasks/identity.py)."""
    path = identity_path(data_dir, home)
    if path is None:
        raise NanoctlError(
            "identity conversations not found (identity_conversations.jsonl)",
            "pass --data-dir DIR holding identity/identity_conversations.jsonl, or copy it under <home>/data/tasks/",
        )
    task = CustomJSON(path, name="identity", **kwargs)
    if persona is not None and not persona.is_default:
        task.conversations = [persona.rewrite_conversation(c) for c in task.conversations]
        task.source = f"{path}, as {persona.label()}"
    return task
