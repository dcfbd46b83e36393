"""`nanoctl serve --lora [NAME=]PATH` (repeatable): which adapters, under which model ids, on which base.

One unnamed adapter keeps the merged behaviour (the adapter folded into the weights at load, no cost per
token; the id is `nanoctl chat`'s label, `<base>+lora:<stage>@<step>`). Several, or any named one, are
served unmerged in a LoRA bank (`nanoctl.model.lora_bank`) beside the base: each adapter is a model id of
its own (NAME, else `lora:<stage>/<tag>@<step>` from its nanoctl_adapter.json, else `lora:<directory>`),
chosen per request by the `model` field.

Torch-free and checked before the port is bound: a bad or duplicate `--lora` is exit 2 at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoctl.adapters import RECORD_FILE, check_adapter_path
from nanoctl.errors import UsageError

FLAG = "--lora"


@dataclass(frozen=True)
class AdapterSpec:
    value: str  # the flag's value as given (for messages)
    name: str | None  # NAME of NAME=PATH
    path: Path

    def record(self) -> dict[str, Any]:
        """nanoctl's own record of the adapter ({} for one PEFT wrote)."""
        try:
            record = json.loads((self.path / RECORD_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def default_id(self) -> str:
        r = self.record()
        if all(k in r for k in ("stage", "tag", "step")):
            return f"lora:{r['stage']}/{r['tag']}@{r['step']}"
        return f"lora:{self.path.resolve().name}"

    @property
    def model_id(self) -> str:
        return self.name or self.default_id()


def parse_lora(values: list[str]) -> list[AdapterSpec]:
    """`PATH` or `NAME=PATH` per value, each an adapter directory (UsageError naming --lora otherwise)."""
    specs = []
    for value in values:
        name, sep, rest = value.partition("=")
        # NAME=PATH unless the whole value is an adapter directory (one whose name holds a '=')
        named = bool(sep) and not (Path(value).expanduser() / "adapter_config.json").is_file()
        if named and (not name or not rest or any(c.isspace() for c in name)):
            raise UsageError(f"{FLAG} {value!r}: the name before '=' must be a non-empty word, then a path",
                             f"pass {FLAG} NAME=PATH (e.g. {FLAG} math=~/adapters/sft/math) or just a PATH")
        path = check_adapter_path(rest if named else value, FLAG)
        specs.append(AdapterSpec(value, name if named else None, path))
    return specs


def banked(specs: list[AdapterSpec]) -> bool:
    """Several adapters (or a named one): served unmerged, each under its own model id."""
    return len(specs) > 1 or any(s.name for s in specs)


def adapter_ids(specs: list[AdapterSpec], base_id: str) -> list[str]:
    """The model id of each adapter, all distinct and none the base's (UsageError naming --lora)."""
    ids: list[str] = []
    for spec in specs:
        model_id = spec.model_id
        if model_id == base_id or model_id in ids:
            taken = "the base model's id" if model_id == base_id else "another adapter's id"
            raise UsageError(f"{FLAG} {spec.value}: model id {model_id!r} is already {taken}",
                             f"give each adapter its own name: {FLAG} NAME=PATH")
        ids.append(model_id)
    return ids


def check_one_base(specs: list[AdapterSpec], base: Any) -> None:
    """With the base taken from the first adapter, every other adapter that records its base must agree."""
    want = (base.stage, base.tag, base.step)
    for spec in specs[1:]:
        parent = spec.record().get("parent")
        if isinstance(parent, dict) and (parent.get("stage"), parent.get("tag"), parent.get("step")) != want:
            got = f"{parent.get('stage')}/{parent.get('tag')}@{parent.get('step')}"
            raise UsageError(
                f"{FLAG} {spec.value} was trained on {got}, {FLAG} {specs[0].value} on {base.label}",
                "serve adapters of one base together, or name the base with --stage/--tag/--step or --checkpoint",
            )  # fmt: skip
