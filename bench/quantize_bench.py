"""`--quantize int8` against fp32 on one trained checkpoint, CPU, in the same run.

Each figure comes from a fresh process per (mode, repeat), modes interleaved so a busy box hurts both
alike:
- resident memory of the loaded model: RSS after load (+ quantization) minus RSS just before it, after
  gc and malloc_trim (freed fp32 pages go back to the OS), and the model's weight bytes as stored;
- decode tokens/s at batch 1 and batch 8 through the Engine (nanochat's chat sampling defaults, a
  `--prompt-tokens` prompt from the validation shard; the prefill and first token are not counted);
- held-out bpb on the validation shard (`--bpb-tokens`), once per mode (it is deterministic).

    python bench/quantize_bench.py --home /tmp/qhome --tag d6          # medians of 3 repeats
    python bench/quantize_bench.py --home H --tag d6 --json             # one JSON document at the end
    python bench/quantize_bench.py --linears                            # the library choice, below

`--linears` times one d6-shaped linear (fp32 nn.Linear, torch.ao dynamic int8, and torchao 0.x's
Int8WeightOnly / Int8DynamicActivationInt8Weight when torchao is installed) at 1 and 8 rows, eager: the
measurement behind using torch.ao rather than torchao on the CPU (nanoctl.model.quantize).

Goals (issue 14): >= 1.5x decode at batch 1, >= 3x smaller weights, bpb within +1% relative.
The checkpoint should be a trained one: the bpb of a random model says nothing about quantization.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("none", "int8")


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def settle() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then keep freed pages
        pass


def decode_rate(engine: Any, prompt: list[int], rows: int, new_tokens: int, seed: int) -> float:
    """Decode tokens/s over `rows` samples: steps after the first column, times the rows still running."""
    from nanoctl.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, seed=seed)
    t_first = None
    decoded = 0
    live = [True] * rows
    for column, _ in engine.generate(prompt, params, num_samples=rows):
        if t_first is None:
            t_first = time.perf_counter()
        else:
            decoded += sum(live)
        live = [ok and t not in engine.stop_tokens for ok, t in zip(live, column, strict=True)]
        if not any(live):
            break
    assert t_first is not None
    return decoded / (time.perf_counter() - t_first)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from nanoctl.checkpoint import find_checkpoint, load_model
    from nanoctl.data.shards import iter_shard_texts, resolve_pretrain_shards
    from nanoctl.engine import Engine
    from nanoctl.evaluate.base import evaluate_split_bpb, load_token_bytes_for
    from nanoctl.home import Home
    from nanoctl.model.quantize import quantize_model, weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    home = Home.resolve(args.home)
    ref = find_checkpoint(args.stage, args.tag, args.step, home=home)
    settle()
    rss0, _ = rss_bytes()
    model, tok, _ = load_model(ref, device="cpu", dtype=torch.float32, home=home)
    quantize_model(model, args.worker)
    settle()
    rss1, hwm = rss_bytes()
    shards = resolve_pretrain_shards(home)
    text = next(t for t in iter_shard_texts([shards.val_path]) if len(t) > 20 * args.prompt_tokens)
    prompt = tok.encode(text, prepend=tok.get_bos_token_id())[: args.prompt_tokens]
    engine = Engine(model, tok)
    with torch.inference_mode():
        decode_rate(engine, prompt, 1, 4, 0)  # warm-up: first-call set-up is not decode speed
        out: dict[str, Any] = {
            "mode": args.worker,
            "rss_model_mib": (rss1 - rss0) / 2**20,
            "peak_rss_mib": hwm / 2**20,
            "weight_mib": weight_bytes(model) / 2**20,
            "batch1_tok_s": decode_rate(engine, prompt, 1, args.new_tokens, 1),
            "batch8_tok_s": decode_rate(engine, prompt, 8, args.new_tokens, 2),
        }
        if args.bpb:
            token_bytes = load_token_bytes_for(ref.directory, home, "cpu")
            t0 = time.perf_counter()
            bpb, tokens = evaluate_split_bpb(
                model, tok, token_bytes, [shards.val_path], args.bpb_rows, args.bpb_tokens, 0, 1
            )
            out |= {"bpb": bpb, "bpb_tokens": tokens, "bpb_s": time.perf_counter() - t0}
    out["checkpoint"] = ref.label
    out["threads"] = torch.get_num_threads()
    return out


def linears(threads: int) -> None:
    """Median microseconds per call of one linear, each int8 path next to fp32, at d6 shapes."""
    import copy
    import warnings

    import torch
    import torch.nn as nn

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    paths: dict[str, Any] = {
        "torch.ao dynamic": lambda m: quantize_dynamic(m, {nn.Linear: per_channel_dynamic_qconfig}),
    }
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        def torchao(config: Any) -> Any:
            return lambda m: (quantize_(m, config), m)[1]

        paths["torchao weight-only"] = torchao(Int8WeightOnlyConfig())
        paths["torchao dynamic"] = torchao(Int8DynamicActivationInt8WeightConfig())
    except ImportError:
        print("torchao is not installed: only torch.ao is timed")

    def time_us(m: Any, x: Any, n: int = 50) -> float:
        with torch.inference_mode():
            for _ in range(5):
                m(x)
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6

    print(f"{torch.get_num_threads()} thread(s); median us per call (ratio to fp32: > 1 is slower)")
    for k, n in ((384, 1536), (1536, 384), (384, 32768)):
        for rows in (1, 8):
            base = nn.Sequential(nn.Linear(k, n, bias=False)).eval()
            x = torch.randn(rows, k)
            fp32 = time_us(base, x)
            cells = [f"fp32 {fp32:8.0f}"]
            for name, make in paths.items():
                t = time_us(make(copy.deepcopy(base)), x)
                cells.append(f"{name} {t:8.0f} ({t / fp32:4.2f})")
            print(f"{k:>5} x {n:<5} rows {rows}: " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", help="artifact home holding the checkpoint and its data")
    ap.add_argument("--stage", default="base")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bpb-tokens", type=int, default=16384)
    ap.add_argument("--bpb-rows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--linears", action="store_true", help="time one linear per int8 library and exit")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--bpb", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.linears:
        linears(args.threads)
        return
    if not args.home:
        ap.error("--home is required (a home with a trained checkpoint and its validation shard)")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, "--home", args.home, "--stage", args.stage,
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                   "--bpb-tokens", str(args.bpb_tokens), "--bpb-rows", str(args.bpb_rows),
                   "--threads", str(args.threads)]  # fmt: skip
            cmd += ["--tag", args.tag] if args.tag else []
            cmd += ["--step", str(args.step)] if args.step is not None else []
            cmd += ["--bpb"] if r == 0 else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1} {mode}: {runs[mode][-1]}", file=sys.stderr)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode] if key in x)

    keys = ("rss_model_mib", "weight_mib", "batch1_tok_s", "batch8_tok_s", "bpb")
    summary = {m: {k: med(m, k) for k in keys} for m in MODES}
    ratios = {
        "rss_smaller": summary["none"]["rss_model_mib"] / summary["int8"]["rss_model_mib"],
        "weights_smaller": summary["none"]["weight_mib"] / summary["int8"]["weight_mib"],
        "batch1_speedup": summary["int8"]["batch1_tok_s"] / summary["none"]["batch1_tok_s"],
        "batch8_speedup": summary["int8"]["batch8_tok_s"] / summary["none"]["batch8_tok_s"],
        "bpb_rel_change": summary["int8"]["bpb"] / summary["none"]["bpb"] - 1,
    }
    goals = {
        "batch1 >= 1.5x": ratios["batch1_speedup"] >= 1.5,
        "weights >= 3x smaller": ratios["weights_smaller"] >= 3.0,
        "bpb within +1%": ratios["bpb_rel_change"] <= 0.01,
    }
    first = runs["none"][0]
    print(f"checkpoint {first['checkpoint']}, {first['threads']} thread(s), {args.repeats} repeats (medians), "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, bpb over {first['bpb_tokens']} val tokens")
    print(f"{'':8} {'RSS MiB':>9} {'weights MiB':>12} {'b1 tok/s':>9} {'b8 tok/s':>9} {'val bpb':>8}")
    for m in MODES:
        s = summary[m]
        print(f"{m:8} {s['rss_model_mib']:9.1f} {s['weight_mib']:12.1f} {s['batch1_tok_s']:9.1f} "
              f"{s['batch8_tok_s']:9.1f} {s['bpb']:8.4f}")
    print(f"int8 vs fp32: RSS {ratios['rss_smaller']:.2f}x smaller, weights {ratios['weights_smaller']:.2f}x "
          f"smaller, decode {ratios['batch1_speedup']:.2f}x (batch 1) / {ratios['batch8_speedup']:.2f}x "
          f"(batch 8), bpb {ratios['bpb_rel_change']:+.2%}")
    print("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    if args.json:
        print(json.dumps({"runs": runs, "summary": summary, "ratios": ratios, "goals": goals}))


if __name__ == "__main__":
    main()
