"""Model variants on CPU: dense GPT vs `--arch deepseek` (MLA + DeepSeekMoE) at the same active params.

1. Training: `nanoctl pretrain` (the library call, the real pipeline) for dense d4/d6 and deepseek d4/d6
   (8 routed experts, top-2, 1 shared, expert hidden = 4*width/3: about the dense MLP's active size).
   Both arms get the same training-FLOPs budget (--target-flops = the dense run's FLOPs for --steps
   steps), so the deepseek arm (fewer FLOPs/token) takes a few more steps. Reported: val bpb at the end
   (= the same FLOPs) and val bpb at the same wall-clock training time (the last eval of each run before
   the faster run's total; evals themselves are not counted).
2. Inference: KV-cache bytes/token (fp32 and bf16) and decode tokens/s, batch 1 and 8, of random-weight
   dense (classic) vs deepseek models of the same width (the Engine, 100-token prompt, 128 new tokens).

Same run, same data (the real pretraining shards), a temporary home with a small BPE tokenizer.

    python bench/variants_bench.py                   # d4 and d6, 400 dense steps each
    python bench/variants_bench.py --depths 4 --steps 100 --json
    python bench/variants_bench.py --lora            # and then bench/lora_bench.py as one more section
    python bench/variants_bench.py --depths 4 --arm moe8 --arm wide:kv_lora_rank=256 --skip-decode
                                                     # more deepseek arms (pretrain options), same budget

The dense arm is the classic trunk (no value embeddings, residual scalars or smear), the trunk the
deepseek arch is built on, so the comparison isolates MLA + MoE; `--dense-arch current` compares with
nanochat HEAD's trunk instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import BenchTokenizer, time_ours  # noqa: E402
from nanoctl.engine import Engine  # noqa: E402
from nanoctl.home import Home  # noqa: E402
from nanoctl.model.gpt import GPT, build_model, config_for_depth  # noqa: E402

SHARED = Path("/work/shared/data/pretrain")
MOE = dict(experts=8, top_k=2, shared_experts=1)


def make_home(root: Path, data: Path, vocab: int) -> Path:
    """A home with a BPE tokenizer trained on the first shard's text and 3 shards (2 train + val)."""
    import pyarrow.parquet as pq

    from nanoctl.tokenizer import Tokenizer

    texts = pq.read_table(data / "shard_00000.parquet").column("text").to_pylist()[:3000]
    Tokenizer.train_from_iterator(iter(texts), vocab_size=vocab).save(root / "tokenizer")
    out = root / "data" / "base"
    out.mkdir(parents=True)
    for i, src in enumerate(["shard_00000", "shard_00001", "shard_00008"]):
        shutil.copyfile(data / f"{src}.parquet", out / f"shard_{i:05d}.parquet")
    return root


