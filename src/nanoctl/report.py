"""`nanoctl report`: one markdown report card across stages (nanochat OLD/MID report.py), plus PNG plots.

Reads only what runs left under `<home>/reports/`: training `metrics.jsonl` (base: `<tag>/metrics.jsonl`;
mid/sft/rl: `<tag>/<stage>/metrics.jsonl`), `<tag>/pretrain_config.json` (FLOPs per step), eval records
(`eval_{base,chat}_*.json`, see evaluate/results.py) and tokenizer eval JSON if any. Writes
`<home>/reports/report.md`, `plots/*.png` and, with --html, a single-file `report.html` (images inlined).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError
from nanoctl.home import STAGES, Home

# nanochat report.py's hourly rates per GPU (USD); anything else is $2/GPU/hour, CPU-only is not priced.
GPU_HOURLY = (("H100", 3.00), ("A100", 1.79), ("V100", 0.55))
SUMMARY_METRICS = (
    "CORE",
    "ARC-Challenge",
    "ARC-Easy",
    "GSM8K",
    "HumanEval",
    "MMLU",
    "SpellingBee",
    "ChatCORE",
)


@dataclass
class ReportOptions:
    html: bool = False
    open: bool = False
    output: str | os.PathLike[str] | None = None  # markdown path (default <home>/reports/report.md)


@dataclass
class ReportResult:
    markdown_path: str
    html_path: str | None = None
    images: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Run:
    """One training run's metrics.jsonl, with FLOPs per step when the plan says."""

    tag: str
    stage: str
    path: Path
    rows: list[dict[str, Any]]
    flops_per_step: float | None = None

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.tag}"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(int(r["step"]))
                ys.append(float(v))
        return xs, ys

    def training_seconds(self) -> float:
        # Sum of per-step durations; falls back to the wall-clock span of the log.
        dts = [r["dt"] for r in self.rows if isinstance(r.get("dt"), (int, float))]
        if dts:
            return float(sum(dts))
        times = [r["time"] for r in self.rows if isinstance(r.get("time"), (int, float))]
        return float(max(times) - min(times)) if len(times) > 1 else 0.0

    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows), default=0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            rows.append(rec)
    # A resumed run may re-log steps: keep the last record per step, in step order.
    by_step: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        kind = "val" if "val_bpb" in r and "loss" not in r else "train"
        by_step[(int(r["step"]), kind)] = r
    return [by_step[k] for k in sorted(by_step)]


def find_runs(reports_root: Path) -> list[Run]:
    runs = []
    for path in sorted(reports_root.glob("*/metrics.jsonl")) + sorted(reports_root.glob("*/*/metrics.jsonl")):
        rel = path.relative_to(reports_root).parts
        tag = rel[0]
        stage = rel[1] if len(rel) == 3 else "base"
        if stage not in STAGES:
            continue
        rows = read_jsonl(path)
        if not rows:
            continue
        run = Run(tag=tag, stage=stage, path=path, rows=rows)
        cfg = reports_root / tag / "pretrain_config.json"
        if stage == "base" and cfg.exists():
            try:
                plan = json.loads(cfg.read_text(encoding="utf-8")).get("plan", {})
                run.flops_per_step = float(plan["flops_per_token"]) * float(plan["total_batch_size"])
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                pass
        runs.append(run)
    return runs


def find_tokenizer_evals(home: Home) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for pattern in ("tok*eval*.json", "*/tok*eval*.json"):
        for base in (home.reports_root, home.tokenizer_dir):
            for p in sorted(base.glob(pattern)):
                try:
                    found.append((p, json.loads(p.read_text(encoding="utf-8"))))
                except (OSError, json.JSONDecodeError):
                    continue
    return found


def tokenizer_compression(home: Home) -> dict[str, Any] | None:
    """nanoctl's tokenizer evaluation (offline: peers only when tiktoken has them cached); None if no tokenizer."""
    if not (home.tokenizer_dir / "tokenizer.pkl").exists():
        return None
    try:
        from nanoctl.data.shards import list_shards
        from nanoctl.tok_eval import TokEvalOptions, evaluate_tokenizer

        has_shards = len(list_shards(home.data_dir)) >= 2 if home.data_dir.is_dir() else False
        return evaluate_tokenizer(TokEvalOptions(shards=has_shards), home=home).to_dict()
    except Exception:  # the report card must not fail because one optional section could not be built
        return None


