"""`nanoctl report`: built from metrics.jsonl written by MetricsLogger and eval records written by our own eval
functions on a tiny model; sections, plots, HTML inlining, and the empty-home error."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval_helpers import make_bundle, one_thread, tiny_model, tiny_tokenizer
from nanoctl.cli.main import app
from nanoctl.errors import NanoctlError
from nanoctl.evaluate import chat as CH
from nanoctl.evaluate.core import evaluate_core
from nanoctl.evaluate.results import EvalRecord, hardware_info, load_records, write_record
from nanoctl.home import Home
from nanoctl.metrics import MetricsLogger
from nanoctl.report import ReportOptions, generate_report, markdown_to_html, read_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _training_logs(home: Path) -> None:
    reports = home / "reports" / "d2"
    with MetricsLogger(reports) as m:
        for step in range(1, 21):
            m.log(step, loss=5.0 - 0.1 * step, dt=0.5)
            if step % 10 == 0:
                m.log(step, val_bpb=3.0 - 0.05 * step)
    (reports / "pretrain_config.json").write_text(
        json.dumps({"plan": {"flops_per_token": 1.5e6, "total_batch_size": 4096}})
    )
    with MetricsLogger(reports / "sft") as m:
        for step in range(1, 6):
            m.log(step, loss=2.0 - 0.1 * step, dt=0.2)


def _eval_records(home: Path, shared_data: Path, tmp_path: Path) -> float:
    """A base record with real CORE numbers from evaluate_core, and chat records for sft and rl."""
    bundle = make_bundle(shared_data, tmp_path / "bundle", rows=4)
    core = evaluate_core(tiny_model(), tiny_tokenizer(), "cpu", bundle, tasks=["copa", "winograd"])
    assert core.core is not None
    base = EvalRecord(
        kind="base",
        stage="base",
        tag="d2",
        step=20,
        model={"n_layer": 2},
        settings={"max_per_task": -1},
        results={"core": core.to_dict(), "bpb": {"train": 2.1, "val": 2.2}, "samples": ["x"]},
        seconds=1.0,
        hardware=hardware_info("cpu"),
    )
    write_record(base, Home(home))
    for stage, acc in (("sft", 0.5), ("rl", 0.75)):
        tasks = [
            CH.ChatTaskResult(
                "ARC-Easy", "categorical", 4, int(4 * acc), acc, 0.25, CH.centered(acc, 0.25), 0.1
            ),
            CH.ChatTaskResult("GSM8K", "generative", 4, 1, 0.25, 0.0, 0.25, 0.1, [0.25]),
        ]
        rec = EvalRecord(
            kind="chat",
            stage=stage,
            tag="d2",
            step=5,
            model={},
            settings={},
            results={"tasks": [t.__dict__ for t in tasks], "chatcore": CH.chatcore(tasks)},
            seconds=1.0,
        )
        write_record(rec, Home(home))
    return core.core


def test_report_from_real_logs_and_evals(home: Path, shared_data: Path, tmp_path: Path) -> None:
    _training_logs(home)
    tiny_tokenizer().save(home / "tokenizer")
    core = _eval_records(home, shared_data, tmp_path)
    assert [r.kind for r in load_records(Home(home))] == ["base", "chat", "chat"]
    res = generate_report(ReportOptions(html=True), home=home)
    md = Path(res.markdown_path).read_text()
    assert Path(res.markdown_path) == home / "reports" / "report.md"
    for title in (
        "Environment",
        "Tokenizer evaluation",
        "Training",
        "Base model evaluation",
        "Chat evaluation",
        "Summary",
    ):
        assert title in res.sections and f"## {title}" in md
    assert f"| **CORE** | | **{core:.4f}** |" in md
    assert "| base/d2 | 20 |" in md and "| sft/d2 | 5 |" in md
    assert "1.229e+11" in md  # FLOPs = 20 steps x 1.5e6 FLOPs/token x 4096 tokens/step
    assert "| ARC-Easy | 0.5000 | 0.7500 |" in md  # SFT and RL columns
    summary = md[md.index("## Summary") :]
    assert "| Metric | BASE | MID | SFT | RL |" in summary and f"| CORE | {core:.4f} | - | - | - |" in summary
    names = {Path(p).name for p in res.images}
    assert {
        "loss_vs_step.png",
        "val_bpb_vs_step.png",
        "loss_vs_flops.png",
        "tasks_by_stage.png",
        "core_tasks.png",
    } <= names
    for p in res.images:
        assert Path(p).read_bytes().startswith(PNG)
        assert f"]({Path(p).relative_to(home / 'reports').as_posix()})" in md
    html = Path(res.html_path).read_text()  # type: ignore[arg-type]
    assert html.count("data:image/png;base64,") == len(res.images) and "<table>" in html
    first = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first).startswith(PNG)


def test_report_cli_and_empty_home(home: Path) -> None:
    with pytest.raises(NanoctlError) as e:
        generate_report(ReportOptions(), home=home)
    assert "nanoctl pretrain" in (e.value.hint or "")
    r = CliRunner().invoke(app, ["report"])
    assert r.exit_code == 1 and "nothing to report" in r.output and "Traceback" not in r.output
    _training_logs(home)
    r = CliRunner().invoke(app, ["report", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["sections"][:2] == ["Environment", "Training"]


def test_metrics_reader_tolerates_torn_lines_and_resumes(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rows = read_jsonl(p)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3), (2, 1.5)]


def test_markdown_to_html_escapes(tmp_path: Path) -> None:
    out = markdown_to_html("# T <x>\n\n- a **b**\n\n| h |\n|---|\n| <td> |\n", tmp_path)
    assert "<h1>T &lt;x&gt;</h1>" in out and "<strong>b</strong>" in out and "<td>&lt;td&gt;</td>" in out
