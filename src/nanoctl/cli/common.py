"""Pieces every command module shares: the guarded Typer app class, consoles, common options, the
artifact home of the invocation (`home_of`) and option defaults taken from the library (`field_default`)."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from nanoctl.errors import NanoctlError
from nanoctl.home import Home
from nanoctl.inference_options import QUANTIZE_DEFAULT, QUANTIZE_HELP

F = TypeVar("F", bound=Callable[..., Any])

# Results go to stdout; logs, progress and errors to stderr so `--json` output stays clean.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def debug_enabled() -> bool:
    return os.environ.get("NANOCTL_DEBUG", "") not in ("", "0")


def report_error(message: str, hint: str | None = None) -> None:
    # Plain print (not rich markup) so file names with [brackets] survive and lines stay one line.
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def guard(fn: F) -> F:
    """Turn known failures into one-line errors with exit codes (1 known, 2 usage, 130 interrupted)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NanoctlError as e:
            if debug_enabled():
                raise
            report_error(e.message, e.hint)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            report_error("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # an unknown failure: still one line, traceback on request
            if debug_enabled():
                raise
            report_error(
                f"unexpected {type(e).__name__}: {e}",
                "rerun with NANOCTL_DEBUG=1 for the traceback, and please report it",
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class App(typer.Typer):
    """A Typer app whose commands report NanoctlError as one line instead of a traceback."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("rich_markup_mode", "rich")
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:  # type: ignore[override]
        register = super().command(*args, **kwargs)

        def decorator(fn: F) -> F:
            register(guard(fn))
            return fn

        return decorator


def home_of(ctx: typer.Context) -> Home:
    """The artifact home of this invocation: what the root callback resolved from --home / $NANOCTL_HOME
    and stored on the root context, or the default when no root callback ran (a sub-app invoked alone)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Home) else Home.resolve(None)


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls` (its factory called), so a CLI option's default is
    the library's: `= field_default(DownloadOptions, "workers")`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


# --- Options the training and eval commands share (pretrain, mid/sft/rl, eval) ----------------------------
# One declaration each so the help reads the same everywhere; each command sets its own default, and an
# option whose help, type or panel is stage-specific stays declared in its command module.

OPTIMIZATION_PANEL = "Optimization"
OUTPUT_PANEL = "Eval and output"
RUNTIME_PANEL = "Runtime"
DISTRIBUTED_PANEL = "Distributed"
PRESET_DEFAULT = "default: CUDA nanochat value, else the CPU preset"

EmbeddingLrOption = Annotated[
    float, typer.Option(help="AdamW LR of the token embedding.", rich_help_panel=OPTIMIZATION_PANEL)
]
UnembeddingLrOption = Annotated[
    float, typer.Option(help="AdamW LR of the output head.", rich_help_panel=OPTIMIZATION_PANEL)
]
MatrixLrOption = Annotated[
    float, typer.Option(help="Muon LR of the transformer matrices.", rich_help_panel=OPTIMIZATION_PANEL)
]
ScalarLrOption = Annotated[
    float, typer.Option(help="AdamW LR of the residual scalars.", rich_help_panel=OPTIMIZATION_PANEL)
]
SaveEveryOption = Annotated[
    int, typer.Option(help="Checkpoint every N steps (-1 = only at the end).", rich_help_panel=OUTPUT_PANEL)
]
KeepLastOption = Annotated[
    int, typer.Option(help="Keep only the newest K checkpoints (0 = keep all).", rich_help_panel=OUTPUT_PANEL)
]
WandbRunOption = Annotated[
    str | None,
    typer.Option(
        help="Log to wandb under this run name (needs wandb installed).",
        rich_help_panel=OUTPUT_PANEL,
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=RUNTIME_PANEL)
]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        help="Compute dtype: bfloat16, float16 or float32 (default: bf16 on CUDA SM80+, else fp32).",
        rich_help_panel=RUNTIME_PANEL,
        show_default=False,
    ),
]
# The options dataclasses declare it with nanoctl.inference_options.quantize_option (same help)
QuantizeOption = Annotated[str, typer.Option("--quantize", help=QUANTIZE_HELP, rich_help_panel=RUNTIME_PANEL)]
QUANTIZE = QUANTIZE_DEFAULT  # its default, for the hand-written commands (chat, eval chat)
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="CPU threads (default: all cores / processes).",
        rich_help_panel=RUNTIME_PANEL,
        show_default=False,
    ),
]
CompileOption = Annotated[
    str, typer.Option(help="torch.compile: auto (CUDA only), on, off.", rich_help_panel=RUNTIME_PANEL)
]
NprocOption = Annotated[
    int,
    typer.Option(
        help="Processes on this node (re-launches under torch.distributed.run).",
        rich_help_panel=DISTRIBUTED_PANEL,
    ),
]
NnodesOption = Annotated[int, typer.Option(help="Number of nodes.", rich_help_panel=DISTRIBUTED_PANEL)]
NodeRankOption = Annotated[
    int, typer.Option(help="This node's rank (0..nnodes-1).", rich_help_panel=DISTRIBUTED_PANEL)
]
RdzvOption = Annotated[
    str | None,
    typer.Option(
        help="HOST:PORT of node 0 (multi-node).", rich_help_panel=DISTRIBUTED_PANEL, show_default=False
    ),
]