def gpu_hourly_rate(gpu_names: list[str]) -> float | None:
    if not gpu_names:
        return None
    total = 0.0
    for name in gpu_names:
        total += next((rate for key, rate in GPU_HOURLY if key in name), 2.0)
    return total


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(
                v,
                f"{prefix}{k}." if not isinstance(v, (str, int, float, bool, type(None))) else f"{prefix}{k}",
            )
        return out
    if isinstance(d, list):
        return [(prefix.rstrip("."), json.dumps(d)[:200])]
    return [(prefix, d)]


# ---------------------------------------------------------------------------------------------------------
# Plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[Run], key: str, xaxis: str, path: Path, title: str) -> bool:
    """Line plot of `key` vs step (xaxis='step') or vs FLOPs; False when no run has the data."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    drawn = 0
    for run in runs:
        xs, ys = run.series(key)
        if not xs:
            continue
        if xaxis == "flops":
            if not run.flops_per_step:
                continue
            xs = [x * run.flops_per_step for x in xs]
        ax.plot(xs, ys, label=run.label, marker="o" if len(xs) < 30 else None, markersize=3)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step" if xaxis == "step" else "FLOPs")
    if xaxis == "flops":
        ax.set_xscale("log")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_task_bars(
    table: dict[str, dict[str, float | None]], stages: list[str], path: Path, title: str
) -> bool:
    """Grouped bars: one group per metric, one bar per stage."""
    metrics = [m for m in table if any(table[m].get(s) is not None for s in stages)]
    stages = [s for s in stages if any(table[m].get(s) is not None for m in metrics)]  # no empty slots
    if not metrics:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics)), 4), dpi=100)
    width = 0.8 / max(len(stages), 1)
    for j, stage in enumerate(stages):
        vals = [table[m].get(stage) for m in metrics]
        xs = [i + j * width for i in range(len(metrics))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width=width, label=stage.upper())
    ax.set_xticks([i + width * (len(stages) - 1) / 2 for i in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# The report


def _newest(records: list[Any], kind: str) -> dict[str, Any]:
    """Newest record of `kind` per stage (records come oldest first)."""
    out: dict[str, Any] = {}
    for r in records:
        if r.kind == kind:
            out[r.stage] = r
    return out


def build_report(opts: ReportOptions, home: Home) -> tuple[str, list[Path], list[str]]:
    """(markdown, image paths, section titles). Raises NanoctlError when there is nothing to report."""
    from nanoctl import __version__
    from nanoctl.evaluate.results import git_commit, hardware_info, load_records

    root = home.reports_root
    runs = find_runs(root) if root.is_dir() else []
    records = load_records(home) if root.is_dir() else []
    tok_evals = find_tokenizer_evals(home)
    if not runs and not records and not tok_evals:
        raise NanoctlError(
            f"nothing to report: no training metrics or eval results under {root}",
            "run `nanoctl pretrain` and `nanoctl eval base` (then `nanoctl sft` and `nanoctl eval chat`) first",
        )
    plots = root / "plots"
    images: list[Path] = []
    sections: list[str] = []
    md: list[str] = []

    def section(title: str) -> None:
        sections.append(title)
        md.extend([f"## {title}", ""])

    def image(path: Path, alt: str) -> None:
        images.append(path)
        md.extend([f"![{alt}]({path.relative_to(root).as_posix()})", ""])

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    md += ["# nanoctl report card", "", f"Generated {now} by nanoctl {__version__}.", ""]

    # -- environment
    hw = hardware_info()
    commit = git_commit()
    section("Environment")
    md += [
        f"- nanoctl: {__version__}" + (f" (git {commit})" if commit else ""),
        f"- platform: {hw.get('platform')}",
        f"- CPUs: {hw.get('cpus')}, RAM: {hw.get('ram_gib', '-')} GiB",
        f"- GPUs: {len(hw.get('gpus', []))}" + (f" ({', '.join(hw['gpus'])})" if hw.get("gpus") else ""),
        f"- Python {hw.get('python')}, torch {hw.get('torch', '-')}"
        + (f", CUDA {hw['cuda']}" if hw.get("cuda") else ""),
    ]
    rate = gpu_hourly_rate(hw.get("gpus", []))
    if rate:
        md.append(f"- hourly rate (estimate): ${rate:.2f}/h for {len(hw['gpus'])} GPU(s)")
    md.append("")

    # -- tokenizer
    tok_result = tokenizer_compression(home) if not tok_evals else None
    if tok_evals or tok_result:
        section("Tokenizer evaluation")
        for path, data in tok_evals:
            md += [f"From `{path.name}`:", "", "| key | value |", "|---|---|"]
            md += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(data)[:60]]
            md.append("")
        if tok_result:
            encs = tok_result["encoders"]
            md += [
                f"Tokenizer: {tok_result['tokenizer']}, vocab {tok_result['vocab_size']:,}. Bytes per token (higher is better):",
                "",
            ]
            md += ["| text | bytes | " + " | ".join(encs) + " |", "|---" * (len(encs) + 2) + "|"]
            for row in tok_result["rows"]:
                cells = [_fmt(row["ratio"].get(e), 2) for e in encs]
                md.append(f"| {row['name']} | {row['bytes']:,} | " + " | ".join(cells) + " |")
            md += [""] + [f"Note: {n}" for n in tok_result.get("notes", [])] + [""]

    # -- training runs
    if runs:
        section("Training")
        md += [
            "| run | steps | final loss | min val bpb | training time | FLOPs | cost |",
            "|---|---|---|---|---|---|---|",
        ]
        total_seconds = 0.0
        for run in runs:
            _, losses = run.series("loss")
            _, vals = run.series("val_bpb")
            secs = run.training_seconds()
            total_seconds += secs
            flops = run.flops_per_step * run.last_step() if run.flops_per_step else None
            cost = f"${rate * secs / 3600:.2f}" if rate else "-"
            md.append(
                f"| {run.label} | {run.last_step()} | {_fmt(losses[-1] if losses else None)} | "
                f"{_fmt(min(vals) if vals else None)} | {_duration(secs)} | "
                f"{f'{flops:.3e}' if flops else '-'} | {cost} |"
            )
        md += [
            "",
            f"Total training time: {_duration(total_seconds)}"
            + (f" (≈ ${rate * total_seconds / 3600:.2f} at ${rate:.2f}/h)" if rate else " (CPU: not priced)"),
            "",
        ]
        for key, xaxis, name, title in (
            ("loss", "step", "loss_vs_step.png", "training loss vs step"),
            ("val_bpb", "step", "val_bpb_vs_step.png", "validation bpb vs step"),
            ("loss", "flops", "loss_vs_flops.png", "training loss vs FLOPs"),
            ("val_bpb", "flops", "val_bpb_vs_flops.png", "validation bpb vs FLOPs"),
        ):
            p = plots / name
            if plot_runs(runs, key, xaxis, p, title):
                image(p, title)

    # -- base model: bpb + CORE
    base_recs = _newest(records, "base")
    if base_recs:
        section("Base model evaluation")
        for stage, rec in base_recs.items():
            res = rec.results
            md += [f"**{stage}/{rec.tag} step {rec.step}** (evaluated {rec.created}, {rec.seconds:.1f}s)", ""]
            if res.get("bpb"):
                md += (
                    ["| split | bpb |", "|---|---|"]
                    + [f"| {k} | {_fmt(v)} |" for k, v in res["bpb"].items()]
                    + [""]
                )
            core = res.get("core")
            if core and core.get("tasks"):
                md += ["| Task | Accuracy | Centered |", "|---|---|---|"]
                md += [
                    f"| {t['label']} | {_fmt(t['accuracy'])} | {_fmt(t['centered'])} |" for t in core["tasks"]
                ]
                md += [f"| **CORE** | | **{_fmt(core.get('core'))}** |", ""]
                if core.get("missing"):
                    md += [
                        f"CORE covers {len(core['tasks'])} of {core['total_tasks']} tasks "
                        f"(missing: {', '.join(core['missing'])}).",
                        "",
                    ]
                if core.get("max_per_task", -1) > 0:
                    md += [f"At most {core['max_per_task']} examples per task.", ""]

        core_table: dict[str, dict[str, float | None]] = {}
        for stage, rec in base_recs.items():
            for t in (rec.results.get("core") or {}).get("tasks", []):
                core_table.setdefault(t["label"], {})[stage] = t["centered"]
        p = plots / "core_tasks.png"
        if plot_task_bars(core_table, list(base_recs), p, "CORE centered accuracy per task"):
            image(p, "CORE centered accuracy per task")

    # -- chat evals per stage
    chat_recs = _newest(records, "chat")
    if chat_recs:
        section("Chat evaluation")
        stages = [s for s in STAGES if s in chat_recs]
        names: list[str] = []
        for s in stages:
            for t in chat_recs[s].results.get("tasks", []):
                if t["name"] not in names:
                    names.append(t["name"])
        md += ["| Task | " + " | ".join(s.upper() for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
        for n in names:
            cells = []
            for s in stages:
                t = next((t for t in chat_recs[s].results.get("tasks", []) if t["name"] == n), None)
                cells.append(_fmt(t["accuracy"]) if t else "-")
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append(
            "| **ChatCORE** | "
            + " | ".join(_fmt(chat_recs[s].results.get("chatcore")) for s in stages)
            + " |"
        )
        md.append("")

    # -- summary (nanochat's table: metric rows, stage columns)
    table: dict[str, dict[str, float | None]] = {m: {} for m in SUMMARY_METRICS}
    for stage, rec in base_recs.items():
        core = (rec.results.get("core") or {}).get("core")
        table["CORE"][stage] = core
    for stage, rec in chat_recs.items():
        for t in rec.results.get("tasks", []):
            table.setdefault(t["name"], {})[stage] = t["accuracy"]
        table["ChatCORE"][stage] = rec.results.get("chatcore")
    if base_recs or chat_recs:
        section("Summary")
        cols = list(STAGES)
        md += ["| Metric | " + " | ".join(c.upper() for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for m, row in table.items():
            if any(v is not None for v in row.values()):
                md.append(f"| {m} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        md.append("")
        p = plots / "tasks_by_stage.png"
        if plot_task_bars(
            {m: r for m, r in table.items() if m != "CORE"}, cols, p, "chat task accuracy by stage"
        ):
            image(p, "task accuracy by stage")
    return "\n".join(md), images, sections


def markdown_to_html(md: str, images_root: Path, title: str = "nanoctl report") -> str:
    """The subset of markdown this module writes (headings, bullets, tables, images, bold) as one HTML file."""

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body.append("<table>")
            body.append("<tr>" + "".join(f"<th>{inline(c)}</th>" for c in rows[0]) + "</tr>")
            for r in rows[2:]:
                body.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>")
            body.append("</table>")
            continue
        if line.startswith("- "):
            body.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                body.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            body.append("</ul>")
            continue
        m = re.match(r"^!\[(.*)\]\((.+)\)$", line)
        if m:
            data = base64.b64encode((images_root / m.group(2)).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def generate_report(
    opts: ReportOptions, *, home: Home | str | os.PathLike[str] | None = None
) -> ReportResult:
    """Write report.md (+ plots, + report.html with --html); open it with --open. `home` is resolved here."""
    from nanoctl.atomic import atomic_write_text

    home = Home.resolve(home)
    md, images, sections = build_report(opts, home)
    md_rel = md  # image links relative to the reports dir (what the HTML inliner resolves)
    md_path = Path(opts.output).expanduser() if opts.output else home.reports_root / "report.md"
    if opts.output and images:
        # Image links are relative to the reports dir; keep them valid next to a custom output path.
        md = md.replace("](plots/", f"]({(home.reports_root / 'plots').as_posix()}/")
    atomic_write_text(md_path, md)
    result = ReportResult(markdown_path=str(md_path), images=[str(p) for p in images], sections=sections)
    if opts.html:
        html_path = md_path.with_suffix(".html")
        atomic_write_text(html_path, markdown_to_html(md_rel, home.reports_root))
        result.html_path = str(html_path)
    if opts.open:
        import webbrowser

        webbrowser.open(Path(result.html_path or result.markdown_path).resolve().as_uri())
    return result
