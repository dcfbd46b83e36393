"""Decode throughput of an exported ONNX graph in onnxruntime (fp32 and --int8) vs nanoctl's Engine.

Same weights on every side: a d6 current-arch model (nanochat's init plus small random c_proj/lm_head so
logits are not all zero), exported in this process exactly as `nanoctl export onnx` does (the KV-cache
decoder graph, then onnxruntime dynamic int8 quantization of the weight matmuls). CPU, batch 1, greedy,
a 100-token prompt and 128 new tokens; the ONNX side runs the loop of docs/onnx_generate.py (numpy
argmax, present_* fed back as past_*). Reports time-to-first-token and decode tokens/s, medians of
interleaved repeats, and the ratios from this same run.

    python bench/onnx_bench.py                   # d6 current arch
    python bench/onnx_bench.py --arch classic    # the classic arch
    python bench/onnx_bench.py --json            # one JSON document on the last line

Idle threads sleep on both sides (OMP_WAIT_POLICY=PASSIVE unless set, as `nanoctl serve` does, and
onnxruntime's allow_spinning 0): on a shared box, spinning threads starve the ones doing the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: before the import

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_bench import BenchTokenizer, interleaved_medians  # noqa: E402  (bench/ is the script's directory)
from nanoctl.engine import Engine, SamplingParams  # noqa: E402
from nanoctl.export.onnx_export import DEFAULT_OPSET, quantize_int8, trace_decoder, verify_graph  # noqa: E402
from nanoctl.model.gpt import GPT, build_model, config_for_depth  # noqa: E402


def build(depth: int, vocab: int, seq_len: int, arch: str) -> GPT:
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab, seq_len, arch=arch), "cpu", torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # nanochat's init zeroes these: logits would all be 0
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(0.0, 0.02)
    return model.eval()


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the same thread count torch uses
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_generate(sess: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens, time to first token (s) and decode tok/s, as docs/onnx_generate.py runs it."""
    state = {
        i.name: np.zeros([1 if d == "batch" else 0 if isinstance(d, str) else d for d in i.shape], np.float32)
        for i in sess.get_inputs()[1:]
    }
    ids, out = prompt, []
    t0 = time.perf_counter()
    first = t0
    for n in range(new_tokens):
        logits, *present = sess.run(None, {"input_ids": np.array([ids], np.int64), **state})
        state = dict(zip(state, present, strict=True))
        ids = [int(logits[0, -1].argmax())]
        out.append(ids[0])
        if n == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    return out, first - t0, (new_tokens - 1) / (end - first)


def ours_generate(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    t0 = time.perf_counter()
    first = t0
    out: list[int] = []
    for column, _ in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=new_tokens)):
        out.append(column[0])
        if len(out) == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    assert len(out) == new_tokens, f"engine produced {len(out)} tokens, expected {new_tokens}"
    return out, first - t0, (new_tokens - 1) / (end - first)


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy runs share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--arch", default="current", choices=["current", "classic"])
    ap.add_argument("--vocab", type=int, default=32768, help="vocab size (nanochat HEAD default 32768)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch and onnxruntime threads (0 = torch's default)"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON document as the last line")
    args = ap.parse_args(argv)
    from nanoctl.device import tune_cpu_allocator

    tune_cpu_allocator()  # as nanoctl's chat does
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    model = build(args.depth, args.vocab, 2048, args.arch)
    cfg = model.config
    prompt = torch.randint(
        0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)
    )
    prompt_ids = prompt.tolist()
    engine = Engine(model, BenchTokenizer(cfg.vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32" / "model.onnx", Path(tmp) / "model.onnx"
        fp32_path.parent.mkdir()
        t0 = time.perf_counter()
        trace_decoder(model, fp32_path, DEFAULT_OPSET)
        export_s = time.perf_counter() - t0
        quantize_int8(fp32_path, int8_path)
        diff = verify_graph(model, fp32_path, prompt_ids[:16])
        sides = {"fp32": session(fp32_path, threads), "int8": session(int8_path, threads)}
        sizes = {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size}

        with torch.inference_mode():
            ours16 = ours_generate(engine, prompt_ids, 16)[0]
        # Leading greedy tokens equal to ours (of 16): random weights give near-flat logits, so int8's
        # rounding can flip an argmax early; fp32 must agree throughout.
        greedy = {k: leading_equal(ort_generate(s, prompt_ids, 16)[0], ours16) for k, s in sides.items()}
        print(
            f"d{args.depth} {args.arch}: n_embd {cfg.n_embd}, heads {cfg.n_head}, vocab {cfg.vocab_size}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, cpu fp32, {threads} threads; "
            f"export {export_s:.1f} s, fp32 {sizes['fp32'] / 1e6:.0f} MB, int8 {sizes['int8'] / 1e6:.0f} MB"
        )
        print(
            f"same network: max |logit diff| fp32 graph {diff:.2e}; greedy tokens equal to ours before the "
            f"first difference (of 16): fp32 {greedy['fp32']}, int8 {greedy['int8']}"
        )
        # Warm every path (allocator, kernels, onnxruntime's first-run setup) before timing.
        with torch.inference_mode():
            ours_generate(engine, prompt_ids, 8)
        for s in sides.values():
            ort_generate(s, prompt_ids, 8)

        def ours() -> tuple[float, float]:
            with torch.inference_mode():
                return ours_generate(engine, prompt_ids, args.new_tokens)[1:]

        def ort_side(name: str) -> Any:
            return lambda: ort_generate(sides[name], prompt_ids, args.new_tokens)[1:]

        (o_ttft, o_tps), (f_ttft, f_tps), (q_ttft, q_tps) = interleaved_medians(
            [ours, ort_side("fp32"), ort_side("int8")], args.repeats
        )
    header = f"{'path':<22} | {'TTFT ms':>8} | {'decode tok/s':>12} | {'vs ours':>7}"
    print(header)
    print("-" * len(header))
    rows = [
        ("nanoctl Engine", o_ttft, o_tps),
        ("onnxruntime fp32", f_ttft, f_tps),
        ("onnxruntime int8", q_ttft, q_tps),
    ]
    for name, ttft, tps in rows:
        print(f"{name:<22} | {ttft * 1e3:>8.1f} | {tps:>12.1f} | {tps / o_tps:>6.2f}x")
    if args.json:
        result = {
            "depth": args.depth,
            "arch": args.arch,
            "threads": threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "max_abs_logit_diff": diff,
            "greedy_leading_equal_of_16": greedy,
            "bytes": sizes,
            "rows": [{"path": n, "ttft_ms": t * 1e3, "tok_s": s, "vs_ours": s / o_tps} for n, t, s in rows],
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
