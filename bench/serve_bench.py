"""Serving throughput: `nanoctl serve` (continuous batching) vs its batch-1 self and `transformers serve`.

One run measures every figure. For each depth (4 and 6), a classic-arch model (the architecture HF
NanoChat loads) gets random weights (normal, std 0.02). The same weights are written twice: as a nanoctl
sft checkpoint (with a 32768-vocab tokenizer trained on the bundled sample text), and as a
transformers NanoChat directory (written by `nanoctl.export.hf_export.write_hf_directory`, as
`nanoctl export hf`: the weights, the same tokenizer as `tokenizer.json`, and a chat template that renders
nanochat's tokens). Three servers run side by side
as subprocesses on loopback, CPU, fp32, each with 2 threads (OMP/MKL):

- `nanoctl serve --max-batch 32` (the contender; its default `--workers` auto starts two single-threaded
  engines of 16 rows each on these 2 threads);
- `nanoctl serve --max-batch 1` (peer a: the same server without batching: one engine, 2 threads);
- `transformers serve --continuous-batching` (peer b), its defaults but for the KV cache: by default
  that is sized from free memory (on this CPU box 40% of RAM, a 9.5 GB process); here it holds what
  ours holds, 32 x 1024 tokens (`--cb-num-blocks 128` blocks of 256). Its other defaults (8192 tokens per
  batch) measured faster than a 512-token batch budget.

Before timing, the bench checks that both sides run one network: the prompt token ids are equal
(nanoctl's renderer vs the HF chat template) and the logits agree; at every concurrency the greedy
replies of nanoctl are compared text for text with its batch-1 self's and transformers'.

Load: N concurrent streaming clients (httpx, `POST /v1/chat/completions`, `stream: true`), each
sending requests back to back until the phase's request list is used up. Prompts are runs of words
from the sample text, 50-400 rendered tokens (uniform), the same list for every server; 128 new
tokens, greedy (temperature 0). The special tokens' lm_head rows are zero, so greedy decoding never
stops early on either side (every reply has 128 tokens; usage says so). Per request: TTFT = request
sent -> first content chunk; inter-token latency = gaps between content chunks; tokens =
`usage.completion_tokens` (both servers send it on the last chunk). Throughput = generated tokens /
wall time of the phase. The servers take turns at each concurrency, the order rotating, so a change
of machine load hits all three alike.

    python bench/serve_bench.py                     # depth 4 and 6, 1/8/32 clients (23 min, loaded 2-core box)
    python bench/serve_bench.py --quick             # smoke run: depth 4, 1 and 8 clients, 32 tokens
    python bench/serve_bench.py --json              # one JSON document on the last line
    python bench/serve_bench.py --server-env OMP_WAIT_POLICY=PASSIVE   # extra env for all three servers
    python bench/serve_bench.py --nanoctl-args "--kv-dtype float16"    # extra args for both nanoctl servers

Goals (issue 13): >= 4x the batch-1 throughput at 8 clients and >= 8x at 32; >= 2x transformers
serve's throughput at 8 and 32 clients, with a lower TTFT p50. Needs `transformers` (5.x, with its
serving extras: fastapi, uvicorn, openai) and `accelerate` (transformers serve places the model with a
device map).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SEQ_LEN = 1024  # context of both servers (prompt <= 400 + 128 new tokens fits)
VOCAB = 32768
MAX_BATCH = 32
SERVERS = ("nanoctl", "batch1", "hf")
LABELS = {
    "nanoctl": "nanoctl serve --max-batch 32",
    "batch1": "nanoctl serve --max-batch 1",
    "hf": "transformers serve --continuous-batching",
}


# ----------------------------------------------------------------------------------------------------------
# Artifacts: one tokenizer, and per depth a nanoctl checkpoint and a transformers directory of the same weights


def sample_texts(max_docs: int = 2000) -> list[str]:
    import itertools

    from nanoctl.data.shards import sample_documents

    return [d["text"] for d in itertools.islice(sample_documents(), max_docs)]


def make_tokenizer(texts: list[str], home: Path) -> Any:
    from nanoctl.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(iter(texts), VOCAB)
    tok.save(home / "tokenizer")
    return tok


def make_model(depth: int, tok: Any, seed: int) -> Any:
    import torch

    from nanoctl.model.gpt import build_model, config_for_depth

    config = config_for_depth(depth, VOCAB, SEQ_LEN, arch="classic")
    torch.manual_seed(seed)
    model = build_model(config, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        # Zero logits for the specials: greedy decoding then never picks a stop (or tool) token, so every
        # reply runs its full 128 tokens on both servers.
        for special in tok.enc._special_tokens.values():
            model.lm_head.weight[special].zero_()
    return model.eval()


def save_nanoctl_checkpoint(model: Any, home: Path, tag: str) -> Path:
    from nanoctl.checkpoint import save_checkpoint

    directory = home / "checkpoints" / "sft" / tag
    meta = {"step": 0, "model_config": model.config.to_dict(), "user_config": {}, "stage": "sft"}
    save_checkpoint(directory, 0, model.state_dict(), None, meta)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        shutil.copyfile(home / "tokenizer" / name, directory / name)
    return directory


def save_hf_export(model: Any, tok: Any, out: Path) -> tuple[Any, Any]:
    """The same weights and tokenizer as a transformers directory, written by nanoctl's exporter (as
    `nanoctl export hf`: NanoChat weights, tokenizer.json, chat template); returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoctl.export.hf_export import write_hf_directory

    write_hf_directory(out, model.state_dict(), model.config, tok)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def render(tok: Any, text: str) -> list[int]:
    return tok.render_for_completion(
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    )


