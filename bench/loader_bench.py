"""Does the data loader keep up? Loader tokens/s vs the tokens/s a training step consumes.

Both at the CPU default config of `nanoctl pretrain` (CPU_PRESET: depth 4, seq 256, 8 rows), on the
pretraining shards of the home (or the embedded sample), with the home's tokenizer (trained on the fly
into a temp home when there is none). The loader must be >= 5x faster than training for the step never
to wait on data; the ratio is printed.

    python bench/loader_bench.py [--home DIR] [--batches 200] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from nanoctl.home import Home


def get_tokenizer(home: Home) -> tuple[object, Home]:
    from nanoctl.errors import NanoctlError
    from nanoctl.tokenizer import Tokenizer, load_tokenizer

    try:
        return load_tokenizer(home), home
    except NanoctlError:
        pass
    tmp = Home(Path(tempfile.mkdtemp(prefix="nanoctl-loader-bench-")))
    from nanoctl.data.shards import iter_texts

    print(f"no tokenizer in the home: training one (vocab 32768) on the sample in {tmp.root}")
    tok = Tokenizer.train_from_iterator(iter_texts("train", tmp, max_chars=20_000_000), vocab_size=32768)
    tok.save(tmp.tokenizer_dir)
    return tok, tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--batches", type=int, default=200, help="loader batches to time (after the first)")
    ap.add_argument("--steps", type=int, default=5, help="training steps to time (after 1 warmup)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from nanoctl.data.loader import DataLoader
    from nanoctl.data.shards import resolve_pretrain_shards
    from nanoctl.model.gpt import GPTConfig, build_model
    from nanoctl.train.pretrain import PretrainOptions, plan_pretrain

    torch.set_num_threads(args.threads)
    tok, home = get_tokenizer(Home.resolve(args.home))  # the script is an entry point: resolve once
    plan = plan_pretrain(PretrainOptions(), tok.get_vocab_size(), "cpu")  # the CPU defaults
    B, T = plan.device_batch_size, plan.max_seq_len
    shards = resolve_pretrain_shards(home)
    print(
        f"CPU default: depth {plan.depth}, seq {T}, {B} rows/step, vocab {tok.get_vocab_size()}; "
        f"shards: {shards.directory}{' (embedded sample)' if shards.is_sample else ''}"
    )

    # loader alone, steady state (the first batch fills the 1000-doc buffer)
    with DataLoader(tok, shards.train_paths, B, T, tokenizer_threads=args.threads) as dl:
        t0 = time.perf_counter()
        next(dl)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(dl)
        loader_tps = args.batches * B * T / (time.perf_counter() - t0)

    # training step alone on fixed data
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_dict(plan.model_config), "cpu", torch.float32)
    opt = model.setup_optimizer(weight_decay=plan.weight_decay)
    with DataLoader(tok, shards.train_paths, B, T) as dl:
        x, y = next(dl)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    train_tps = B * T / statistics.median(times)

    print(f"loader: {loader_tps:,.0f} tokens/s (first batch incl. buffer fill: {first:.2f}s)")
    print(f"train step consumes: {train_tps:,.0f} tokens/s (median of {args.steps} steps)")
    ratio = loader_tps / train_tps
    print(f"ratio loader/train: {ratio:.1f}x ({'OK' if ratio >= 5 else 'BELOW'} the 5x goal)")


if __name__ == "__main__":
    main()
