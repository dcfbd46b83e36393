"""Custom conversation data: validate JSONL files of conversations, record by record.

One conversation per line, either `{"messages": [...]}` or a bare list of messages (nanochat's identity
file format). A message is `{"role": "system"|"user"|"assistant", "content": ...}`: an optional leading
system message, then user/assistant strictly alternating, starting with user and ending with assistant.
Assistant content may be a string or a list of parts `{"type": "text"|"python"|"python_output", "text": str}`.
Every problem is reported as `FILE:LINE: what` so the user can jump to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")
FORMAT_HINT = (
    'one conversation per line: {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]} or a bare list of such messages'
)


def _content_text(content: Any, where: str) -> str:
    """All text of a message's content; raises on a malformed content value."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") not in PART_TYPES
                or not isinstance(part.get("text"), str)
            ):
                raise NanoctlError(
                    f"{where}: content part {j} must be {{'type': text|python|python_output, 'text': str}}",
                    FORMAT_HINT,
                )
            texts.append(part["text"])
        return "".join(texts)
    raise NanoctlError(
        f"{where}: content must be a string or a list of parts, got {type(content).__name__}", FORMAT_HINT
    )


def validate_conversation(obj: Any, where: str) -> dict[str, Any]:
    """Return `{"messages": [...]}` for a valid conversation, else raise NanoctlError naming `where`."""
    if isinstance(obj, dict):
        if "messages" not in obj:
            raise NanoctlError(f"{where}: object has no 'messages' key", FORMAT_HINT)
        messages = obj["messages"]
    else:
        messages = obj
    if not isinstance(messages, list):
        raise NanoctlError(
            f"{where}: expected a list of messages, got {type(messages).__name__}", FORMAT_HINT
        )
    if not messages:
        raise NanoctlError(f"{where}: conversation has no messages", FORMAT_HINT)
    body = messages
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise NanoctlError(
                f"{where}: message {i} must be an object with 'role' and 'content'", FORMAT_HINT
            )
        role = msg["role"]
        if role not in ROLES:
            raise NanoctlError(
                f"{where}: message {i} has unknown role {role!r} (expected system, user or assistant)"
            )
        if role == "system" and i != 0:
            raise NanoctlError(f"{where}: message {i} is a system message; only the first message may be one")
        text = _content_text(msg["content"], f"{where}: message {i}")
        if role == "assistant" and not text.strip():
            raise NanoctlError(
                f"{where}: message {i} is an empty assistant turn", "remove it or give it content"
            )
    if messages[0]["role"] == "system":
        body = messages[1:]
        if not isinstance(messages[0]["content"], str):
            raise NanoctlError(f"{where}: the system message's content must be a string")
    if len(body) < 2:
        raise NanoctlError(
            f"{where}: a conversation needs at least a user and an assistant message", FORMAT_HINT
        )
    offset = len(messages) - len(body)
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise NanoctlError(
                f"{where}: message {i + offset} has role {msg['role']!r} but {expected!r} was expected "
                "(roles must alternate user, assistant, ...)"
            )
        if msg["role"] == "user" and not isinstance(msg["content"], str):
            raise NanoctlError(f"{where}: message {i + offset}: user content must be a string")
    if body[-1]["role"] != "assistant":
        raise NanoctlError(
            f"{where}: the conversation ends with a user message; it must end with the assistant's reply"
        )
    out: dict[str, Any] = {"messages": messages}
    if isinstance(obj, dict):  # keep extra keys (e.g. letters) but never trust them for training
        out.update({k: v for k, v in obj.items() if k != "messages"})
    return out


def load_conversations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a conversations JSONL file; blank lines are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NanoctlError(
            f"conversation file {p} does not exist", "pass --data FILE.jsonl with one conversation per line"
        )
    conversations: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoctlError(
                    f"{where}: malformed JSON ({e.msg} at column {e.colno})", FORMAT_HINT
                ) from None
            conversations.append(validate_conversation(obj, where))
    if not conversations:
        raise NanoctlError(f"conversation file {p} holds no conversations", FORMAT_HINT)
    return conversations
