"""LoRA vs full SFT on the same model, CPU, same run: median step time, peak memory, final val loss.

Setup (in a temp home unless --home): a BPE tokenizer (vocab 512) trained on the embedded sample corpus; a
current-arch base model (--layers x --width) pretrained in-process for --pretrain-steps steps of plain
next-token prediction on that corpus (so SFT starts from a model that has learned something); the
bundled identity conversations as SFT data (--val conversations held out). Then `nanoctl sft` runs twice
with identical options, once full (Muon + AdamW over every weight) and once with --lora-rank R (AdamW over
the adapters), each in its own process so its peak RSS (VmHWM: the whole process, torch import and
the data included, the same for both) is its own. Step time: the median of the metrics.jsonl `dt` after
the first 2 steps. Val loss: the SFT stage's own (token-weighted, held-out conversations).

    python bench/lora_bench.py [--steps 30] [--layers 4] [--width 256] [--rank 16] [--threads 2] [--json]

`main(argv)` returns the figures (bench/variants_bench.py may call it as one section).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

VOCAB = 512


def _sample(name: str) -> list[str]:
    path = resources.files("nanoctl") / "sample_data" / name
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def prepare(home: Path, args: argparse.Namespace) -> Path:
    """Tokenizer, pretrained base checkpoint (base/bench@N) and the SFT data file; returns the data file."""
    import torch

    from nanoctl.checkpoint import save_checkpoint, save_tokenizer_copy
    from nanoctl.home import Home
    from nanoctl.model.gpt import GPTConfig, build_model
    from nanoctl.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    texts = [json.loads(line)["text"] for line in _sample("sample.jsonl.gz")]
    tok = Tokenizer.train_from_iterator(iter(texts[:400]), VOCAB)
    tok.save(home / "tokenizer")
    heads = max(1, args.width // 128)
    cfg = GPTConfig(sequence_len=args.seq, vocab_size=VOCAB, n_layer=args.layers, n_head=heads, n_kv_head=heads,
                    n_embd=args.width, window_pattern="L")
    torch.manual_seed(0)
    model = build_model(cfg, "cpu", torch.float32)
    ids = torch.tensor([t for text in texts[400:800] for t in tok.encode(text, prepend=tok.get_bos_token_id())])
    opt = model.setup_optimizer()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=g)
        rows = torch.stack([ids[s : s + args.seq + 1] for s in starts.tolist()])
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / args.pretrain_steps)
        opt.step()
        model.zero_grad(set_to_none=True)
    print(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, pretrained {args.pretrain_steps}"
          f" steps in {time.perf_counter() - t0:.0f}s, last loss {loss.item():.3f}", file=sys.stderr)
    ckpt = home / "checkpoints" / "base" / "bench"
    save_checkpoint(ckpt, args.pretrain_steps, model.state_dict(), None,
                    {"model_config": cfg.to_dict(), "stage": "base"})
    save_tokenizer_copy(ckpt, Home(home))
    data = home / "identity.jsonl"
    data.write_text("\n".join(_sample("identity_conversations.jsonl.gz")) + "\n")
    return data


def peak_rss_mib() -> float:
    """VmHWM of this process (not ru_maxrss: Linux carries that across exec, i.e. the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(home: Path, data: Path, rank: int, args: argparse.Namespace) -> dict[str, Any]:
    """One SFT run in this process (full when rank is 0); its figures."""
    from nanoctl.home import Home
    from nanoctl.train.sft import SFTOptions, sft

    tag = f"lora{rank}" if rank else "full"
    result = sft(SFTOptions(
        data=[str(data)], val_holdout=args.val, device="cpu", threads=args.threads, num_iterations=args.steps,
        device_batch_size=args.batch, target_examples_per_step=args.batch, max_seq_len=args.seq,
        eval_every=-1, eval_steps=args.val // args.batch, eval_metrics_every=-1, metric_tasks=[],
        output_tag=tag, lora_rank=rank, lora_lr=args.lora_lr, log_format="plain", force=True,
    ), home=Home(home))
    report = Path(home) / "reports" / tag / ("sft-lora" if rank else "sft") / "metrics.jsonl"
    dts = [r["dt"] for r in map(json.loads, report.read_text().splitlines()) if "dt" in r]
    out = Path(result.checkpoint_dir)
    saved = sum(f.stat().st_size for f in out.glob(f"*_{result.final_step:06d}*.pt"))
    return {
        "kind": f"lora r={rank}" if rank else "full",
        "step_ms": 1000 * statistics.median(dts[2:] or dts),
        "peak_rss_mib": peak_rss_mib(),
        "val_loss": result.val_loss,
        "final_train_loss": result.final_loss,
        "checkpoint_mib": saved / 2**20,  # model + optimizer of the last step
        "adapter_mib": (out / "adapter_model.safetensors").stat().st_size / 2**20 if rank else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="SFT steps of each run")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=None, help="unset: the stage's default (CPU 1e-2)")
    p.add_argument("--val", type=int, default=64, help="held-out conversations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--home", type=Path, help="work here instead of a temp dir (kept; a second run reuses its base)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: one run, prints JSON
    args = p.parse_args(argv)
    if args.worker is not None:
        figures = worker(args.home, args.home / "identity.jsonl", args.worker, args)
        print(json.dumps(figures))
        return figures

    with tempfile.TemporaryDirectory(prefix="lora_bench.") as tmp:
        home = args.home or Path(tmp) / "home"
        if not (home / "checkpoints" / "base" / "bench").is_dir():  # a kept --home reuses its base
            prepare(home, args)
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        if "--home" not in passthrough:
            passthrough += ["--home", str(home)]
        rows = []
        for rank in (0, args.rank):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", str(rank)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the {'lora' if rank else 'full'} run failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full, lora = rows
    ratios = {
        "step_time_lora_over_full": lora["step_ms"] / full["step_ms"],
        "peak_rss_lora_over_full": lora["peak_rss_mib"] / full["peak_rss_mib"],
        "val_loss_lora_minus_full": lora["val_loss"] - full["val_loss"],
    }
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("home", "json", "worker")},
              "runs": rows, "ratios": ratios}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'run':<10} {'step ms':>8} {'peak RSS MiB':>13} {'val loss':>9} {'train loss':>10} {'saved MiB':>10}")
        for r in rows:
            print(f"{r['kind']:<10} {r['step_ms']:8.1f} {r['peak_rss_mib']:13.0f} {r['val_loss']:9.4f}"
                  f" {r['final_train_loss']:10.4f} {r['checkpoint_mib']:10.2f}")
        print(f"lora/full: step time x{ratios['step_time_lora_over_full']:.2f}, peak RSS"
              f" x{ratios['peak_rss_lora_over_full']:.2f}, val loss {ratios['val_loss_lora_minus_full']:+.4f};"
              f" adapter file {lora['adapter_mib']:.2f} MiB")
    return result


if __name__ == "__main__":
    main()