def train(home: Path, tag: str, arch: str, depth: int, target_flops: float, eval_every: int, threads: int,
          extra: dict[str, Any]) -> dict[str, Any]:
    from nanoctl.train.pretrain import PretrainOptions, pretrain

    opts = PretrainOptions(
        arch=arch, depth=depth, max_seq_len=256, head_dim=64, device_batch_size=4, total_batch_size=0,
        num_iterations=-1, target_flops=target_flops, warmup_steps=10, eval_every=eval_every,
        eval_tokens=8 * 1024, sample_every=-1, device="cpu", threads=threads, model_tag=tag, **extra,
    )  # fmt: skip
    res = pretrain(opts, Home(home))
    recs = [json.loads(x) for x in (home / "reports" / tag / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    evals = [(r["step"], r["val_bpb"]) for r in recs if r.get("val_bpb") is not None]
    # training time at each step: the sum of step times (evals excluded)
    elapsed, t = {0: 0.0}, 0.0
    for s in sorted(steps):
        t += steps[s].get("dt", 0.0)
        elapsed[s] = t
    plan = res.details
    return {
        "tag": tag, "arch": arch, "depth": depth, "steps": res.final_step, "params": plan["params"],
        "flops_per_token": plan["flops_per_token"], "total_flops": plan["total_flops"],
        "train_time_s": t, "step_ms": 1000 * t / max(1, len(steps)),
        "final_val_bpb": evals[-1][1], "evals": [(s, elapsed.get(s, 0.0), b) for s, b in evals],
    }


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (name, PretrainOptions overrides on top of MOE); 'name' alone = MOE."""
    name, _, rest = text.partition(":")
    extra: dict[str, Any] = dict(MOE)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        extra[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
    return name, extra


def bpb_at_time(run: dict[str, Any], seconds: float) -> tuple[float, int]:
    """(val bpb, step) of the run's last eval at or before `seconds` of training."""
    best = run["evals"][0]
    for ev in run["evals"]:
        if ev[1] <= seconds + 1e-9:
            best = ev
    return best[2], best[0]


def random_model(arch: str, depth: int, vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    extra = {"n_experts": MOE["experts"], "top_k": MOE["top_k"]} if arch == "deepseek" else {}
    model = build_model(config_for_depth(depth, vocab, 1024, head_dim=64, arch=arch, **extra), "cpu", torch.float32)
    with torch.no_grad():  # the init zeroes output projections: random weights so every path computes
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def decode(arch: str, depth: int, vocab: int, repeats: int) -> dict[str, Any]:
    model = random_model(arch, depth, vocab)
    engine = Engine(model, BenchTokenizer(vocab))
    prompt = list(range(10, 110))
    out: dict[str, Any] = {"arch": arch, "depth": depth, "kv_bytes_per_token_fp32": model.kv_bytes_per_token(4),
                           "kv_bytes_per_token_bf16": model.kv_bytes_per_token(2)}  # fmt: skip
    for rows in (1, 8):
        time_ours(engine, prompt, rows, 8)  # warm-up
        out[f"batch{rows}_tok_s"] = statistics.median(time_ours(engine, prompt, rows, 128)[1] for _ in range(repeats))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--steps", type=int, default=400, help="dense steps; sets the FLOPs budget of both arms")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-arch", default="classic")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arm", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                    help="a deepseek arm (repeatable): pretrain options over the default MoE, e.g."
                    " wide:kv_lora_rank=256 or fine:experts=16,top_k=4 (default: one arm, deepseek)")
    ap.add_argument("--skip-decode", action="store_true", help="training only")
    ap.add_argument("--lora", action="store_true", help="run bench/lora_bench.py afterwards, if it exists")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    arms = [parse_arm(a) for a in args.arm or ["ds"]]
    report: dict[str, Any] = {"training": [], "decode": []}
    with tempfile.TemporaryDirectory() as tmp:
        home = make_home(Path(tmp) / "home", args.data, args.vocab)
        for depth in args.depths:
            with torch.device("meta"):
                dense_cfg = config_for_depth(depth, args.vocab, 256, head_dim=64, arch=args.dense_arch)
                flops = GPT(dense_cfg).estimate_flops() * 1024 * args.steps  # 4 rows x 256 tokens per step
            eval_every = max(1, args.steps // 8)
            dense = train(home, f"dense{depth}", args.dense_arch, depth, flops, eval_every, args.threads, {})
            print(f"d{depth}: dense {dense['final_val_bpb']:.4f} bpb in {dense['steps']} steps"
                  f" ({dense['step_ms']:.0f} ms/step)", flush=True)
            for name, extra in arms:
                moe = train(home, f"{name}{depth}", "deepseek", depth, flops, eval_every, args.threads, extra)
                moe["arm"], moe["options"] = name, extra
                same_time = min(dense["train_time_s"], moe["train_time_s"])
                for run in (dense, moe):
                    run["val_bpb_at_same_time"], run["step_at_same_time"] = bpb_at_time(run, same_time)
                report["training"].append({"depth": depth, "budget_flops": flops, "same_time_s": same_time,
                                           "dense": dict(dense), "deepseek": moe})  # fmt: skip
                print(f"d{depth} {name} {extra}: {moe['final_val_bpb']:.4f} bpb in {moe['steps']} steps"
                      f" ({moe['step_ms']:.0f} ms/step, {moe['params']}); vs dense"
                      f" {moe['final_val_bpb'] / dense['final_val_bpb'] - 1:+.2%} at the same FLOPs; at"
                      f" {same_time:.0f} s: dense {dense['val_bpb_at_same_time']:.4f} vs"
                      f" {moe['val_bpb_at_same_time']:.4f}", flush=True)
    for depth in [] if args.skip_decode else args.depths:
        for arch in (args.dense_arch, "deepseek"):
            d = decode(arch, depth, 32768, args.repeats)
            report["decode"].append(d)
            print(f"decode d{depth} {arch}: KV {d['kv_bytes_per_token_fp32']:,} B/token (fp32),"
                  f" batch1 {d['batch1_tok_s']:.1f} tok/s, batch8 {d['batch8_tok_s']:.1f} tok/s", flush=True)
    if args.lora:
        lora = Path(__file__).resolve().parent / "lora_bench.py"
        if lora.exists():
            subprocess.run([sys.executable, str(lora)], check=False)
        else:
            print("bench/lora_bench.py does not exist yet: LoRA section skipped")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
