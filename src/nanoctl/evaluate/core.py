"""CORE (DCLM) evaluation of a base model, as nanochat's core_eval/base_eval (reference §7).

Pieces, in order: the eval bundle (core.yaml + eval_meta_data.csv + eval_data/*.jsonl; local, from the
home, or downloaded once), per-task data (shuffled with Random(1337) before --max-per-task), prompt
rendering with nanochat's Jinja templates, tokenization with a BOS prefix into `Example`s (token rows plus
the span to score), then scoring.

Scoring is batched: the rows of many examples are sorted by length and packed into a few padded forwards
(BOS pads on the right; the model is causal so padding never changes earlier positions), and the head is
evaluated only at the positions that are scored. `evaluate_example_naive` is nanochat's one-forward-per-
example loop, kept for the benchmark and as the reference the batched path is tested against.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# Padded tokens per forward: bounds activations (the head runs only at scored positions). CPUs stop
# gaining from bigger batches sooner, and smaller ones stay in cache.
DEFAULT_BATCH_TOKENS = 32768
CPU_BATCH_TOKENS = 16384
ProgressFn = Callable[[str, int, int], None]  # (task label, examples done, examples total)


# ---------------------------------------------------------------------------------------------------------
# Bundle


@dataclass(frozen=True)
class CoreTask:
    """One entry of core.yaml, joined with its random baseline (percent) from eval_meta_data.csv."""

    label: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    path: Path
    baseline: float

    @property
    def present(self) -> bool:
        return self.path.is_file()


def _looks_like_bundle(path: Path) -> bool:
    return (path / "core.yaml").is_file() and (path / "eval_meta_data.csv").is_file()


def load_bundle(bundle_dir: str | Path) -> list[CoreTask]:
    """Parse core.yaml + eval_meta_data.csv. Tasks whose data file is missing are kept (`present` False)."""
    import yaml

    bundle = Path(bundle_dir)
    if not _looks_like_bundle(bundle):
        raise NanoctlError(
            f"{bundle} is not a CORE eval bundle (expected core.yaml and eval_meta_data.csv in it)",
            f"unzip {BUNDLE_URL} and pass the folder with --bundle",
        )
    try:
        config = yaml.safe_load((bundle / "core.yaml").read_text(encoding="utf-8"))
        entries = config["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise NanoctlError(f"{bundle / 'core.yaml'}: cannot read icl_tasks ({e})") from e
    baselines: dict[str, float] = {}
    with open(bundle / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (KeyError, ValueError):
                continue
    tasks = []
    for entry in entries:
        label = entry["label"]
        fewshot = entry["num_fewshot"]
        task_type = entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise NanoctlError(
                f"{bundle / 'core.yaml'}: task {label} has unknown icl_task_type {task_type!r}"
            )
        if label not in baselines:
            raise NanoctlError(f"{bundle / 'eval_meta_data.csv'}: no random baseline for task {label}")
        tasks.append(
            CoreTask(
                label=label,
                task_type=task_type,
                num_fewshot=int(fewshot[0] if isinstance(fewshot, list) else fewshot),
                continuation_delimiter=entry.get("continuation_delimiter", " "),
                path=bundle / "eval_data" / entry["dataset_uri"],
                baseline=baselines[label],
            )
        )
    return tasks


def download_bundle(
    dest: Path, progress: Callable[[int, int], None] | None = None, url: str = BUNDLE_URL
) -> Path:
    """Download and unzip the bundle into `dest` (atomic: a half download never looks like a bundle)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    zip_path = dest.parent / "eval_bundle.zip.part"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(zip_path, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except OSError as e:
        zip_path.unlink(missing_ok=True)
        raise NanoctlError(
            f"could not download the CORE eval bundle from {url} ({getattr(e, 'reason', e)})",
            f"download eval_bundle.zip elsewhere and unzip it into {dest}, or pass --bundle /path/to/eval_bundle",
        ) from e
    staging = dest.parent / ".bundle.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(staging)
    except zipfile.BadZipFile as e:
        raise NanoctlError(f"{url} did not return a zip file ({e})") from e
    finally:
        zip_path.unlink(missing_ok=True)
    # The zip holds a top-level eval_bundle/ folder; accept a flat layout too.
    root = staging / "eval_bundle" if _looks_like_bundle(staging / "eval_bundle") else staging
    if not _looks_like_bundle(root):
        raise NanoctlError(f"{url}: the zip holds no core.yaml/eval_meta_data.csv")
    shutil.rmtree(dest, ignore_errors=True)
    root.rename(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


def resolve_bundle(
    bundle: str | Path | None = None,
    *,
    home: Home,
    download: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """--bundle PATH > <home>/eval/bundle > download once into <home>/eval/bundle."""
    if bundle is not None:
        path = Path(bundle).expanduser()
        if not path.exists():
            raise NanoctlError(f"--bundle {path}: no such directory", f"unzip {BUNDLE_URL} there")
        return path
    dest = home.eval_bundle_dir
    if _looks_like_bundle(dest):
        return dest
    if not download:
        raise NanoctlError(
            f"no CORE eval bundle at {dest}",
            f"download {BUNDLE_URL} and unzip it there, or pass --bundle PATH",
        )
    return download_bundle(dest, progress)


def select_tasks(bundle_dir: str | Path, labels: Sequence[str] | None = None) -> list[CoreTask]:
    """The bundle's tasks, or only those labelled `labels` (an unknown label is a UsageError)."""
    all_tasks = load_bundle(bundle_dir)
    if not labels:
        return all_tasks
    known = {t.label for t in all_tasks}
    unknown = [t for t in labels if t not in known]
    if unknown:
        raise UsageError(f"unknown CORE task(s) {', '.join(unknown)}", f"valid: {', '.join(sorted(known))}")
    return [t for t in all_tasks if t.label in set(labels)]


def count_examples(task: CoreTask, max_per_task: int = -1) -> int:
    """How many items of `task` an eval with `max_per_task` scores (lines counted, nothing parsed)."""
    with open(task.path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return min(n, max_per_task) if max_per_task > 0 else n


def load_task_data(task: CoreTask, max_per_task: int = -1) -> list[dict[str, Any]]:
    """The task's items, shuffled with Random(1337) (as nanochat) and cut to max_per_task when > 0."""
    try:
        with open(task.path, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise NanoctlError(f"{task.path}: cannot read task {task.label} ({e})") from e
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    return data


# ---------------------------------------------------------------------------------------------------------
# Prompt rendering (nanochat's templates, verbatim)

_MC_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()

_SCHEMA_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()

_LM_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()


@cache
def _template(source: str) -> Any:
    from jinja2 import Template

    return Template(source)  # compiled once: compiling per example dominated small evals


def render_prompts_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice; the choices differ only at the end (common token prefix = context)."""
    t = _template(_MC_TEMPLATE)
    ctx = {"fewshot_examples": list(fewshot), "continuation_delimiter": delimiter, "item": item}
    return [t.render(choice=choice, **ctx) for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option; all share the continuation (common token suffix)."""
    t = _template(_SCHEMA_TEMPLATE)
    ctx = {"fewshot_examples": list(fewshot), "continuation_delimiter": delimiter, "item": item}
    return [t.render(context=option, **ctx) for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[prompt without continuation (stripped), prompt with continuation]."""
    t = _template(_LM_TEMPLATE)
    ctx = {"fewshot_examples": list(fewshot), "continuation_delimiter": delimiter, "item": item}
    # Stripped so trailing whitespace does not merge into the continuation's first token (as nanochat).
    return [t.render(include_continuation=False, **ctx).strip(), t.render(include_continuation=True, **ctx)]


def find_common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common prefix ('left') or suffix ('right') of token sequences."""
    min_len = min(len(s) for s in seqs)
    indices = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, idx in enumerate(indices):
        token = seqs[0][idx]
        if not all(s[idx] == token for s in seqs):
            return i
    return min_len


# ---------------------------------------------------------------------------------------------------------
# Examples


@dataclass
class Example:
    """One item ready to score: token rows, and per row the [start, end) span whose tokens are scored."""

    idx: int
    task_type: str
    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None


def fewshot_for(idx: int, data: Sequence[dict], num_fewshot: int) -> list[dict]:
    """nanochat: Random(1234 + idx).sample of the other items. Capped at len(data) - 1 (nanochat crashes)."""
    k = min(num_fewshot, len(data) - 1)
    if k <= 0:
        return []
    rng = random.Random(1234 + idx)
    available = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(available, k)]


def prepare_example(
    idx: int, data: Sequence[dict], task: CoreTask, tokenizer: Any, max_len: int | None
) -> Example:
    """Render and tokenize item `idx` (BOS-prefixed), locate the scored spans, crop to max_len."""
    item = data[idx]
    fewshot = fewshot_for(idx, data, task.num_fewshot)
    bos = tokenizer.get_bos_token_id()
    delim = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        tokens = tokenizer.encode(render_prompts_mc(item, delim, fewshot), prepend=bos)
        start = find_common_length(tokens, "left")
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif task.task_type == "schema":
        tokens = tokenizer.encode(render_prompts_schema(item, delim, fewshot), prepend=bos)
        suffix = find_common_length(tokens, "right")
        ends = [len(t) for t in tokens]
        starts = [e - suffix for e in ends]
    elif task.task_type == "language_modeling":
        without, with_ = tokenizer.encode(render_prompts_lm(item, delim, fewshot), prepend=bos)
        if not (len(without) < len(with_) and with_[: len(without)] == without):
            raise NanoctlError(
                f"{task.label} item {idx}: the prompt does not tokenize as a prefix of prompt+continuation"
            )
        tokens, starts, ends = [with_], [len(without)], [len(with_)]
    else:  # pragma: no cover - load_bundle validates task types
        raise UsageError(f"unsupported task type {task.task_type}")
    if max_len is not None:
        # Keep the last max_len tokens and shift the spans (nanochat's crop for short-context models).
        for i, t in enumerate(tokens):
            if len(t) > max_len:
                crop = len(t) - max_len
                tokens[i] = t[crop:]
                starts[i] = max(starts[i] - crop, 1)
                ends[i] -= crop
    return Example(idx, task.task_type, tokens, starts, ends, item.get("gold"))


def _is_correct(task_type: str, gold: int | None, mean_losses: list[float], lm_hits: list[bool]) -> bool:
    if task_type == "language_modeling":
        return all(lm_hits)
    pred = mean_losses.index(min(mean_losses))
    return pred == gold


def max_positions(model: Any) -> int | None:
    """Longest input the model accepts: the rotary table length (nanochat: 10 x sequence_len)."""
    cos = getattr(model, "cos", None)
    if isinstance(cos, torch.Tensor) and cos.dim() >= 2:
        return int(cos.size(1))
    cfg = getattr(model, "config", None)
    return getattr(cfg, "sequence_len", None)


# ---------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def evaluate_example_naive(model: Any, example: Example, pad_id: int, device: torch.device) -> bool:
    """nanochat's per-example path: one forward over this example's rows, full-vocab CE at every position."""
    rows = example.tokens
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids)
    B, T, V = logits.shape
    targets = torch.roll(ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(-1), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    preds = logits.argmax(dim=-1)
    if example.task_type == "language_modeling":
        s, e = example.starts[0], example.ends[0]
        return bool(torch.all(preds[0, s - 1 : e - 1] == ids[0, s:e]).item())
    means = [
        losses[i, s - 1 : e - 1].mean().item()
        for i, (s, e) in enumerate(zip(example.starts, example.ends, strict=True))
    ]
    return means.index(min(means)) == example.gold


class _HeadPositions:
    """Forward pre-hook on lm_head that keeps only the hidden states at the scored positions.

    The head (and its softmax) over the full vocab at every position is most of a small model's eval
    cost; CORE only needs the continuation positions. If the model does not route its head through
    `lm_head(x)` with x of shape (B, T, C), the hook is not installed and full logits are indexed instead.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.rows, self.cols = rows, cols

    def __call__(self, module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if x.dim() == 3:
            return (x[self.rows, self.cols],)
        return args


def _scored_logits(
    model: Any, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, kv_cache: Any = None
) -> torch.Tensor:
    """Logits (N, V) at (rows[i], cols[i]) for a (B, T) batch, computing the head only where needed."""
    kw = {} if kv_cache is None else {"kv_cache": kv_cache}
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Module):
        handle = head.register_forward_pre_hook(_HeadPositions(rows, cols))
        try:
            out = model(ids, **kw)
        finally:
            handle.remove()
        if out.dim() == 2 and out.size(0) == rows.numel():
            return out
        return out[rows, cols] if out.dim() == 3 else out
    return model(ids, **kw)[rows, cols]


# A multiple-choice example whose shared context saves at least this many token-forwards is scored with
# the context run once (KV cache) and only the choices' continuations batched (CPU default, see below).
SHARED_PREFIX_MIN_SAVING = 256


def _shares_prefix(ex: Example) -> bool:
    if ex.task_type != "multiple_choice" or len(ex.tokens) < 2:
        return False
    s = ex.starts[0]
    same = all(st == s for st in ex.starts) and all(t[:s] == ex.tokens[0][:s] for t in ex.tokens)
    return same and s >= 2 and (len(ex.tokens) - 1) * s >= SHARED_PREFIX_MIN_SAVING


@torch.no_grad()
def score_example_shared_prefix(
    model: Any, ex: Example, pad_id: int, device: torch.device
) -> tuple[list[float], list[bool]]:
    """Mean loss and all-hit per choice, running the common context once.

    The context (tokens[:s], identical across choices) is prefilled into a batch-1 KV cache; its last
    position's logits score every choice's first continuation token. The cache is copied to one row per
    choice and the remaining continuation tokens run as one right-padded batch. Same positions, same
    targets as the packed path; only the context's repeated work is gone.
    """
    s = ex.starts[0]
    conts = [t[s : e - 1] for t, e in zip(ex.tokens, ex.ends, strict=True)]
    width = max(len(c) for c in conts)
    total = s + max(width, 1)
    one = model.new_kv_cache(1, total)
    prefix = torch.tensor([ex.tokens[0][:s]], dtype=torch.long, device=device)
    first = _scored_logits(
        model,
        prefix,
        torch.zeros(1, dtype=torch.long, device=device),
        torch.tensor([s - 1], device=device),
        one,
    ).float()[0]
    n = len(ex.tokens)
    targets = [
        torch.tensor(t[s:e], dtype=torch.long, device=device) for t, e in zip(ex.tokens, ex.ends, strict=True)
    ]
    rest: torch.Tensor | None = None
    if width > 0:
        cache = model.new_kv_cache(n, total)
        cache.prefill(one)
        ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        rows_l, cols_l = [], []
        for r, c in enumerate(conts):
            if c:
                ids[r, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
            rows_l += [r] * len(c)
            cols_l += list(range(len(c)))
        rows = torch.tensor(rows_l, dtype=torch.long, device=device)
        cols = torch.tensor(cols_l, dtype=torch.long, device=device)
        rest = _scored_logits(model, ids, rows, cols, cache).float()
    means, hits = [], []
    off = 0
    for r, c in enumerate(conts):
        logits = first.unsqueeze(0)
        if c and rest is not None:
            logits = torch.cat([logits, rest[off : off + len(c)]], dim=0)
            off += len(c)
        losses = F.cross_entropy(logits, targets[r], reduction="none")
        means.append(losses.mean().item())
        hits.append(bool((logits.argmax(dim=-1) == targets[r]).all().item()))
    return means, hits


@torch.no_grad()
def score_examples_batched(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    device: torch.device,
    batch_rows: int = 32,
    batch_tokens: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool | None = None,
) -> list[bool]:
    """Score many examples with few forwards. Returns correctness per example, in order.

    Rows from all examples are sorted by length (little padding) and cut into batches of at most
    `batch_rows` rows and `batch_tokens` padded tokens. `on_batch(n_examples_completed)` reports progress.
    `share_prefix` (default: on CPU) scores multiple-choice examples with a long shared context through
    `score_example_shared_prefix` instead.
    """
    if share_prefix is None:
        # CPU forwards are compute-bound: skipping the repeated context wins. On GPUs one big packed
        # forward beats two small ones per example, so the prefix path is off there by default.
        share_prefix = device.type == "cpu" and hasattr(model, "new_kv_cache")
    shared = {e for e, ex in enumerate(examples) if share_prefix and _shares_prefix(ex)}
    flat: list[tuple[int, int]] = [
        (e, r) for e, ex in enumerate(examples) if e not in shared for r in range(len(ex.tokens))
    ]
    flat.sort(key=lambda er: len(examples[er[0]].tokens[er[1]]), reverse=True)
    budget = batch_tokens or DEFAULT_BATCH_TOKENS
    n_rows = {e: len(ex.tokens) for e, ex in enumerate(examples)}
    row_mean: dict[tuple[int, int], float] = {}
    row_hit: dict[tuple[int, int], bool] = {}
    remaining = dict(n_rows)
    done = 0
    for e in sorted(shared):
        means_e, hits_e = score_example_shared_prefix(model, examples[e], pad_id, device)
        for r in range(n_rows[e]):
            row_mean[(e, r)], row_hit[(e, r)] = means_e[r], hits_e[r]
        done += 1
        if on_batch:
            on_batch(done)
    i = 0
    while i < len(flat):
        T = len(examples[flat[i][0]].tokens[flat[i][1]])  # longest first: this row sets the width
        take = max(1, min(batch_rows, budget // max(T, 1)))
        batch = flat[i : i + take]
        i += take
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        rows_l: list[int] = []
        cols_l: list[int] = []
        tgts_l: list[int] = []
        seg: list[tuple[int, int]] = []  # per batch row: (offset into the scored positions, count)
        for b, (e, r) in enumerate(batch):
            toks = examples[e].tokens[r]
            ids[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            s, en = examples[e].starts[r], examples[e].ends[r]
            seg.append((len(cols_l), en - s))
            # logits at position p predict token p + 1
            rows_l.extend([b] * (en - s))
            cols_l.extend(range(s - 1, en - 1))
            tgts_l.extend(toks[s:en])
        ids = ids.to(device)
        rows = torch.tensor(rows_l, dtype=torch.long, device=device)
        cols = torch.tensor(cols_l, dtype=torch.long, device=device)
        tgts = torch.tensor(tgts_l, dtype=torch.long, device=device)
        logits = _scored_logits(model, ids, rows, cols).float()
        losses = F.cross_entropy(logits, tgts, reduction="none").cpu()
        hits = (logits.argmax(dim=-1) == tgts).cpu()
        finished = 0
        for b, (e, r) in enumerate(batch):
            off, n = seg[b]
            row_mean[(e, r)] = losses[off : off + n].mean().item() if n else float("nan")
            row_hit[(e, r)] = bool(hits[off : off + n].all().item())
            remaining[e] -= 1
            finished += remaining[e] == 0
        done += finished
        if on_batch and finished:
            on_batch(done)
    out = []
    for e, ex in enumerate(examples):
        means = [row_mean[(e, r)] for r in range(len(ex.tokens))]
        hits_e = [row_hit[(e, r)] for r in range(len(ex.tokens))]
        out.append(_is_correct(ex.task_type, ex.gold, means, hits_e))
    return out


# ---------------------------------------------------------------------------------------------------------
# Tasks and the CORE metric


def centered_accuracy(accuracy: float, baseline_percent: float) -> float:
    """(acc - 0.01 b) / (1 - 0.01 b): 0 at chance, 1 at perfect (baseline b in percent, as the CSV)."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


@dataclass
class CoreTaskResult:
    label: str
    task_type: str
    num_fewshot: int
    examples: int
    accuracy: float
    centered: float
    baseline: float
    seconds: float
    fewshot_used: int


@dataclass
class CoreResult:
    core: float | None
    tasks: list[CoreTaskResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    total_tasks: int = 0
    seconds: float = 0.0
    max_per_task: int = -1
    bundle: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: CoreTask,
    device: torch.device,
    max_per_task: int = -1,
    batch_rows: int = 32,
    batch_tokens: int | None = None,
    naive: bool = False,
    progress: ProgressFn | None = None,
) -> CoreTaskResult:
    """Accuracy on one task; examples are strided across ranks and summed when torch.distributed is up."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    data = load_task_data(task, max_per_task)
    if not data:
        raise NanoctlError(f"{task.path}: task {task.label} has no examples")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    limit = max_positions(model)
    pad = tokenizer.get_bos_token_id()
    mine = [prepare_example(i, data, task, tokenizer, limit) for i in range(rank, len(data), world)]
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    if naive:
        for n, ex in enumerate(mine, 1):
            correct[ex.idx] = float(evaluate_example_naive(model, ex, pad, device))
            if progress:
                progress(task.label, n, len(mine))
    else:
        cb = (lambda n: progress(task.label, n, len(mine))) if progress else None
        flags = score_examples_batched(model, mine, pad, device, batch_rows, batch_tokens, cb)
        for ex, ok in zip(mine, flags, strict=True):
            correct[ex.idx] = float(ok)
    if distributed:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    acc = correct.mean().item()
    return CoreTaskResult(
        label=task.label,
        task_type=task.task_type,
        num_fewshot=task.num_fewshot,
        examples=len(data),
        accuracy=acc,
        centered=centered_accuracy(acc, task.baseline),
        baseline=task.baseline,
        seconds=time.perf_counter() - t0,
        fewshot_used=min(task.num_fewshot, len(data) - 1),
    )


def evaluate_core(
    model: Any,
    tokenizer: Any,
    device: torch.device | str,
    bundle_dir: str | Path,
    max_per_task: int = -1,
    batch_rows: int = 32,
    batch_tokens: int | None = None,
    tasks: Sequence[str] | None = None,
    naive: bool = False,
    progress: ProgressFn | None = None,
    on_task: Callable[[CoreTaskResult], None] | None = None,
) -> CoreResult:
    """Run every CORE task present in the bundle; CORE = mean centered accuracy over the tasks run.

    Missing task files are listed in `missing` and excluded (the metric then covers fewer tasks: the
    result says how many). `tasks` restricts to the given labels (unknown labels are a UsageError).
    """
    device = torch.device(device)
    all_tasks = select_tasks(bundle_dir, tasks)
    if batch_tokens is None:
        batch_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else DEFAULT_BATCH_TOKENS
    t0 = time.perf_counter()
    result = CoreResult(
        core=None, total_tasks=len(all_tasks), max_per_task=max_per_task, bundle=str(bundle_dir)
    )
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for task in all_tasks:
            if not task.present:
                result.missing.append(task.label)
                continue
            r = evaluate_task(
                model, tokenizer, task, device, max_per_task, batch_rows, batch_tokens, naive, progress
            )
            result.tasks.append(r)
            if on_task:
                on_task(r)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if result.tasks:
        result.core = sum(t.centered for t in result.tasks) / len(result.tasks)
    result.seconds = time.perf_counter() - t0
    return result
