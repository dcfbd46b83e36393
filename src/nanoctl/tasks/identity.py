"""A model with your name: the identity conversations rewritten to say who the model is and who made it.

nanochat's identity conversations teach the model that it is "nanochat", built by "Andrej Karpathy".
`Persona(name, creator).rewrite(text)` swaps both, consistently, in one pass over the text:

- every case form keeps its case: "nanochat" -> the name as given, "Nanochat" -> capitalised,
  "NANOCHAT" -> upper case; possessives follow for free ("nanochat's" -> "Ava's");
- the creator's variants all become the creator's full name: "Andrej Karpathy", "Andrej", "Karpathy"
  (and "Andrej Karpathy's" -> "Jane Doe's"); a full name is always right where a first name alone
  could be wrong (a company, a single name);
- inside addresses the slugs are used: "github.com/karpathy/nanochat" -> "github.com/jane-doe/ava",
  "nanochat.karpathy.ai" -> "ava.jane-doe.ai" (lower case, non-alphanumerics as "-").

The default persona is nanochat's own and leaves the text exactly as it is; a persona that changes only
the name keeps every mention of the creator (its addresses included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nanoctl.errors import UsageError

DEFAULT_NAME = "nanochat"
DEFAULT_CREATOR = "Andrej Karpathy"

# Inside an address: after "/", "." or "@", or right before ".<letter or digit>" (a domain, not a full stop).
_IN_ADDRESS = r"(?:(?<=[/.@]){w}|{w}(?=\.[a-z0-9]))"


def slug(text: str) -> str:
    """'Jane Doe' -> 'jane-doe' (what an address can hold)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _cased(found: str, replacement: str) -> str:
    """`replacement` in the case of `found`: NANOCHAT -> AVA, Nanochat -> Ava, nanochat -> as given."""
    if len(found) > 1 and found.isupper():
        return replacement.upper()
    if found[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


@dataclass(frozen=True)
class Persona:
    """Who the identity conversations say the model is (`name`) and who made it (`creator`)."""

    name: str = DEFAULT_NAME
    creator: str = DEFAULT_CREATOR

    def __post_init__(self) -> None:
        for flag, value in (("--identity-name", self.name), ("--identity-creator", self.creator)):
            if not value.strip() or any(c in value for c in "\n\r\t") or len(value) > 100:
                raise UsageError(f"{flag} {value!r}: expected a name on one line (1-100 characters)")
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "creator", self.creator.strip())

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_NAME and self.creator == DEFAULT_CREATOR

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        parts = []
        if self.creator != DEFAULT_CREATOR:
            parts += [
                "(?P<creator_address>" + _IN_ADDRESS.format(w="karpathy") + ")",
                r"(?P<creator>andrej\s+karpathy|andrej|karpathy)",
            ]
        if self.name != DEFAULT_NAME:
            parts += ["(?P<name_address>" + _IN_ADDRESS.format(w="nanochat") + ")", "(?P<name>nanochat)"]
        return re.compile("|".join(parts) or r"(?!)", re.IGNORECASE)

    def _replace(self, m: re.Match[str]) -> str:
        kind, found = m.lastgroup, m.group(0)
        if kind == "creator_address":
            return slug(self.creator)
        if kind == "name_address":
            return slug(self.name)
        return _cased(found, self.creator if kind == "creator" else self.name)

    def rewrite(self, text: str) -> str:
        """`text` saying this persona's name and creator instead of nanochat's (unchanged by default)."""
        if self.is_default:
            return text
        return self._pattern.sub(self._replace, text)

    def rewrite_conversation(self, conversation: dict[str, Any]) -> dict[str, Any]:
        """A copy of `{"messages": [...]}` with every message's text rewritten (string or text parts)."""
        if self.is_default:
            return conversation
        messages = []
        for msg in conversation["messages"]:
            content = msg["content"]
            if isinstance(content, str):
                content = self.rewrite(content)
            else:
                content = [p | {"text": self.rewrite(p["text"])} if p.get("type") == "text" else p for p in content]
            messages.append(msg | {"content": content})
        return conversation | {"messages": messages}

    def label(self) -> str:
        return f"{self.name} by {self.creator}"