def make_prompts(tok: Any, texts: list[str], n: int, lo: int, hi: int, seed: int) -> list[str]:
    """n user messages of runs of sample-text words whose rendered prompt is `lo`-`hi` tokens (uniform)."""
    words = " ".join(texts).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        start = rng.randrange(len(words) - 4 * hi)
        a, b = 1, 2 * hi  # the most words whose rendering fits `target` tokens
        while a < b:
            mid = (a + b + 1) // 2
            if len(render(tok, " ".join(words[start : start + mid]))) <= target:
                a = mid
            else:
                b = mid - 1
        prompts.append(" ".join(words[start : start + a]))
    return prompts


def check_same_network(model: Any, hf: Any, hft: Any, tok: Any, prompt: str) -> dict[str, Any]:
    import torch

    ours_ids = render(tok, prompt)
    theirs = hft.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    theirs_ids = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    with torch.inference_mode():
        ids = torch.tensor([ours_ids])
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    return {"prompt_ids_equal": ours_ids == theirs_ids, "max_abs_logit_diff": diff}


# ----------------------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(threads: int, home: Path, extra: list[str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NANOCTL_API_KEY"}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        NANOCTL_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(item.split("=", 1) for item in extra or [])
    return env


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    url: str = ""
    model_id: str = ""
    proc: subprocess.Popen[str] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not become ready (exit {self.proc.poll()}):\n{tail}")
            if not self.url:  # nanoctl prints its URL (--port 0) in a JSON 'ready' event
                self.url = next((e["url"] for e in self.events if e.get("event") == "ready"), "")
            if self.url:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
            time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the server process (all its threads), from /proc."""
        assert self.proc is not None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float | None:
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


def make_servers(
    ckpt: Path, hf_dir: Path, home: Path, logs: Path, threads: int, extra_env: list[str], extra_args: list[str]
) -> dict[str, Server]:
    env = server_env(threads, home, extra_env)
    nanoctl = [sys.executable, "-m", "nanoctl", "--home", str(home), "serve", "--checkpoint", str(ckpt)]
    nanoctl += ["--device", "cpu", "--dtype", "float32", "--port", "0", "--json", *extra_args]
    hf_port = free_port()
    blocks_of_256 = MAX_BATCH * SEQ_LEN // 256
    hf = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir),
        "--continuous-batching", "--device", "cpu", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(hf_port), "--log-level", "warning",
        "--cb-num-blocks", str(blocks_of_256),
    ]  # fmt: skip
    servers = {
        "nanoctl": Server("nanoctl", [*nanoctl, "--max-batch", str(MAX_BATCH)], env, logs / "nanoctl.log"),
        "batch1": Server("batch1", [*nanoctl, "--max-batch", "1"], env, logs / "batch1.log"),
        "hf": Server("hf", hf, env, logs / "hf.log", url=f"http://127.0.0.1:{hf_port}", model_id=str(hf_dir)),
    }
    return servers


def hf_cli_module_ok() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers.cli.transformers") is not None


# ----------------------------------------------------------------------------------------------------------
# Load generator


@dataclass
class RequestResult:
    prompt_index: int
    start: float
    first: float | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    text: str = ""
    error: str | None = None


async def one_request(
    client: httpx.AsyncClient, server: Server, prompt: str, new_tokens: int, res: RequestResult
) -> None:
    """Stream one chat completion into `res` as it arrives (a phase cut at its cap keeps what came)."""
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        # transformers serve logs stream_options as ignored, and sends usage on its last chunk anyway
        "stream_options": {"include_usage": True},
        "max_tokens": new_tokens,
        "temperature": 0.0,
    }
    parts: list[str] = []
    try:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    break
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if res.first is None:
                            res.first = now
                        res.chunk_times.append(now)
                        parts.append(content)
                if chunk.get("usage"):
                    res.tokens = int(chunk["usage"]["completion_tokens"])
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.text = "".join(parts)
    res.end = time.perf_counter()


async def run_phase(
    server: Server, prompts: list[str], indices: list[int], clients: int, new_tokens: int, cap: float
) -> tuple[list[RequestResult], float, bool]:
    """`clients` streams, each sending the next request of `indices` as soon as its last one finished.

    Returns (one result per request of `indices`, wall seconds, whether the phase hit `cap`). A phase
    cut at `cap` keeps the tokens that arrived; requests without a first token by then are censored.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)
    results = {i: RequestResult(i, 0.0) for i in indices}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cap + 60), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results[i].start = time.perf_counter()
                await one_request(client, server, prompts[i], new_tokens, results[i])

        t0 = time.perf_counter()
        capped = False
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), cap)
        except asyncio.TimeoutError:
            capped = True
        wall = time.perf_counter() - t0
    for r in results.values():
        if not r.start:  # never sent: it waited the whole phase
            r.start = t0
    return list(results.values()), wall, capped


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; `inf` entries (censored) sort last and propagate."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    if k == lo or s[hi] == s[lo]:
        return s[lo]
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(
    results: list[RequestResult], wall: float, capped: bool, cpu_s: float | None, load: float
) -> dict[str, Any]:
    done = [r for r in results if r.error is None and r.end]
    inf = float("inf")
    # A request with no first token by the end of a capped phase has TTFT > its wait: counted as inf.
    ttft = [(r.first - r.start) * 1e3 if r.first is not None else inf for r in results if r.error is None]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    # Generated tokens: the usage count of finished requests; content chunks of those cut by the cap.
    tokens = sum(r.tokens if r.end else len(r.chunk_times) for r in results if r.error is None)
    chunks = sum(len(r.chunk_times) for r in done)
    return {
        "requests": len(results),
        "completed": len(done),
        "capped": capped,
        "censored_ttft": sum(1 for x in ttft if x == inf),
        "errors": [r.error for r in results if r.error is not None][:3],
        "tokens": tokens,
        "tokens_per_content_chunk": sum(r.tokens for r in done) / chunks if chunks else None,
        "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
        "server_cpu_s": cpu_s,
        "tok_per_cpu_s": tokens / cpu_s if cpu_s else None,
        "loadavg_1m_after": load,
    }


