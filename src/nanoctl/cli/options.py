"""Typer commands derived from options dataclasses (nanoctl.options): one declaration per flag.

`options_command(cls, call, presets)` builds a function whose signature Typer reads: one parameter per
CLI field of `cls`, with the field's type, default, help, unit and panel, plus `--json`. The function
builds `cls(**values)` and hands it to `call(ctx, opts, json_output)`. Fields that a device preset fills
(default None) get their help's default text from the presets, so no help restates a default by hand.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from nanoctl.options import PANELS, RUNTIME, cli_fields, default_of, flag_name, preset_fields


def _help(f: Any, preset_values: dict[str, Any] | None) -> str:
    from rich.markup import escape  # the help is rich markup: brackets must be escaped to show

    text = f.metadata["help"]
    if f.metadata.get("unit"):
        text += escape(f" [{f.metadata['unit']}]")
    if preset_values:
        text += escape(" [default: " + ", ".join(f"{k} {v}" for k, v in preset_values.items()) + "]")
    return text


def options_command(
    cls: type,
    call: Callable[[typer.Context, Any, bool], None],
    presets: dict[str, Any] | None = None,
    doc: str | None = None,
) -> Callable[..., None]:
    """A Typer command function for the options dataclass `cls`; see the module docstring."""
    hints = typing.get_type_hints(cls)
    by_preset = preset_fields(presets or {})
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for f in sorted(cli_fields(cls), key=lambda f: PANELS.index(f.metadata.get("panel", RUNTIME))):
        default = default_of(f)
        kind = hints[f.name]
        args = typing.get_args(kind)
        flag = flag_name(f)
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool and default is True else [flag]
        if typing.get_origin(kind) is list or (args and any(typing.get_origin(a) is list for a in args)):
            kind = list[str]  # a repeatable flag
            default = list(default)
        info = typer.Option(
            *decls,
            help=_help(f, by_preset.get(f.name)),
            rich_help_panel=f.metadata.get("panel"),
            show_default=default not in (None, []) and f.name not in by_preset,
        )
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
            )
        )
    params.append(
        inspect.Parameter(
            "json_output",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")],
        )
    )

    def command(ctx: typer.Context, **values: Any) -> None:
        json_output = values.pop("json_output")
        call(ctx, cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}), json_output)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


def argument_command(
    cls: type,
    call: Callable[[typer.Context, str, Any, bool], None],
    argument: Any,
    doc: str | None = None,
) -> Callable[..., None]:
    """`options_command` with one leading positional argument (`argument`: an Annotated[str,
    typer.Argument(...)]) before the options: `call(ctx, value, opts, json_output)`."""
    holder: dict[str, str] = {}
    inner = options_command(cls, lambda ctx, opts, json_output: call(ctx, holder["value"], opts, json_output),
                            None, doc)
    sig = inspect.signature(inner)
    params = list(sig.parameters.values())
    params.insert(1, inspect.Parameter("value", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=argument))

    def command(ctx: typer.Context, value: str, **values: Any) -> None:
        holder["value"] = value
        inner(ctx, **values)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command
