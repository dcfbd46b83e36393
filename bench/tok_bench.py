"""Tokenizer training and encoding: nanoctl's Rust BPE vs PyPI `rustbpe` (nanochat's) and HF `tokenizers`.

Everything is measured in the same run on the same text:
  * training time at vocab 32768 (median of --repeats), each trainer in its own subprocess so peak
    RSS (resource.getrusage) is its own; the corpus is loaded before the clock starts;
  * held-out compression (bytes per token) of each trained tokenizer;
  * encoding MB/s of our Rust encoder vs tiktoken on the same ranks, single thread and batched,
    and whether they are token-identical.

Text: ../shared/data/pretrain/*.parquet (~18 M chars) and ../shared/data/public_domain/books.jsonl.gz
(~10 M chars), 28.5 MB of distinct text. The validation shard (shard_00008) is held out; the rest is
repeated as whole documents until the training set reaches --mb MB (the run says how many times).

    uv pip install rustbpe tokenizers     # the peers (pyproject extra "bench")
    python bench/tok_bench.py              # 50 MB, 3 repeats
    python bench/tok_bench.py --mb 10 --repeats 1 --skip-hf
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("NANOCTL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
VAL_SHARD = "shard_00008.parquet"


def load_corpus(mb: float) -> tuple[list[str], list[str], dict]:
    """(train docs repeated to `mb` MB of UTF-8, held-out docs, info)."""
    import pyarrow.parquet as pq

    train: list[str] = []
    held: list[str] = []
    for p in sorted((SHARED / "pretrain").glob("shard_*.parquet")):
        docs = [d for d in pq.read_table(p, columns=["text"]).column("text").to_pylist() if d]
        (held if p.name == VAL_SHARD else train).extend(docs)
    with gzip.open(SHARED / "public_domain" / "books.jsonl.gz", "rt", encoding="utf-8") as f:
        train.extend(json.loads(line)["text"] for line in f)
    distinct = sum(len(d.encode("utf-8")) for d in train)
    target = int(mb * 1e6)
    out: list[str] = []
    total = 0
    reps = 0
    while total < target:
        reps += 1
        for d in train:
            out.append(d)
            total += len(d.encode("utf-8"))
            if total >= target:
                break
    info = {"distinct_mb": distinct / 1e6, "train_mb": total / 1e6, "repeats_of_distinct": total / distinct}
    info["held_out_mb"] = sum(len(d.encode("utf-8")) for d in held) / 1e6
    return out, held, info


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ child side


def child(which: str, mb: float, vocab: int, out_path: str) -> None:
    docs, _, _ = load_corpus(mb)
    base = maxrss_mb()
    t0 = time.perf_counter()
    if which == "ours":
        from nanoctl import _rustbpe

        tok = _rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab, pattern=SPLIT_PATTERN)
        ranks = [(bytes(b), r) for b, r in tok.get_mergeable_ranks()]
        extra = {k: v for k, v in tok.train_stats().items()}
    elif which == "rustbpe":
        import rustbpe

        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab, pattern=SPLIT_PATTERN)
        ranks = [(bytes(b), r) for b, r in tok.get_mergeable_ranks()]
        extra = {}
    elif which == "tokenizers":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        # nanochat's (OLD) HuggingFaceTokenizer setup: the same split regex, then byte-level.
        tk = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
        tk.normalizer = None
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            show_progress=False,
            min_frequency=0,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tk.train_from_iterator(docs, trainer)
        ranks = None
        extra = {}
        tk.save(out_path + ".json")
    else:
        raise SystemExit(f"unknown trainer {which}")
    seconds = time.perf_counter() - t0
    peak = maxrss_mb()
    with open(out_path, "wb") as f:
        pickle.dump(
            {"seconds": seconds, "base_rss_mb": base, "peak_rss_mb": peak, "ranks": ranks, "extra": extra}, f
        )


# ----------------------------------------------------------------------------------------- parent side


def run_child(which: str, mb: float, vocab: int, tmp: Path, i: int) -> dict:
    out = tmp / f"{which}_{i}.pkl"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--mb",
        str(mb),
        "--vocab",
        str(vocab),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    with open(out, "rb") as f:
        r = pickle.load(f)
    r["path"] = str(out)
    return r


def bytes_per_token_tiktoken(ranks: list[tuple[bytes, int]], held: list[str]) -> tuple[float, object]:
    import tiktoken

    enc = tiktoken.Encoding(name="b", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(ranks), special_tokens={})
    n = sum(len(x) for x in enc.encode_ordinary_batch(held, num_threads=2))
    return sum(len(d.encode("utf-8")) for d in held) / n, enc


def bytes_per_token_hf(path: str, held: list[str]) -> float:
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(path + ".json")
    n = sum(len(e.ids) for e in tk.encode_batch(held, add_special_tokens=False))
    return sum(len(d.encode("utf-8")) for d in held) / n


def encode_bench(ranks: list[tuple[bytes, int]], docs: list[str], repeats: int) -> dict:
    import tiktoken

    from nanoctl import _rustbpe

    enc = tiktoken.Encoding(name="b", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(ranks), special_tokens={})
    ours = _rustbpe.Tokenizer.from_ranks(ranks, SPLIT_PATTERN)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)

    def timed(fn) -> tuple[float, object]:
        times, res = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), res

    t_tik1, ids_tik = timed(lambda: [enc.encode_ordinary(d) for d in docs])
    t_our1, ids_our = timed(lambda: [ours.encode(d) for d in docs])
    threads = os.cpu_count() or 1
    t_tikb, ids_tikb = timed(lambda: enc.encode_ordinary_batch(docs, num_threads=threads))
    t_ourb, ids_ourb = timed(lambda: ours.batch_encode(docs))
    return {
        "mb": nbytes / 1e6,
        "threads": threads,
        "tiktoken_1t_mbs": nbytes / t_tik1 / 1e6,
        "ours_1t_mbs": nbytes / t_our1 / 1e6,
        "tiktoken_batch_mbs": nbytes / t_tikb / 1e6,
        "ours_batch_mbs": nbytes / t_ourb / 1e6,
        "identical": ids_tik == ids_our and ids_tikb == ids_ourb == ids_tik,
        "tokens": sum(len(x) for x in ids_tik),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="training text size in MB (default 50)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3, help="training runs per trainer (median reported)")
    ap.add_argument("--skip-hf", action="store_true", help="skip HF tokenizers (the slowest)")
    ap.add_argument("--encode-mb", type=float, default=10.0, help="text to encode for the encoding benchmark")
    ap.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.mb, a.vocab, a.out)
        return

    docs, held, info = load_corpus(a.mb)
    print(
        f"corpus: {info['distinct_mb']:.1f} MB distinct text, repeated {info['repeats_of_distinct']:.2f}x "
        f"(whole documents) to {info['train_mb']:.1f} MB for training; held out: {info['held_out_mb']:.1f} MB "
        f"({VAL_SHARD}); vocab {a.vocab}; {os.cpu_count()} CPUs",
        flush=True,
    )
    trainers = ["ours", "rustbpe"] + ([] if a.skip_hf else ["tokenizers"])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        runs: dict[str, list[dict]] = {t: [] for t in trainers}
        for i in range(a.repeats):  # interleaved so load changes hit every trainer alike
            for t in trainers:
                try:
                    r = run_child(t, a.mb, a.vocab, tmp, i)
                except (subprocess.CalledProcessError, FileNotFoundError) as e:
                    print(f"  {t}: failed ({e}); is it installed? (uv pip install rustbpe tokenizers)")
                    runs[t] = []
                    break
                runs[t].append(r)
                print(
                    f"  run {i + 1}: {t:<10} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.1f} MB",
                    flush=True,
                )
        for t, rs in runs.items():
            if not rs:
                continue
            last = rs[-1]
            res = {
                "seconds": statistics.median(r["seconds"] for r in rs),
                "all_seconds": [r["seconds"] for r in rs],
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                "rss_growth_mb": statistics.median(r["peak_rss_mb"] - r["base_rss_mb"] for r in rs),
            }
            if last["ranks"] is not None:
                res["bytes_per_token"], _ = bytes_per_token_tiktoken(last["ranks"], held)
                res["ranks"] = last["ranks"]
            else:
                res["bytes_per_token"] = bytes_per_token_hf(last["path"], held)
            results[t] = res

    ours = results["ours"]
    print("\ntraining (median wall time; peak RSS of the trainer's process, and its growth during training):")
    for t, r in results.items():
        ratio = "" if t == "ours" else f"  ours is {r['seconds'] / ours['seconds']:.2f}x faster"
        print(
            f"  {t:<10} {r['seconds']:7.2f} s  {info['train_mb'] / r['seconds']:6.1f} MB/s  peak RSS {r['peak_rss_mb']:7.1f} MB "
            f"(+{r['rss_growth_mb']:.1f})  held-out {r['bytes_per_token']:.4f} bytes/token{ratio}"
        )
    if "rustbpe" in results:
        rb = results["rustbpe"]
        comp = 100 * (ours["bytes_per_token"] - rb["bytes_per_token"]) / rb["bytes_per_token"]
        same = ours["ranks"] == rb["ranks"]
        print(
            f"  vs rustbpe: {rb['seconds'] / ours['seconds']:.2f}x faster (target >= 2x), peak RSS "
            f"{ours['peak_rss_mb']:.0f} vs {rb['peak_rss_mb']:.0f} MB, compression {comp:+.3f}% "
            f"(target within 0.5%), identical merges: {same}"
        )
    if "tokenizers" in results:
        print(
            f"  vs HF tokenizers: {results['tokenizers']['seconds'] / ours['seconds']:.2f}x faster (target >= 5x)"
        )

    enc_docs, _, _ = load_corpus(a.encode_mb)
    e = encode_bench(ours["ranks"], enc_docs + held, repeats=max(1, a.repeats))
    print(
        f"\nencoding {e['mb']:.1f} MB on our vocab-{a.vocab} ranks (median of {max(1, a.repeats)}):\n"
        f"  single thread: ours {e['ours_1t_mbs']:.1f} MB/s vs tiktoken {e['tiktoken_1t_mbs']:.1f} MB/s "
        f"= {e['ours_1t_mbs'] / e['tiktoken_1t_mbs']:.2f}x (target >= 1.5x)\n"
        f"  batch ({e['threads']} threads): ours {e['ours_batch_mbs']:.1f} MB/s vs tiktoken "
        f"{e['tiktoken_batch_mbs']:.1f} MB/s = {e['ours_batch_mbs'] / e['tiktoken_batch_mbs']:.2f}x\n"
        f"  token-identical to tiktoken: {e['identical']} ({e['tokens']:,} tokens)"
    )
    if a.json:
        for r in results.values():
            r.pop("ranks", None)
        print(json.dumps({"corpus": info, "training": results, "encoding": e}, indent=2))


if __name__ == "__main__":
    main()