# ----------------------------------------------------------------------------------------------------------
# The run


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b and a != float("inf") and b != float("inf") else None


def equal_replies(a: dict[int, str], b: dict[int, str]) -> list[int]:
    """[equal, compared] over the requests both servers finished."""
    common = set(a) & set(b)
    return [sum(a[i] == b[i] for i in common), len(common)]


def bench_depth(
    depth: int, args: argparse.Namespace, tok: Any, texts: list[str], work: Path
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    model = make_model(depth, tok, seed=depth)
    tag = f"d{depth}"
    ckpt = save_nanoctl_checkpoint(model, work / "home", tag)
    hf_dir = work / f"hf-{tag}"
    hf, hft = save_hf_export(model, tok, hf_dir)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    max_requests = max(4, *(args.rounds.get(c, 1) * c for c in args.clients))
    prompts = make_prompts(tok, texts, max_requests, args.prompt_min, args.prompt_max, seed=100 + depth)
    lengths = [len(render(tok, p)) for p in prompts]
    same = check_same_network(model, hf, hft, tok, prompts[0])
    del model, hf
    print(
        f"\n== d{depth} classic: n_embd {cfg.n_embd}, heads {cfg.n_head}, vocab {cfg.vocab_size}, "
        f"{n_params / 1e6:.1f}M params, context {cfg.sequence_len}; prompts {min(lengths)}-{max(lengths)} "
        f"tokens (mean {sum(lengths) / len(lengths):.0f}); same network: prompt ids equal "
        f"{same['prompt_ids_equal']}, max |logit diff| {same['max_abs_logit_diff']:.1e}",
        flush=True,
    )
    logs = work / f"logs-{tag}"
    logs.mkdir(exist_ok=True)
    servers = make_servers(
        ckpt, hf_dir, work / "home", logs, args.threads, args.server_env, shlex.split(args.nanoctl_args)
    )
    out: dict[str, Any] = {
        "depth": depth,
        "n_embd": cfg.n_embd,
        "params_m": n_params / 1e6,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        "same_network": same,
        "phases": {},
    }
    try:
        t0 = time.perf_counter()
        for s in servers.values():  # start together: their slow starts (imports, loading) overlap
            s.start()
        for s in servers.values():
            s.wait_ready(args.start_timeout)
            if not s.model_id:
                s.model_id = httpx.get(s.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        # nanoctl's /health says how many engines --workers (auto) started, and what its KV cache holds
        health = {k: httpx.get(s.url + "/health", timeout=10).json() for k, s in servers.items() if k != "hf"}
        out["engines"] = {k: h.get("workers") for k, h in health.items()}
        out["kv_dtype"] = {k: h.get("kv_dtype") for k, h in health.items()}
        print(
            f"servers ready in {time.perf_counter() - t0:.0f} s; nanoctl engines {out['engines']}, "
            f"KV cache {out['kv_dtype']}",
            flush=True,
        )
        # Warm-up (not timed): the longest prompt alone, then 4 together (allocators, batch paths, HF's CB init).
        longest = max(range(len(prompts)), key=lambda i: lengths[i])
        for s in servers.values():
            asyncio.run(run_phase(s, prompts, [longest], 1, 8, args.start_timeout))
            asyncio.run(run_phase(s, prompts, list(range(4)), 4, 8, args.start_timeout))
        out["rss_mib_after_warmup"] = {k: s.rss_mib() for k, s in servers.items()}
        order = list(SERVERS)
        for ci, clients in enumerate(args.clients):
            n = args.rounds.get(clients, 1) * clients
            indices = list(range(n))
            phase: dict[str, Any] = {}
            replies: dict[str, dict[int, str]] = {}
            rot = order[ci % len(order) :] + order[: ci % len(order)]
            for name in rot:
                s = servers[name]
                cpu0 = s.cpu_seconds()
                results, wall, capped = asyncio.run(
                    run_phase(s, prompts, indices, clients, args.new_tokens, args.phase_cap)
                )
                cpu1 = s.cpu_seconds()
                cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                phase[name] = summarize(results, wall, capped, cpu, os.getloadavg()[0])
                replies[name] = {r.prompt_index: r.text for r in results if r.end and r.error is None}
                p = phase[name]
                print(
                    f"  {clients:>2} clients  {name:<8} {p['tok_s']:>7.1f} tok/s  TTFT p50/p99 "
                    f"{fmt(p['ttft_p50_ms'])}/{fmt(p['ttft_p99_ms'])} ms  ITL p50/p99 "
                    f"{fmt(p['itl_p50_ms'], '.1f')}/{fmt(p['itl_p99_ms'], '.1f')} ms  "
                    f"{p['completed']}/{n} req, {p['tokens']} tok in {wall:.1f} s"
                    + (" (capped)" if capped else "")
                    + f", server CPU {fmt(p['server_cpu_s'], '.1f')} s, load {p['loadavg_1m_after']:.1f}"
                    + (f"  errors: {p['errors']}" if p["errors"] else ""),
                    flush=True,
                )
            phase["ratios"] = {
                "vs_batch1_tok_s": ratio(phase["nanoctl"]["tok_s"], phase["batch1"]["tok_s"]),
                "vs_hf_tok_s": ratio(phase["nanoctl"]["tok_s"], phase["hf"]["tok_s"]),
                "vs_hf_ttft_p50": ratio(phase["nanoctl"]["ttft_p50_ms"], phase["hf"]["ttft_p50_ms"]),
                "vs_batch1_tok_per_cpu_s": ratio(
                    phase["nanoctl"]["tok_per_cpu_s"], phase["batch1"]["tok_per_cpu_s"]
                ),
                "vs_hf_tok_per_cpu_s": ratio(phase["nanoctl"]["tok_per_cpu_s"], phase["hf"]["tok_per_cpu_s"]),
            }
            # Greedy decoding of one network: the same prompt should get the same reply from every server,
            # whatever else is in the batch (requests finished on both sides are compared).
            phase["replies_equal"] = {
                f"nanoctl_vs_{peer}": equal_replies(replies["nanoctl"], replies[peer])
                for peer in ("batch1", "hf")
            }
            out["phases"][str(clients)] = phase
    finally:
        for s in servers.values():
            s.stop()
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'depth':>5} {'clients':>7} {'server':<8} | {'tok/s':>7} | {'TTFT p50':>8} {'p99':>7} | "
        f"{'ITL p50':>7} {'p99':>6} | {'tok/CPU-s':>9}"
    )
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        for clients, phase in r["phases"].items():
            for name in SERVERS:
                p = phase[name]
                print(
                    f"{r['depth']:>5} {clients:>7} {name:<8} | {p['tok_s']:>7.1f} | {fmt(p['ttft_p50_ms']):>8} "
                    f"{fmt(p['ttft_p99_ms']):>7} | {fmt(p['itl_p50_ms'], '.1f'):>7} {fmt(p['itl_p99_ms'], '.1f'):>6} "
                    f"| {fmt(p['tok_per_cpu_s'], '.1f'):>9}"
                )
            q, eq = phase["ratios"], phase["replies_equal"]
            print(
                f"{'':>5} {'':>7} ratios   | nanoctl / batch-1 {fmt(q['vs_batch1_tok_s'], '.2f')}x, "
                f"/ transformers {fmt(q['vs_hf_tok_s'], '.2f')}x; TTFT p50 / transformers "
                f"{fmt(q['vs_hf_ttft_p50'], '.2f')}; same replies as batch-1 "
                f"{eq['nanoctl_vs_batch1'][0]}/{eq['nanoctl_vs_batch1'][1]}, as transformers "
                f"{eq['nanoctl_vs_hf'][0]}/{eq['nanoctl_vs_hf'][1]}"
            )


