"""Shared pieces for the eval/report tests: a tiny tokenizer + random model, a small CORE bundle built from
real rows of the shared bundle, and a home holding a base checkpoint, shards and a tokenizer."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nanoctl.model.gpt import GPT, GPTConfig, build_model
from nanoctl.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Question: what is the answer? Answer: yes no maybe.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, the age of foolishness.",
] * 10

# label -> (source file under eval_data, type, shots, delimiter or None, baseline %)
TINY_TASKS: dict[str, tuple[str, str, int, str | None, float]] = {
    "copa": ("commonsense_reasoning/copa.jsonl", "multiple_choice", 0, None, 50.0),
    "arc_easy": ("world_knowledge/arc_easy.jsonl", "multiple_choice", 2, "\nAnswer: ", 25.0),
    "winograd": ("language_understanding/winograd_wsc.jsonl", "schema", 0, None, 50.0),
    "bigbench_operators": (
        "symbolic_problem_solving/bigbench_operators.jsonl",
        "language_modeling",
        2,
        None,
        0.0,
    ),
}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a busy shared box spinning threads cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(TEXTS), 320)


def tiny_model(seed: int = 0, sequence_len: int = 256, n_layer: int = 2, n_embd: int = 64) -> GPT:
    """Random weights everywhere (nanochat's init zeroes projections, which would make every answer tie)."""
    tok = tiny_tokenizer()
    cfg = GPTConfig(
        sequence_len=sequence_len,
        vocab_size=tok.get_vocab_size(),
        n_layer=n_layer,
        n_head=2,
        n_kv_head=2,
        n_embd=n_embd,
        window_pattern="L",
    )
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def make_bundle(shared: Path, dest: Path, rows: int = 12, missing: bool = True) -> Path:
    """A CORE bundle with TINY_TASKS (first `rows` rows of each real file) and one task whose file is absent."""
    (dest / "eval_data").mkdir(parents=True, exist_ok=True)
    yaml_lines = ["icl_tasks:"]
    csv_lines = [
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"
    ]
    for label, (uri, kind, shots, delim, base) in TINY_TASKS.items():
        src = shared / "eval_bundle" / "eval_data" / uri
        out = dest / "eval_data" / uri
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(src, encoding="utf-8") as f:
            out.write_text("".join(next(f) for _ in range(rows)), encoding="utf-8")
        yaml_lines += [
            "-",
            f"  label: {label}",
            f"  dataset_uri: {uri}",
            f"  num_fewshot: [{shots}]",
            f"  icl_task_type: {kind}",
        ]
        if delim is not None:
            yaml_lines.append(f"  continuation_delimiter: {json.dumps(delim)}")
        csv_lines.append(f"{label},x,x,{shots},{rows},{base},,d")
    if missing:
        yaml_lines += [
            "-",
            "  label: hellaswag",
            "  dataset_uri: language_understanding/hellaswag.jsonl",
            "  num_fewshot: [10]",
            "  icl_task_type: multiple_choice",
        ]
        csv_lines.append("hellaswag,x,x,10,10042,25,,d")
    (dest / "core.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    (dest / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    return dest


def populate_home(
    home: Path, tag: str = "d2", step: int = 5, stage: str = "base", model: GPT | None = None
) -> dict[str, Any]:
    """Tokenizer, two tiny shards and a checkpoint in `home`, as the real stages leave them."""
    from nanoctl.checkpoint import save_checkpoint
    from nanoctl.data.shards import shard_filename, write_shard

    tok = tiny_tokenizer()
    tok.save(home / "tokenizer")
    data = home / "data" / "base"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_shard(data / shard_filename(i), [t + f" doc {i}-{j}" for j, t in enumerate(TEXTS)])
    model = model or tiny_model()
    meta = {"step": step, "model_config": model.config.to_dict(), "user_config": {}, "stage": stage}
    directory = home / "checkpoints" / stage / tag
    save_checkpoint(directory, step, model.state_dict(), None, meta)
    shutil.copyfile(home / "tokenizer" / "token_bytes.pt", directory / "token_bytes.pt")
    return meta
