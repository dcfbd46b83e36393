"""CLI defaults are the library's: each command option that maps onto an options dataclass field has
that field's default, and no help text restates a default Typer already shows.

To cover another command, add a row to ROWS: (command path, options class, {CLI param: field}), where
the field is a name, or (name, convert) when the CLI spells the value differently (e.g. --no-download
for download=True); `same(...)` maps params to fields of the same name.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import pytest
import typer

from nanoctl.cli.main import app
from nanoctl.data.download import DownloadOptions
from nanoctl.data.ingest import IngestOptions
from nanoctl.evaluate.base import BaseEvalOptions
from nanoctl.evaluate.chat import ChatEvalOptions
from nanoctl.options import cli_fields
from nanoctl.report import ReportOptions
from nanoctl.serve.server import ServeOptions
from nanoctl.tok_eval import TokEvalOptions
from nanoctl.tok_train import TokTrainOptions
from nanoctl.train.mid import MidOptions
from nanoctl.train.pretrain import PretrainOptions
from nanoctl.train.rl import RLOptions
from nanoctl.train.sft import SFTOptions

Field = str | tuple[str, Callable[[Any], Any]]


def same(*names: str) -> dict[str, Field]:
    return {n: n for n in names}


ROWS: list[tuple[tuple[str, ...], type, dict[str, Field]]] = [
    (
        ("data", "download"),
        DownloadOptions,
        {
            **same("shards", "workers", "dataset", "base_url", "timeout", "attempts", "retry_wait"),
            "out_dir": "out",
        },
    ),
    (
        ("data", "ingest"),
        IngestOptions,
        {
            **same(
                "doc_chars",
                "one_doc_per_file",
                "min_chars",
                "text_field",
                "column",
                "encoding",
                "encoding_errors",
                "shard_chars",
                "val_fraction",
                "seed",
                "row_group_size",
                "reshard",
                "force",
            ),
            "out_dir": "out",
        },
    ),
    (
        ("tok", "train"),
        TokTrainOptions,
        {
            **same("vocab_size", "max_chars", "doc_cap", "text_field", "encoding", "force"),
            "inputs": ("inputs", lambda v: list(v or [])),
        },
    ),
    (("tok", "eval"), TokEvalOptions, same("shards")),
    (
        ("eval", "base"),
        BaseEvalOptions,
        same(*(f.name for f in cli_fields(BaseEvalOptions))),  # derived from its options, as the stages
    ),
    (
        ("eval", "chat"),
        ChatEvalOptions,
        {
            **same(
                "max_problems",
                "num_samples",
                "temperature",
                "top_k",
                "max_new_tokens",
                "batch_size",
                "data_dir",
                "stage",
                "tag",
                "step",
                "checkpoint",
                "device",
                "dtype",
                "unsafe_exec",
                "quantize",
                "lora",
            ),
            "task": "tasks",
            "no_progress": ("progress", operator.not_),
        },
    ),
    (("report",), ReportOptions, {**same("html", "output"), "open_": "open"}),
    # the training commands are derived from their options: every CLI field maps onto itself
    *[
        ((name,), cls, same(*(f.name for f in cli_fields(cls))))
        for name, cls in (
            ("pretrain", PretrainOptions), ("mid", MidOptions), ("sft", SFTOptions), ("rl", RLOptions),
            ("serve", ServeOptions),
        )
    ],
]


def command(path: tuple[str, ...]) -> Any:
    """The click command (Typer's own click) at `path`, e.g. ("data", "download")."""
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def field_default(cls: type, name: str) -> Any:
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return f.default


@pytest.mark.parametrize(("path", "cls", "mapping"), ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_cli_defaults_are_the_options_defaults(
    path: tuple[str, ...], cls: type, mapping: dict[str, Field]
) -> None:
    params = {p.name: p for p in command(path).params}
    field_names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    unmapped = sorted(n for n in params if n in field_names - required and n not in mapping)
    assert not unmapped, f"{' '.join(path)}: add {unmapped} to its row"
    for param, target in mapping.items():
        assert param in params, f"{' '.join(path)} has no parameter {param!r}"
        name, convert = (target, lambda v: v) if isinstance(target, str) else target
        assert name in field_names, f"{cls.__name__} has no field {name!r}"
        got = convert(params[param].default)
        assert got == field_default(cls, name), (
            f"{' '.join(path)} {param}: CLI {got!r} != {cls.__name__}.{name}"
        )


@pytest.mark.parametrize("path", [r[0] for r in ROWS] + [("cache", "ls"), ("data", "ls")], ids=" ".join)
def test_help_never_restates_a_shown_default(path: tuple[str, ...]) -> None:
    for p in command(path).params:
        shown = p.default is not None and getattr(p, "show_default", None) is not False
        if shown and getattr(p, "is_flag", False) and p.default is False:
            shown = False  # Typer does not print "[default: False]" for plain flags
        assert not (shown and "default:" in (getattr(p, "help", None) or "")), (
            f"{' '.join(path)} {p.name}: the help restates the default Typer shows"
        )