def parse_rounds(text: str) -> dict[int, int]:
    """'1:4,8:2,32:1' -> {1: 4, 8: 2, 32: 1}: requests per client at each concurrency."""
    out = {}
    for part in text.split(","):
        c, r = part.split(":")
        out[int(c)] = int(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--rounds",
        type=parse_rounds,
        default=parse_rounds("1:3,8:2,32:1"),
        help="requests per client at each concurrency, e.g. 1:3,8:2,32:1 (the same for every server)",
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-min", type=int, default=50)
    ap.add_argument("--prompt-max", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2, help="threads per server (OMP/MKL) and for the set-up")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to start")
    ap.add_argument(
        "--phase-cap",
        type=float,
        default=180.0,
        help="seconds one server's phase may take; past it the tokens so far count and requests "
        "without a first token are censored (TTFT reported as inf)",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for all three servers (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE",
    )
    ap.add_argument(
        "--nanoctl-args",
        default="",
        metavar="ARGS",
        help="extra `nanoctl serve` arguments for both nanoctl servers (the contender and its batch-1 self), "
        "e.g. '--kv-dtype float16'",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: depth 4, 1 and 8 clients, 32 tokens")
    ap.add_argument("--workdir", help="keep the checkpoints, HF directories and server logs here")
    ap.add_argument("--json", action="store_true", help="print one JSON document as the last line")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.clients, args.new_tokens = [4], [1, 8], 32
        args.rounds = {1: 2, 8: 1}
    if not hf_cli_module_ok():
        print("transformers (with `transformers serve`) is not installed", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-bench-")))
        texts = sample_texts()
        tok = make_tokenizer(texts, work / "home")
        results = [bench_depth(d, args, tok, texts, work) for d in args.depth]
    print_table(results)
    total = time.perf_counter() - started
    print(f"whole run {total:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        import transformers

        doc = {
            "command": " ".join(
                ["python", "bench/serve_bench.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "clients": args.clients,
            "rounds": args.rounds,
            "phase_cap_s": args.phase_cap,
            "server_env": args.server_env,
            "nanoctl_args": args.nanoctl_args,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "whole_run_s": total,
            "results": results,
        }
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
