"""`nanoctl run`: starter data unpacking, stage validation, and (slow) the whole pipeline on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanoctl.cli import app
from nanoctl.home import Home
from nanoctl.tasks.starter import install_starter_task_data

runner = CliRunner()


def test_starter_task_data_unpacks_once(home: Path) -> None:
    written = install_starter_task_data(Home(home))
    names = sorted(p.relative_to(home / "data" / "tasks").as_posix() for p in written)
    assert names == ["identity/identity_conversations.jsonl", "words/words_alpha.txt"]
    first = (home / "data/tasks/identity/identity_conversations.jsonl").read_text().splitlines()
    assert len(first) == 1000 and json.loads(first[0])[0]["role"] == "user"
    words = (home / "data/tasks/words/words_alpha.txt").read_text().split("\n")
    assert "strawberry" in words and not any("\r" in w for w in words[:100])
    assert install_starter_task_data(Home(home)) == []  # second call: nothing to do


def test_starter_data_does_not_import_the_stages() -> None:
    """tasks.starter sits below the stages: the post-training stages import it without a cycle."""
    code = (
        "import sys, nanoctl.tasks.starter; "
        "print([m for m in sys.modules if m.startswith(('nanoctl.pipeline', 'nanoctl.train'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_stage_is_usage_error(home: Path) -> None:
    res = runner.invoke(app, ["run", "--stage", "pretrian"])
    assert res.exit_code == 2
    assert "pretrian" in res.stderr and "choose from" in res.stderr


@pytest.mark.slow
def test_whole_pipeline_on_cpu(home: Path) -> None:
    res = runner.invoke(app, ["run", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert [s["stage"] for s in result["stages"]] == ["tok", "pretrain", "mid", "sft", "eval", "report", "chat"]
    assert Path(result["report"]).exists()
    for stage in ("base", "mid", "sft"):
        assert list((home / "checkpoints" / stage / "d4").glob("meta_*.json"))
    # a second run keeps every finished stage
    res = runner.invoke(app, ["run", "--device", "cpu", "-s", "pretrain", "-s", "sft"])
    assert res.exit_code == 0, res.output
    assert "kept the existing checkpoint" in res.stderr
