"""The CLI skeleton: instant help, no torch at import, version, one-line errors, cache commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from nanoctl.cli import app

runner = CliRunner()


def test_import_cli_does_not_import_torch() -> None:
    code = "import sys, nanoctl.cli; bad = [m for m in ('torch','textual','fastapi','datasets','numpy','pyarrow') if m in sys.modules]; print(','.join(bad))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_help_is_fast_and_lists_groups() -> None:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "nanoctl", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert "cache" in res.stdout
    # generous bound for a noisy 2-core machine; the real point is "no torch import"
    assert elapsed < 5.0


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.startswith("nanoctl ")


def test_cache_path_respects_home_flag_and_env(tmp_path: Path, home: Path) -> None:
    res = runner.invoke(app, ["cache", "path"])
    assert res.exit_code == 0 and res.stdout.strip() == str(home)
    other = tmp_path / "other"
    res = runner.invoke(app, ["--home", str(other), "cache", "path"])
    assert res.stdout.strip() == str(other.resolve())


def test_cache_ls_and_rm(home: Path) -> None:
    ck = home / "checkpoints" / "base" / "d4"
    ck.mkdir(parents=True)
    (ck / "model_000010.pt").write_bytes(b"x" * 100)
    (ck / "meta_000010.json").write_text("{}")
    (ck / "model_000020.pt").write_bytes(b"x" * 10)  # no meta: incomplete, not listed
    res = runner.invoke(app, ["cache", "ls", "--json"])
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)
    names = [e["name"] for e in entries]
    assert names == ["base/d4@10"]
    assert entries[0]["size_bytes"] == 102
    res = runner.invoke(app, ["cache", "rm", "checkpoints/base/d4"], input="n\n")
    assert res.exit_code == 1 and ck.exists()
    res = runner.invoke(app, ["cache", "rm", "checkpoints/base/d4", "--yes"])
    assert res.exit_code == 0 and not ck.exists()


def test_cache_rm_unknown_target_is_one_line_usage_error(home: Path) -> None:
    res = runner.invoke(app, ["cache", "rm", "bogus", "--yes"])
    assert res.exit_code == 2
    assert "error: cannot remove 'bogus'" in res.stderr
    assert "Traceback" not in res.output
