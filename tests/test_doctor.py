"""`nanoctl doctor`: ✓/✗ lines with fixes, what the home holds, and the next command; --json."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from eval_helpers import populate_home
from nanoctl.cli.main import app


def _doctor() -> dict:
    r = CliRunner().invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_an_empty_home_says_train_the_tokenizer_first(home: Path) -> None:
    d = _doctor()
    checks = {c["name"]: c for c in d["checks"]}
    assert checks["python"]["ok"] and checks["torch"]["ok"] and checks["bpe trainer"]["ok"]
    assert not checks["tokenizer"]["ok"] and checks["tokenizer"]["fix"] == "nanoctl tok train"
    assert not checks["shards"]["ok"] and "nanoctl data" in checks["shards"]["fix"]
    assert not checks["base checkpoints"]["ok"]
    assert d["next"] == "nanoctl tok train"
    assert d["home"] == str(home.resolve())
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0
    assert "✗ shards" in r.output and "→ nanoctl data download" in r.output
    assert "✓ python" in r.output and "next: nanoctl tok train" in r.output


def test_the_next_command_follows_what_the_home_holds(home: Path) -> None:
    populate_home(home, stage="base")
    d = _doctor()
    checks = {c["name"]: c for c in d["checks"]}
    assert checks["shards"]["ok"] and "2 in" in checks["shards"]["detail"]
    assert checks["base checkpoints"]["ok"] and "base/d2@5" in checks["base checkpoints"]["detail"]
    assert d["next"] == "nanoctl mid"
    populate_home(home, stage="sft")
    assert _doctor()["next"] == "nanoctl chat"
