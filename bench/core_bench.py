"""CORE evaluation throughput: nanoctl's batched scorer vs nanochat's per-example loop, same run, same examples.

All paths score the same prepared examples (same rendering, tokenization, few-shot draws and crops)
with the same model:
- naive: our reimplementation of nanochat's core_eval loop (one forward per example over its choices,
  full-vocab cross-entropy at every position);
- packed: rows of many examples sorted by length, BOS-padded into few forwards, head only at scored
  positions (what nanoctl does on GPUs);
- packed+shared-context: as packed, but a multiple-choice example with a long common context runs the
  context once (KV cache) and batches only the choices (nanoctl's CPU default).
Prints examples/s for each, the ratios, and checks that every example's result is identical.

    python bench/core_bench.py                      # depth-4 random model, CPU, shared bundle
    python bench/core_bench.py --max-per-task 50 --tasks copa,piqa,lambada_openai
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_TASKS = "copa,openbook_qa,winograd,winogrande,piqa,lambada_openai,bigbench_qa_wikidata,arc_easy"


def find_bundle(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval_bundle"
    if shared.is_dir():
        return shared
    from nanoctl.home import Home

    return Home.resolve().eval_bundle_dir


def get_tokenizer(vocab_size: int):  # noqa: ANN201 - nanoctl.tokenizer.Tokenizer
    """The home's tokenizer if there is one, else a quick one trained on the embedded sample corpus."""
    from nanoctl.errors import NanoctlError
    from nanoctl.tokenizer import Tokenizer, load_tokenizer

    try:
        return load_tokenizer()
    except NanoctlError:
        pass
    from nanoctl.data.shards import sample_documents

    texts = []
    total = 0
    for doc in sample_documents():
        texts.append(doc["text"])
        total += len(doc["text"])
        if total > 3_000_000:
            break
    return Tokenizer.train_from_iterator(iter(texts), vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024, help="model context (rotary table = 10x)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="for the fallback tokenizer")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--max-per-task", type=int, default=24)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per method (min time is kept)")
    args = ap.parse_args()

    import torch

    from nanoctl.evaluate import core as C
    from nanoctl.model.gpt import build_model, config_for_depth

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = get_tokenizer(args.vocab_size)
    cfg = config_for_depth(args.depth, tok.get_vocab_size(), args.seq_len)
    torch.manual_seed(0)
    model = build_model(cfg, device, torch.float32)
    with torch.no_grad():  # random weights everywhere: nanochat's init zeroes projections (all choices tie)
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.eval()
    bundle = find_bundle(args.bundle)
    tasks = {t.label: t for t in C.load_bundle(bundle)}
    pad = tok.get_bos_token_id()
    limit = C.max_positions(model)
    budget = args.batch_tokens or (C.DEFAULT_BATCH_TOKENS if device.type != "cpu" else C.CPU_BATCH_TOKENS)
    print(
        f"model d{args.depth} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, n_embd {cfg.n_embd}), "
        f"vocab {tok.get_vocab_size()}, device {device}, threads {torch.get_num_threads()}, "
        f"batch rows {args.batch_rows} / tokens {budget}, bundle {bundle}",
        flush=True,
    )
    prepared = {}
    for label in args.tasks.split(","):
        task = tasks.get(label)
        if task is None or not task.present:
            print(f"skip {label}: not in the bundle", file=sys.stderr)
            continue
        data = C.load_task_data(task, args.max_per_task)
        prepared[label] = [C.prepare_example(i, data, task, tok, limit) for i in range(len(data))]
    # warm-up (allocator, thread pools) on one small task for both paths
    warm = next(iter(prepared.values()))[:2]
    C.score_examples_batched(model, warm, pad, device, args.batch_rows, budget)
    for ex in warm:
        C.evaluate_example_naive(model, ex, pad, device)

    t_naive = t_packed = t_shared = 0.0
    n_total = 0
    all_equal = True
    for label, exs in prepared.items():
        tn = tp = ts = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            naive = [C.evaluate_example_naive(model, ex, pad, device) for ex in exs]
            tn = min(tn, time.perf_counter() - t0)
            t0 = time.perf_counter()
            packed = C.score_examples_batched(
                model, exs, pad, device, args.batch_rows, budget, share_prefix=False
            )
            tp = min(tp, time.perf_counter() - t0)
            t0 = time.perf_counter()
            shared = C.score_examples_batched(
                model, exs, pad, device, args.batch_rows, budget, share_prefix=True
            )
            ts = min(ts, time.perf_counter() - t0)
        same = naive == packed == shared
        all_equal &= same
        n = len(exs)
        tokens = sum(len(r) for ex in exs for r in ex.tokens)
        t_naive, t_packed, t_shared, n_total = t_naive + tn, t_packed + tp, t_shared + ts, n_total + n
        print(
            f"{label:<22} n={n:<4} tokens={tokens:<7} acc {sum(naive) / n:.4f}/{sum(packed) / n:.4f}/{sum(shared) / n:.4f} | "
            f"naive {n / tn:7.2f} ex/s  packed {n / tp:7.2f} (x{tn / tp:.2f})  packed+shared-context {n / ts:7.2f} (x{tn / ts:.2f})"
            + ("" if same else "  MISMATCH"),
            flush=True,
        )
    print(
        f"TOTAL {n_total} examples: naive {n_total / t_naive:.2f} ex/s ({t_naive:.1f}s) | "
        f"packed {n_total / t_packed:.2f} ex/s (x{t_naive / t_packed:.2f}) | "
        f"packed+shared-context {n_total / t_shared:.2f} ex/s (x{t_naive / t_shared:.2f}) | "
        f"identical per-example results: {all_equal}"
    )
    if not all_equal:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
