"""Shared fixtures: an isolated artifact home per test, paths to ../shared/data, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NANOCTL_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (or NANOCTL_RUN_SLOW=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow") or os.environ.get("NANOCTL_RUN_SLOW") == "1"
    # `-m slow` selects them explicitly: then they run too.
    if not run_slow and "slow" not in (config.getoption("-m") or ""):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or NANOCTL_RUN_SLOW=1"))
    cuda = False
    if any("gpu" in item.keywords for item in items):
        try:
            import torch

            cuda = torch.cuda.is_available()
        except Exception:
            cuda = False
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh artifact home (a path), set as NANOCTL_HOME for the CLI and for entry points called
    without a home; library functions below them take `Home(home)` explicitly."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("NANOCTL_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
