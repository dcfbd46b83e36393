"""`nanoctl doctor`: what this machine can do (versions, accelerator, home, tokenizer, code sandbox)."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from typing import Any

import typer

from nanoctl import __version__
from nanoctl.cli.common import JsonOption, home_of, out


def sandbox_rows() -> list[dict[str, Any]]:
    from nanoctl.tools import sandbox

    return [{"layer": n, "active": a, "detail": d} for n, a, d in sandbox.layers().describe()]


def print_sandbox(rows: list[dict[str, Any]], isolated: bool, missing: list[str]) -> None:
    out.print("[bold]code sandbox[/] (HumanEval, model-written code)")
    for r in rows:
        mark = "[green]on [/]" if r["active"] else "[red]off[/]"
        out.print(f"  {mark} {r['layer']:<13} {r['detail']}", soft_wrap=True)
    if isolated:
        out.print("  [green]contained:[/] untrusted code runs inside the kernel sandbox")
    else:
        out.print(f"  [red]refused:[/] {'; '.join(missing)}", soft_wrap=True)
        out.print("  HumanEval needs --unsafe-exec here (the Python guard alone, not a security boundary)")


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:  # a broken install: say so rather than crash the doctor
        return {"torch": None, "error": str(e)}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return info


def _tokenizer() -> str:
    try:
        from nanoctl import _rustbpe  # noqa: F401

        return "Rust BPE trainer loaded"
    except ImportError as e:
        return f"Rust extension missing ({e}); reinstall with `pip install .`"


def doctor_cmd(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Report what this machine can do: versions, accelerator, artifact home, tokenizer, code sandbox.

    Example: [cyan]nanoctl doctor[/]
    """
    from nanoctl.tools import sandbox

    home = home_of(ctx)
    lay = sandbox.layers()
    existing = next(p for p in (home.root, *home.root.parents) if p.exists())  # the home may not exist yet
    usage = shutil.disk_usage(existing)
    report: dict[str, Any] = {
        "nanoctl": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **_torch(),
        "home": str(home.root),
        "home_free_gb": round(usage.free / 1e9, 1),
        "tokenizer": _tokenizer(),
        "sandbox": {"isolated": lay.isolated, "missing": lay.missing, "layers": sandbox_rows()},
    }
    if json_output:
        out.print_json(json.dumps(report))
        return
    out.print(f"nanoctl {report['nanoctl']} · Python {report['python']} · {report['platform']}", soft_wrap=True)
    if report.get("torch"):
        accel = ", ".join(report.get("devices", [])) or ("MPS" if report.get("mps") else "CPU only")
        out.print(f"torch {report['torch']} · {accel}" + (" · bf16" if report.get("bf16") else ""))
    else:
        out.print(f"[red]torch not importable:[/] {report.get('error')}")
    out.print(f"home {report['home']} ({report['home_free_gb']} GB free)", soft_wrap=True)
    out.print(f"tokenizer: {report['tokenizer']}")
    print_sandbox(report["sandbox"]["layers"], lay.isolated, lay.missing)


def register(app: typer.Typer) -> None:
    app.command("doctor", rich_help_panel="Setup")(doctor_cmd)
