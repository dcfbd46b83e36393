"""The `nanoctl` command line: parses options and calls the library. Never imports torch at import time."""

from nanoctl.cli.main import app, run

__all__ = ["app", "run"]
