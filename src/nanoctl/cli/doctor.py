"""`nanoctl doctor`: what this machine can do, what the home holds, and the next command to run.

Every check is a line with ✓ or ✗ and, when it fails, the fix. Nothing is downloaded and nothing is
compiled (torch.compile support is judged by a C compiler being present), so it runs in seconds on CPU.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Any

import typer

from nanoctl import __version__
from nanoctl.cli.common import JsonOption, home_of, out
from nanoctl.home import Home


@dataclass
class Check:
    group: str
    name: str
    ok: bool
    detail: str
    fix: str = ""  # shown when not ok


def sandbox_rows() -> list[dict[str, Any]]:
    from nanoctl.tools import sandbox

    return [{"layer": n, "active": a, "detail": d} for n, a, d in sandbox.layers().describe()]


def print_sandbox(rows: list[dict[str, Any]], isolated: bool, missing: list[str]) -> None:
    from rich.markup import escape

    out.print("[bold]code sandbox[/] (HumanEval, model-written code)")
    for r in rows:
        mark = "[green]✓[/]" if r["active"] else "[red]✗[/]"
        out.print(f"  {mark} {r['layer']:<13} {escape(r['detail'])}", soft_wrap=True)
    if isolated:
        out.print("  [green]contained:[/] untrusted code runs inside the kernel sandbox")
    else:
        out.print(f"  [red]refused:[/] {escape('; '.join(missing))}", soft_wrap=True)
        out.print("  HumanEval needs --unsafe-exec here (the Python guard alone, not a security boundary)")


def _runtime_checks() -> list[Check]:
    checks = [Check("runtime", "python", sys.version_info >= (3, 10), sys.version.split()[0], "use Python 3.10+")]
    try:
        import torch
    except ImportError as e:
        return [*checks, Check("runtime", "torch", False, str(e), "reinstall: pip install nanoctl")]
    checks.append(Check("runtime", "torch", True, torch.__version__))
    cuda = torch.cuda.is_available()
    checks.append(Check("gpu", "cuda", cuda, f"CUDA {torch.version.cuda}" if cuda else "no CUDA device (CPU only)",
                        "" if cuda else "fine for tiny runs; train real models on an NVIDIA GPU"))
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            checks.append(Check("gpu", f"cuda:{i}", True,
                                f"{p.name}, compute {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"))
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check("gpu", "bf16", bf16, "supported" if bf16 else "not supported on this GPU",
                            "training falls back to fp16 with loss scaling"))
        from nanoctl.model import attention

        flash = attention.flash_kernel()
        checks.append(Check("gpu", "flash attention", flash is not None, flash or "FA3/FA2 not importable",
                            "pip install flash-attn (else SDPA/FlexAttention are used)"))
        flex = attention.flex_available()  # imports sympy (seconds): only where it matters
        checks.append(Check("gpu", "flex attention", flex, "available" if flex else "missing in this torch",
                            "upgrade torch (sliding windows then use a dense mask)"))
        nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
        checks.append(Check("gpu", "nccl", nccl, "available" if nccl else "not built into this torch",
                            "multi-GPU needs a CUDA build of torch with NCCL"))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if mps:
        checks.append(Check("gpu", "mps", True, "Apple GPU available"))
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    checks.append(Check("runtime", "torch.compile", cc is not None,
                        f"C compiler {cc}" if cc else "no C compiler for Inductor",
                        "install gcc (Debian: apt install build-essential), or pass --compile off"))
    return sorted(checks, key=lambda c: c.group != "runtime")  # runtime lines first, then the GPU's


def _rust_check() -> Check:
    try:
        from nanoctl import _rustbpe  # noqa: F401
    except ImportError as e:
        return Check("runtime", "bpe trainer", False, f"Rust extension missing ({e})", "reinstall: pip install .")
    return Check("runtime", "bpe trainer", True, "Rust BPE trainer loaded")


def _home_checks(home: Home) -> tuple[list[Check], str]:
    """What the home holds, and the next command of the pipeline."""
    from nanoctl.checkpoint import list_checkpoints
    from nanoctl.data.shards import list_shards

    existing = next(p for p in (home.root, *home.root.parents) if p.exists())  # the home may not exist yet
    free = shutil.disk_usage(existing).free / 1e9
    checks = [Check("home", "home", True, str(home.root)),
              Check("home", "free disk", free >= 1.0, f"{free:.1f} GB free", "free some space, or pick --home elsewhere")]
    shards = list_shards(home.data_dir) if home.data_dir.is_dir() else []
    checks.append(Check("home", "shards", bool(shards), f"{len(shards)} in {home.data_dir}" if shards else
                        "none (the bundled sample text is used)", "nanoctl data download -n 8, or nanoctl data ingest FILE"))
    tok = (home.tokenizer_dir / "tokenizer.pkl").exists()
    checks.append(Check("home", "tokenizer", tok, str(home.tokenizer_dir) if tok else "not trained", "nanoctl tok train"))
    refs = list_checkpoints(home) if home.checkpoints_root.is_dir() else []
    stages: dict[str, list[str]] = {}
    for r in refs:
        stages.setdefault(r.stage, []).append(r.label)
    for stage in ("base", "mid", "sft", "rl"):
        labels = stages.get(stage, [])
        checks.append(Check("home", f"{stage} checkpoints", bool(labels),
                            f"{len(labels)} (newest {labels[-1]})" if labels else "none", ""))
    # The step after the furthest stage reached (a chat model can be talked to already).
    if stages.keys() & {"sft", "rl"}:
        nxt = "nanoctl chat"
    elif "mid" in stages:
        nxt = "nanoctl sft"
    elif "base" in stages:
        nxt = "nanoctl mid"
    else:
        nxt = "nanoctl pretrain" if tok else "nanoctl tok train"
    return checks, nxt


def _sandbox_check() -> Check:
    from nanoctl.tools import sandbox

    lay = sandbox.layers()
    return Check("sandbox", "code sandbox", lay.isolated,
                 "kernel isolation active" if lay.isolated else "; ".join(lay.missing),
                 "HumanEval needs --unsafe-exec here")


def doctor_cmd(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Check this machine and the artifact home: versions, GPUs, bf16/flash/compile, disk, what is
    trained so far, the code sandbox, and the next command to run.

    Example: [cyan]nanoctl doctor[/]
    """
    from concurrent.futures import ThreadPoolExecutor

    from rich.markup import escape

    from nanoctl.tools import sandbox

    home = home_of(ctx)
    # The sandbox probe waits on subprocesses (ldd, bwrap) while importing torch keeps the interpreter
    # busy: overlapping them keeps doctor near the cost of the torch import alone.
    with ThreadPoolExecutor(max_workers=1) as pool:
        sandbox_check = pool.submit(_sandbox_check)
        checks = [*_runtime_checks(), _rust_check()]
        home_checks, nxt = _home_checks(home)
        checks += [*home_checks, sandbox_check.result()]
    lay = sandbox.layers()
    report: dict[str, Any] = {
        "nanoctl": __version__,
        "platform": platform.platform(),
        "home": str(home.root),
        "checks": [asdict(c) for c in checks],
        "next": nxt,
        "sandbox": {"isolated": lay.isolated, "missing": lay.missing, "layers": sandbox_rows()},
    }
    if json_output:
        out.print_json(json.dumps(report))
        return
    out.print(f"nanoctl {__version__} · {report['platform']}", soft_wrap=True)
    group = ""
    for c in checks:
        if c.group != group:
            group = c.group
            out.print(f"[bold]{group}[/]")
        mark = "[green]✓[/]" if c.ok else "[red]✗[/]"
        fix = f"  [dim]→ {escape(c.fix)}[/]" if not c.ok and c.fix else ""
        out.print(f"  {mark} {c.name:<17} {escape(c.detail)}{fix}", soft_wrap=True)
    print_sandbox(report["sandbox"]["layers"], lay.isolated, lay.missing)
    out.print(f"next: [cyan]{nxt}[/]")


def register(app: typer.Typer) -> None:
    app.command("doctor", rich_help_panel="Setup")(doctor_cmd)
