"""Pieces every command module shares: the guarded Typer app class, consoles, common options."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from nanoctl.errors import NanoctlError

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


HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Artifact home (default: $NANOCTL_HOME, else the user cache dir, e.g. ~/.cache/nanoctl).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
