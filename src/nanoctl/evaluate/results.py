"""Eval result records: one JSON + one markdown file per eval under `<home>/reports/<tag>/`.

File names: `eval_<kind>_<stage>_<step:06d>.json|md` (kind = base | chat). A rerun of the same eval
replaces its files; `nanoctl report` reads the newest record per (kind, stage) via `load_records`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.atomic import atomic_write_json, atomic_write_text
from nanoctl.home import Home

KINDS = ("base", "chat")


@dataclass
class EvalRecord:
    """What one eval measured, on which model, with which settings, on which hardware."""

    kind: str  # base | chat
    stage: str
    tag: str
    step: int
    model: dict[str, Any]  # checkpoint ref + model config summary
    settings: dict[str, Any]
    results: dict[str, Any]  # kind-specific: base -> core/bpb/samples, chat -> tasks/chatcore
    seconds: float
    hardware: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    nanoctl_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalRecord:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def stem(self) -> str:
        return f"eval_{self.kind}_{self.stage}_{self.step:06d}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The nanoctl source checkout's commit (+ '-dirty'), or None outside a git checkout."""
    root = Path(path) if path else Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware_info(device: Any = None) -> dict[str, Any]:
    """Platform, CPU/RAM, GPUs, Python/torch versions (what the report's environment section shows)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["ram_gib"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
            info["gpu_memory_gib"] = [
                round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(n)
            ]
            info["cuda"] = torch.version.cuda
        else:
            info["gpus"] = []
    except ImportError:
        pass
    if device is not None:
        info["device"] = str(device)
    return info


def model_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of checkpoint meta worth keeping in a result: which checkpoint, which architecture."""
    out: dict[str, Any] = {}
    if "ref" in meta:
        out["checkpoint"] = meta["ref"]
    cfg = meta.get("model_config") or {}
    for k in (
        "n_layer",
        "n_embd",
        "n_head",
        "n_kv_head",
        "vocab_size",
        "sequence_len",
        "arch",
        "window_pattern",
    ):
        if k in cfg:
            out[k] = cfg[k]
    for k in ("parent", "val_bpb"):
        if meta.get(k) is not None:
            out[k] = meta[k]
    return out


def write_record(record: EvalRecord, home: Home) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` under `<home>/reports/<tag>/`; returns both paths."""
    from nanoctl import __version__

    record.created = record.created or now_iso()
    record.nanoctl_version = record.nanoctl_version or __version__
    directory = home.report_dir(record.tag)
    json_path = directory / f"{record.stem()}.json"
    md_path = directory / f"{record.stem()}.md"
    atomic_write_json(json_path, record.to_dict())
    atomic_write_text(md_path, render_markdown(record))
    return json_path, md_path


def load_records(home: Home) -> list[EvalRecord]:
    """Every eval record under `<home>/reports/*/`, oldest first (unreadable files are skipped)."""
    root = home.reports_root
    records = []
    for path in sorted(root.glob("*/eval_*.json")):
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("kind") in KINDS:
                records.append(EvalRecord.from_dict(d))
        except (OSError, json.JSONDecodeError, TypeError):
            continue
    records.sort(key=lambda r: r.created)
    return records


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(record: EvalRecord) -> str:
    r = record.results
    lines = [
        f"# {record.kind} eval: {record.stage}/{record.tag} step {record.step}",
        "",
        f"- created: {record.created}",
        f"- time: {record.seconds:.1f}s",
        f"- nanoctl: {record.nanoctl_version}",
        f"- device: {record.hardware.get('device', '-')}",
        f"- settings: {json.dumps(record.settings, sort_keys=True)}",
        "",
    ]
    if record.kind == "base":
        bpb = r.get("bpb") or {}
        if bpb:
            lines += ["## Bits per byte", "", "| split | bpb |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in bpb.items()]
            lines.append("")
        core = r.get("core")
        if core:
            lines += [
                "## CORE",
                "",
                "| Task | Type | Shots | N | Accuracy | Centered | Time (s) |",
                "|---|---|---|---|---|---|---|",
            ]
            for t in core["tasks"]:
                lines.append(
                    f"| {t['label']} | {t['task_type']} | {t['fewshot_used']} | {t['examples']} | "
                    f"{_fmt(t['accuracy'])} | {_fmt(t['centered'])} | {t['seconds']:.1f} |"
                )
            lines.append(f"| **CORE** | | | | | **{_fmt(core['core'])}** | {core['seconds']:.1f} |")
            if core.get("missing"):
                lines += [
                    "",
                    f"Missing task files (excluded): {', '.join(core['missing'])}; "
                    f"CORE covers {len(core['tasks'])} of {core['total_tasks']} tasks.",
                ]
            lines.append("")
        samples = r.get("samples") or []
        if samples:
            lines += ["## Samples", ""]
            lines += [f"- `{s}`".replace("\n", " ") for s in samples]
            lines.append("")
    elif record.kind == "chat":
        lines += [
            "## Tasks",
            "",
            "| Task | Type | N | Accuracy | Baseline | Centered | Time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in r.get("tasks", []):
            lines.append(
                f"| {t['name']} | {t['eval_type']} | {t['problems']} | {_fmt(t['accuracy'])} | "
                f"{_fmt(t['baseline'], 2)} | {_fmt(t['centered'])} | {t['seconds']:.1f} |"
            )
        lines.append(f"| **ChatCORE** | | | | | **{_fmt(r.get('chatcore'))}** | |")
        if r.get("chatcore_cat") is not None:
            lines.append(f"| ChatCORE (categorical) | | | | | {_fmt(r.get('chatcore_cat'))} | |")
        lines.append("")
    return "\n".join(lines)
