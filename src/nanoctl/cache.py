"""Listing and removing what the artifact home holds (the library side of `nanoctl cache`)."""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

_STEP_RE = re.compile(r"^model_(\d+)\.pt$")


@dataclass
class Artifact:
    kind: str  # shards | tokenizer | checkpoint | adapter | eval | report | tasks
    name: str  # e.g. "base", "sample", "base/d4@000100", "sft/d4" (an adapter directory)
    path: str
    size_bytes: int
    modified: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modified_iso"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.modified))
        return d


def _tree_size(path: Path) -> tuple[int, float]:
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, mtime = 0, path.stat().st_mtime if path.exists() else 0.0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
    return size, mtime


def checkpoint_steps(directory: Path) -> list[int]:
    """Complete steps in a checkpoint dir: the model file and its meta (written last) both exist."""
    steps = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (directory / f"meta_{m.group(1)}.json").exists():
                steps.append(int(m.group(1)))
    return sorted(steps)


def _shard_detail(name: str, directory: Path, count: int) -> str:
    """`N shards (last = val), D docs, C chars` from parquet footers only (cheap even for big shards)."""
    from nanoctl.data.shards import summarize_shard_dir

    s = summarize_shard_dir(name, directory)
    detail = f"{count} shards (last = val), {s.documents:,} docs"
    chars = s.characters
    detail += f", {chars / 1e6:.1f}M chars" if chars is not None else f", ~{s.text_bytes / 1e6:.0f} MB text"
    if s.problems:
        detail += f", {len(s.problems)} unreadable (see `nanoctl data ls`)"
    return detail


def list_artifacts(home: Home | str | os.PathLike[str] | None = None) -> list[Artifact]:
    """What the home holds (`nanoctl cache ls`). An entry point: `home` is resolved here."""
    h = Home.resolve(home)
    found: list[Artifact] = []
    for name, d in (("base", h.data_dir), ("sample", h.sample_data_dir)):
        shards = sorted(d.glob("shard_*.parquet")) if d.is_dir() else []
        if shards:
            size, mtime = _tree_size(d)
            found.append(Artifact("shards", name, str(d), size, mtime, _shard_detail(name, d, len(shards))))
    if h.tasks_dir.is_dir() and any(h.tasks_dir.iterdir()):
        size, mtime = _tree_size(h.tasks_dir)
        found.append(Artifact("tasks", "tasks", str(h.tasks_dir), size, mtime))
    if (h.tokenizer_dir / "tokenizer.pkl").exists():
        size, mtime = _tree_size(h.tokenizer_dir)
        found.append(Artifact("tokenizer", "tokenizer", str(h.tokenizer_dir), size, mtime))
    if h.checkpoints_root.is_dir():
        for stage_dir in sorted(p for p in h.checkpoints_root.iterdir() if p.is_dir()):
            for tag_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                for step in checkpoint_steps(tag_dir):
                    files = list(tag_dir.glob(f"*_{step:06d}*"))
                    size = sum(f.stat().st_size for f in files)
                    mtime = max(f.stat().st_mtime for f in files)
                    has_optim = any(f.name.startswith("optim_") for f in files)
                    found.append(
                        Artifact(
                            "checkpoint",
                            f"{stage_dir.name}/{tag_dir.name}@{step}",
                            str(tag_dir),
                            size,
                            mtime,
                            "model+optimizer" if has_optim else "model",
                        )
                    )
    found.extend(_adapters(h))
    if h.eval_bundle_dir.is_dir():
        size, mtime = _tree_size(h.eval_bundle_dir)
        found.append(Artifact("eval", "bundle", str(h.eval_bundle_dir), size, mtime))
    if h.reports_root.is_dir():
        for d in sorted(p for p in h.reports_root.iterdir() if p.is_dir()):
            size, mtime = _tree_size(d)
            found.append(Artifact("report", d.name, str(d), size, mtime))
    return found


def _adapters(h: Home) -> list[Artifact]:
    """One entry per LoRA run directory (`<home>/adapters/<stage>/<tag>`): its PEFT files plus the
    checkpoints it resumes from; the detail names rank, alpha and the base it was trained on."""
    import json

    found = []
    if not h.adapters_root.is_dir():
        return found
    for stage_dir in sorted(p for p in h.adapters_root.iterdir() if p.is_dir()):
        for tag_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            size, mtime = _tree_size(tag_dir)
            parts = []
            try:
                cfg = json.loads((tag_dir / "adapter_config.json").read_text())
                parts.append(f"rank {cfg['r']}, alpha {cfg['lora_alpha']:g}")
                record = json.loads((tag_dir / "nanoctl_adapter.json").read_text())
                parent, step = record.get("parent") or {}, record.get("step")
                if parent:
                    parts.append(f"on {parent['stage']}/{parent['tag']}@{parent['step']}")
                if step is not None:
                    parts.append(f"step {step}")
            except (OSError, ValueError, KeyError, TypeError):
                parts = parts or ["no adapter files yet (an interrupted first run?)"]
            steps = checkpoint_steps(tag_dir)
            if steps:
                parts.append(f"{len(steps)} checkpoint{'s' if len(steps) > 1 else ''}")
            found.append(Artifact("adapter", f"{stage_dir.name}/{tag_dir.name}", str(tag_dir), size, mtime,
                                  ", ".join(parts)))
    return found


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render_table(entries: list[Artifact], console: Any, home: Home) -> None:
    from rich.table import Table

    root = home.root
    if not entries:
        console.print(f"{root} is empty. Start with `nanoctl tok train` (uses the embedded sample).")
        return
    table = Table(title=str(root), title_justify="left")
    for col in ("kind", "name", "size", "modified", "detail"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for e in entries:
        table.add_row(
            e.kind,
            e.name,
            _human(e.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified)),
            e.detail,
        )
    console.print(table)
    console.print(f"total {_human(sum(e.size_bytes for e in entries))}")


def resolve_targets(names: list[str], home: Home | str | os.PathLike[str] | None = None) -> list[Path]:
    """The paths `nanoctl cache rm NAME...` removes. An entry point: `home` is resolved here."""
    h = Home.resolve(home)
    fixed = {
        "data": h.root / "data",
        "tokenizer": h.tokenizer_dir,
        "checkpoints": h.checkpoints_root,
        "adapters": h.adapters_root,
        "reports": h.reports_root,
        "eval": h.root / "eval",
        "all": h.root,
    }
    targets: list[Path] = []
    for name in names:
        if name in fixed:
            path = fixed[name]
        elif name.startswith("checkpoints/") and 2 <= len(name.split("/")) <= 3:
            path = h.checkpoints_root.joinpath(*name.split("/")[1:])
        elif name.startswith("adapters/") and 2 <= len(name.split("/")) <= 3:
            path = h.adapters_root.joinpath(*name.split("/")[1:])
        elif name.startswith("reports/") and len(name.split("/")) == 2:
            path = h.reports_root / name.split("/")[1]
        else:
            raise UsageError(
                f"cannot remove {name!r}: expected data, tokenizer, checkpoints[/<stage>[/<tag>]], "
                "adapters[/<stage>[/<tag>]], reports[/<tag>], eval or all",
                "see `nanoctl cache ls` for what exists",
            )
        if not path.exists():
            raise NanoctlError(f"nothing to remove at {path}", "see `nanoctl cache ls` for what exists")
        targets.append(path)
    return targets


def remove_artifacts(targets: list[Path]) -> int:
    freed = 0
    for t in targets:
        freed += _tree_size(t)[0]
        if t.is_dir():
            shutil.rmtree(t)
        else:
            t.unlink()
    return freed
