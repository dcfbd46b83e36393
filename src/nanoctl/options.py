"""Options declared once: a dataclass field carries its name, type, default, unit and help.

Every stage's options are a dataclass whose fields are made with `option(...)`. The CLI derives its
commands from those fields (nanoctl.cli.options), so a flag's name, default and help exist in one place.
Device presets are typed objects of the same class, applied with `apply_preset` (a `dataclasses.replace`
that fills the fields left at None); the help text of such a field lists the presets' values itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Help panels, in the order the CLI shows them.
MODEL = "Model"
HORIZON = "Horizon"
START = "Start from"
DATA = "Data"
OPTIMIZATION = "Optimization"
OUTPUT = "Eval and output"
RUNTIME = "Runtime"
DISTRIBUTED = "Distributed"
PANELS = [MODEL, HORIZON, START, DATA, OPTIMIZATION, OUTPUT, RUNTIME, DISTRIBUTED]


def option(
    default: Any = MISSING,
    *,
    help: str,
    unit: str | None = None,
    panel: str = RUNTIME,
    flag: str | None = None,
    cli: bool = True,
    factory: Any = MISSING,
    forward: bool = True,
) -> Any:
    """A dataclass field with its CLI metadata.

    `unit` is shown in the help ("[tokens]"); `flag` overrides the derived `--kebab-name`; `cli=False`
    keeps a library-only field (e.g. Task objects) out of the CLI; `forward=False` keeps a launcher-only
    field out of the argv a torchrun worker gets.
    """
    meta = {"help": help, "unit": unit, "panel": panel, "flag": flag, "cli": cli, "forward": forward}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def cli_fields(cls: type) -> list[Field[Any]]:
    return [f for f in fields(cls) if f.metadata.get("cli", False)]


def apply_preset(opts: T, preset: T) -> T:
    """`opts` with every field it left at None taken from `preset` (a typed object of the same class)."""
    chosen = {
        f.name: getattr(preset, f.name)
        for f in fields(opts)  # type: ignore[arg-type]
        if getattr(opts, f.name) is None and getattr(preset, f.name) is not None
    }
    return dataclasses.replace(opts, **chosen)  # type: ignore[type-var]


def preset_fields(presets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{field: {preset label: value}} for the fields some preset sets (their default is None)."""
    out: dict[str, dict[str, Any]] = {}
    for label, preset in presets.items():
        for f in fields(preset):
            value = getattr(preset, f.name)
            if default_of(f) is None and value is not None:
                out.setdefault(f.name, {})[label] = value
    return out


def options_argv(opts: Any, command: str) -> list[str]:
    """`command --flag value ...` for every forwarded option that differs from its default: what a
    torchrun worker runs. Built from the options (not sys.argv) so library callers can re-launch too."""
    from nanoctl.errors import UsageError

    argv = [command]
    for f in fields(opts):
        value = getattr(opts, f.name)
        if value == default_of(f) or not f.metadata.get("forward", True):
            continue
        if not f.metadata.get("cli", False):
            raise UsageError(
                f"{f.name} is a library-only option and cannot be passed to torchrun workers",
                "run in one process, or give the data as files (--data)",
            )
        flag = flag_name(f)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def jsonable(obj: Any) -> Any:
    """JSON round-trip rules (tuples -> lists, inf -> None, paths -> str) so saved and fresh compare equal."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def user_config(opts: Any) -> dict[str, Any]:
    """The options as JSON; library-only objects (Tasks) are recorded by name, never deep-copied."""
    cfg: dict[str, Any] = {}
    for f in fields(opts):
        if f.name == "dry_run":
            continue
        value = getattr(opts, f.name)
        if value is not None and not isinstance(value, (str, int, float, bool, list, tuple, dict, Path)):
            value = getattr(value, "name", type(value).__name__)
        cfg[f.name] = value
    return jsonable(cfg)
