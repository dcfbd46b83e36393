"""`nanoctl serve`, library side: options, load the model(s), run uvicorn, drain on SIGTERM.

`serve(opts, home=...)` binds the port first (a port in use is a one-line error before anything slow),
answers `/health` with 503 while the checkpoint loads in a background thread, then admits requests.
One `Scheduler` (engine) per device, or `--workers` of them on a CPU (each its own model copy and
thread): `--gpus N` loads a replica on each of cuda:0..N-1; several engines sit behind a least-loaded
`Router`.

Shutdown (SIGTERM, or Ctrl+C): the server stops admitting (new requests get an OpenAI-shaped 503 and
/health turns 503, so a load balancer moves on) but keeps its socket open while the requests in flight
finish, for up to `--shutdown-timeout` seconds; streams still running then are ended with an error event.
Then uvicorn closes the connections, the schedulers stop and `serve` returns (exit 0). A second Ctrl+C
ends the drain at once. uvicorn's own handler would close the socket immediately (refused connections
instead of 503s) and re-raise the signal afterwards (exit 143), hence the small subclass below.

This module is imported by the CLI for its options: nothing heavy (torch, fastapi, uvicorn) at import.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.inference_options import DTYPE_ALIASES, check_quantize, quantize_option
from nanoctl.options import DISTRIBUTED, RUNTIME, START, option

if TYPE_CHECKING:
    from nanoctl.serve.api import AppConfig, ServerState
    from nanoctl.serve.protocol import Limits

STAGES = ("base", "mid", "sft", "rl")
LIMITS = RUNTIME  # the help panels are nanoctl.options.PANELS; limits sit with the runtime options


@dataclass
class ServeOptions:
    """Everything `nanoctl serve` takes; the CLI flags are derived from these fields."""

    stage: str | None = option(
        None, help="base|mid|sft|rl (default: newest of rl > sft > mid > base).", panel=START
    )
    tag: str | None = option(None, help="Model tag, e.g. d20 (default: largest d<N>).", panel=START)
    step: int | None = option(None, help="Checkpoint step (default: latest).", panel=START)
    checkpoint: str | None = option(
        None, help="A checkpoint directory or model_<step>.pt file (overrides --stage/--tag).", panel=START
    )
    lora: list[str] = option(
        help="A LoRA adapter directory, PATH or NAME=PATH (repeatable; base: the adapters' own unless "
        "--stage/--tag/--step/--checkpoint). One PATH is merged into the weights (model id <base>+lora:...); "
        "several, or a NAME, are served unmerged beside the base, each its own model id (NAME, else "
        "lora:<stage>/<tag>@<step>), chosen per request by `model`.", factory=list, panel=START,
    )
    device: str = option("auto", help="auto|cpu|cuda|cuda:N|mps.")
    dtype: str | None = option(
        None, help="bfloat16|float16|float32 (default: bf16 on CUDA SM80+, else fp32)."
    )
    quantize: str = quantize_option()
    kv_dtype: str | None = option(
        None, help="bfloat16|float16|float32: how the KV cache stores keys and values (default: the model's "
        "dtype). float16 halves what a CPU decode step reads from a full batch's cache (its attention is "
        "memory-bound) at fp16 rounding of K/V; the arithmetic stays in the model's dtype. On a CPU the "
        "native decode attention reads float32 and float16 caches (bfloat16 falls back to SDPA).",
    )
    host: str = option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; use --api-key).")
    port: int = option(8000, help="TCP port (0: any free port, printed at start).")
    api_key: str | None = option(
        None, help="Require 'Authorization: Bearer KEY' on every route but /health (or $NANOCTL_API_KEY)."
    )
    max_batch: int = option(
        32, help="Rows decoded together per device (one per sample of a request).", unit="rows"
    )
    max_queue: int = option(256, help="Requests that may wait for rows; more get 429 with Retry-After.")
    prefill_chunk: int = option(256, help="Prompt tokens prefilled between two decode steps.", unit="tokens")
    max_prompt_tokens: int | None = option(
        None, help="Longest prompt accepted (default: the model's context).", unit="tokens", panel=LIMITS
    )
    max_n: int = option(8, help="Most samples (n) per request.", panel=LIMITS)
    max_messages: int = option(500, help="Most messages per chat request.", panel=LIMITS)
    max_message_chars: int = option(8000, help="Longest message.", unit="characters", panel=LIMITS)
    max_total_chars: int = option(
        32000, help="Longest conversation or prompt.", unit="characters", panel=LIMITS
    )
    max_temperature: float = option(2.0, help="Highest temperature accepted (the lowest is 0).", panel=LIMITS)
    max_top_k: int = option(200, help="Highest top_k accepted (0 = off is always allowed).", panel=LIMITS)
    max_tokens_limit: int = option(
        4096, help="Highest max_tokens / max_completion_tokens accepted.", unit="tokens", panel=LIMITS
    )
    max_body_bytes: int = option(
        1 << 20, help="Largest request body; more gets 413.", unit="bytes", panel=LIMITS
    )
    gpus: int = option(
        1, help="Serve a replica on each of cuda:0..N-1 (least-loaded routing).", panel=DISTRIBUTED
    )
    workers: int = option(
        0, help="Engines per device, each decoding its share of --max-batch on its own thread (0 = auto: 2 on a "
        "CPU with 2+ threads for weights up to 1 GiB, each engine then single-threaded; else 1). Each holds a "
        "copy of the model.",
        panel=DISTRIBUTED,
    )
    shutdown_timeout: float = option(
        30.0, help="On SIGTERM, how long in-flight requests may take to finish.", unit="s"
    )
    cors_origin: list[str] = option(
        help="Allow browser pages from this origin (repeatable; '*' = any). Default: CORS off.", factory=list
    )
    log_conversations: str | None = option(
        None, help="Append one JSON line per request (messages and reply) to this file. Off by default."
    )
    access_log: bool = option(False, help="Log one line per HTTP request on stderr.")

    def validate(self) -> None:
        """Usage errors (exit 2) before anything slow."""
        if isinstance(self.lora, str):  # a library caller's single path
            self.lora = [self.lora]
        if self.stage is not None and self.stage not in STAGES:
            raise UsageError(f"--stage {self.stage!r} is not a stage", f"use one of: {', '.join(STAGES)}")
        if self.step is not None and self.step < 0:
            raise UsageError(f"--step {self.step} must be >= 0")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port} must be in 0..65535")
        at_least_one = {
            "--max-batch": self.max_batch, "--max-queue": self.max_queue, "--prefill-chunk": self.prefill_chunk,
            "--max-n": self.max_n, "--max-messages": self.max_messages, "--max-message-chars": self.max_message_chars,
            "--max-total-chars": self.max_total_chars, "--max-tokens-limit": self.max_tokens_limit,
            "--max-body-bytes": self.max_body_bytes, "--gpus": self.gpus,
        }  # fmt: skip
        if self.max_prompt_tokens is not None:
            at_least_one["--max-prompt-tokens"] = self.max_prompt_tokens
        for flag, value in at_least_one.items():
            if value < 1:
                raise UsageError(f"{flag} {value} must be >= 1")
        if self.kv_dtype is not None and self.kv_dtype.strip().lower() not in DTYPE_ALIASES:
            raise UsageError(
                f"--kv-dtype {self.kv_dtype!r} is not one of bfloat16, float16, float32",
                "leave it out for the model's dtype, or pass float16 to halve the cache",
            )
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers} must be >= 0", "0 picks the number per device")
        if self.workers > self.max_batch:
            raise UsageError(
                f"--workers {self.workers} is more than --max-batch {self.max_batch} rows",
                "each engine decodes at least one row: lower --workers or raise --max-batch",
            )
        if self.max_top_k < 0:
            raise UsageError(f"--max-top-k {self.max_top_k} must be >= 0")
        if not self.max_temperature >= 0:
            raise UsageError(f"--max-temperature {self.max_temperature} must be >= 0")
        if not self.shutdown_timeout >= 0:
            raise UsageError(f"--shutdown-timeout {self.shutdown_timeout} must be >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty", "pass a secret, or leave the flag out for no auth")
        if self.gpus > 1 and self.device not in ("auto", "cuda"):
            raise UsageError(
                f"--gpus {self.gpus} places one replica on each of cuda:0..{self.gpus - 1}; --device {self.device} "
                "cannot be combined with it", "leave --device at auto (or cuda)",
            )  # fmt: skip
        check_quantize(self.quantize, "cuda" if self.gpus > 1 else self.device, self.dtype)

    def limits(self) -> Limits:
        from nanoctl.serve.protocol import Limits

        return Limits(
            max_messages=self.max_messages, max_message_chars=self.max_message_chars,
            max_total_chars=self.max_total_chars, max_temperature=self.max_temperature, max_top_k=self.max_top_k,
            max_tokens=self.max_tokens_limit, max_n=self.max_n, max_prompt_tokens=self.max_prompt_tokens,
        )  # fmt: skip

    def app_config(self) -> AppConfig:
        from pathlib import Path

        from nanoctl.serve.api import AppConfig

        return AppConfig(
            limits=self.limits(), api_key=self.api_key, cors_origins=list(self.cors_origin),
            max_body_bytes=self.max_body_bytes,
            log_conversations=Path(self.log_conversations).expanduser() if self.log_conversations else None,
        )  # fmt: skip


Event = dict[str, Any]


def print_event(event: Event) -> None:
    """The default `on_event`: one human line on stderr per event."""
    kind = event["event"]
    if kind == "listening":
        line = f"listening on {event['url']} (loading {event['model']}…)"
    elif kind == "ready":
        line = f"ready: {event['model']} at {event['url']}/v1 on {', '.join(event['devices'])}"
        if event.get("adapters"):
            line += f" (LoRA adapters: {', '.join(event['adapters'])})"
    elif kind == "draining":
        line = f"shutting down: {event['in_flight']} request(s) in flight, waiting up to {event['timeout_s']:g} s"
    elif kind == "stopped":
        line = "stopped"
    else:
        line = json.dumps(event)
    print(line, file=sys.stderr, flush=True)


def serve(
    opts: ServeOptions,
    *,
    home: Home | str | os.PathLike[str] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> None:
    """Serve the checkpoint `opts` names until SIGTERM/SIGINT (then drain and return). An entry point."""
    opts.validate()
    home = Home.resolve(home)
    say = on_event or print_event
    devices = _devices(opts)
    ref, adapters = _resolve(opts, home)
    sock, url = _bind(opts.host, opts.port)  # before the slow imports: a port in use fails at once
    try:
        config = opts.app_config()
        if not _is_loopback(sock) and not opts.api_key:
            print(
                f"warning: listening on {url} without --api-key: anyone who can reach this port can use the model",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        _run(opts, home, ref, adapters, devices, config, sock, url, say)
    finally:
        sock.close()


def _run(opts: ServeOptions, home: Home, ref: Any, adapters: dict[str, Any], devices: list[str],
         config: AppConfig, sock: socket.socket, url: str, say: Callable[[Event], None]) -> None:  # fmt: skip
    import uvicorn

    from nanoctl.serve.api import ServerState, create_app
    from nanoctl.serve.metrics import ServeMetrics

    state = ServerState()
    metrics = ServeMetrics()
    try:
        app = create_app(config, state, metrics)
    except OSError as e:  # --log-conversations cannot be opened
        raise NanoctlError(
            f"cannot open --log-conversations {opts.log_conversations}: {e.strerror}"
        ) from None
    server = _make_server(
        uvicorn.Config(
            app, log_level="info" if opts.access_log else "warning", access_log=opts.access_log, lifespan="on",
            timeout_graceful_shutdown=5, ws="none",
        ),
        state, opts.shutdown_timeout, say,
    )  # fmt: skip
    schedulers: list[Any] = []
    loader = threading.Thread(
        target=_load, args=(opts, home, ref, adapters, devices, state, metrics, schedulers, server, url, say),
        name="nanoctl-serve-load", daemon=True,
    )  # fmt: skip
    say({"event": "listening", "url": url, "model": ref.label})
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        for s in schedulers:
            s.close()
    if state.error is not None:
        raise NanoctlError(f"loading {ref.label} failed: {state.error}")
    say({"event": "stopped"})


def _load(opts: ServeOptions, home: Home, ref: Any, adapters: dict[str, Any], devices: list[str],
          state: ServerState, metrics: Any, schedulers: list[Any], server: Any, url: str,
          say: Callable[[Event], None]) -> None:  # fmt: skip
    """Load a replica per device and start its scheduler (in a thread: /health answers meanwhile).

    `adapters` (model id -> directory) non-empty: the base loads unmerged and the adapters go into a LoRA
    bank on every replica; else `opts.lora` (one path at most) is merged as `nanoctl chat` does.
    """
    try:
        from nanoctl.chat import ChatOptions, load_chat_model
        from nanoctl.device import parse_dtype
        from nanoctl.serve.api import ServedModel
        from nanoctl.serve.scheduler import Router, Scheduler

        kv_dtype = None if opts.kv_dtype is None else parse_dtype(opts.kv_dtype)

        entries = _bank_entries(adapters)
        merged = None if adapters or not opts.lora else opts.lora[0]
        loaded = None
        for device in devices:
            # Every engine loads its own copy: a LoRA bank's row selection and the prefill's
            # last-position flag are per-model state, which two engine threads must not share.
            chat_opts = ChatOptions(checkpoint=str(ref.directory), step=ref.step, device=device, dtype=opts.dtype,
                                    lora=merged, quantize=opts.quantize)  # fmt: skip
            loaded = load_chat_model(chat_opts, home=home)
            workers = _engines_per_device(opts, loaded.device, _weight_bytes(loaded.model))
            for i in range(workers):
                if i > 0:
                    loaded = load_chat_model(chat_opts, home=home)
                bank = None
                if entries:
                    from nanoctl.model.lora_bank import mount_bank

                    bank = mount_bank(loaded.model, entries)  # after int8, if any: the adapters stay fp32
                sched = Scheduler(
                    loaded.model, loaded.tokenizer, max_batch=_rows(opts.max_batch, workers, i),
                    max_queue=opts.max_queue, prefill_chunk=opts.prefill_chunk,
                    name=loaded.device if workers == 1 else f"{loaded.device}/{i}",
                    on_step=lambda rows: metrics.decode_steps.inc(), bank=bank, kv_dtype=kv_dtype,
                )  # fmt: skip
                sched.start()
                schedulers.append(sched)
        assert loaded is not None
        backend = schedulers[0] if len(schedulers) == 1 else Router(schedulers)
        # The id clients see: stage/tag@step (+lora:...), the same label `nanoctl chat` shows.
        label = loaded.label
        state.set_ready(
            ServedModel(
                label, loaded.tokenizer, backend, loaded.completion_mode, loaded.context_len,
                rows_per_engine=min(s.max_batch for s in schedulers), engines=len(schedulers),
                kv_dtype=schedulers[0].kv_dtype,
                adapters={model_id: k for k, model_id in enumerate(adapters)},
            )
        )  # fmt: skip
        ready: Event = {"event": "ready", "url": url, "model": label, "devices": [s.name for s in schedulers]}
        if adapters:
            ready["adapters"] = list(adapters)
        say(ready)
    except NanoctlError as e:
        state.set_failed(e.message)
        server.should_exit = True
    except Exception as e:  # one line for the user; the CLI shows a traceback with NANOCTL_DEBUG=1
        state.set_failed(f"{type(e).__name__}: {e}")
        server.should_exit = True


AUTO_WORKERS_MAX_BYTES = 1 << 30  # --workers auto copies a model only up to this size of weights


def _weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _engines_per_device(opts: ServeOptions, device: str, weight_bytes: int = 0) -> int:
    """How many engines share `device`; on a CPU, also splits torch's threads between them.

    A CPU decode step at serving sizes is mostly small matrix products and per-op overhead, which a
    second intra-op thread barely speeds up (1 and 2 threads ran one engine at the same speed on a
    2-core box), while two single-threaded engines, each with half the rows, made 1.2-1.5x the tokens/s
    there (bench/serve_bench.py). Each engine holds its own copy of the model (and its decode-step
    copies), so auto stays at one engine for weights over 1 GiB (a d20 is 2.2 GB in fp32); --workers
    asks for more explicitly. A GPU runs one engine per device. The thread count is torch's
    process-wide setting, which the server owns (set before the engine threads start).
    """
    if not device.startswith("cpu"):
        return max(1, opts.workers)
    import torch

    threads = torch.get_num_threads()
    small = weight_bytes <= AUTO_WORKERS_MAX_BYTES
    workers = opts.workers or (2 if threads >= 2 and opts.max_batch >= 2 and small else 1)
    if workers > 1:
        torch.set_num_threads(max(1, threads // workers))
    return workers


def _rows(max_batch: int, engines: int, i: int) -> int:
    """Engine i's share of `max_batch` rows (the shares differ by one at most and sum to it)."""
    return max_batch // engines + (1 if i < max_batch % engines else 0)


def _devices(opts: ServeOptions) -> list[str]:
    """The device of each replica: one (--device), or cuda:0..N-1 for --gpus N."""
    if opts.gpus == 1:
        return [opts.device]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(
            f"--gpus {opts.gpus} needs CUDA devices; none is available here", "leave --gpus at 1"
        )
    if opts.gpus > count:
        raise UsageError(
            f"--gpus {opts.gpus}: only {count} CUDA device(s) are visible", f"use --gpus {count} or less"
        )
    return [f"cuda:{i}" for i in range(opts.gpus)]


def _resolve(opts: ServeOptions, home: Home) -> tuple[Any, dict[str, Any]]:
    """Which checkpoint, and the banked adapters (model id -> directory; empty: none, or one merged),
    found before the port is bound so a missing one or a bad --lora is a one-line error at once."""
    from nanoctl.adapters import resolve_base
    from nanoctl.serve.adapter_specs import adapter_ids, banked, check_one_base, parse_lora

    specs = parse_lora(opts.lora)
    first = specs[0].path if specs else None
    ref = resolve_base(first, opts.stage, opts.tag, opts.step, opts.checkpoint, home)
    if not banked(specs):
        return ref, {}
    if opts.checkpoint is None and opts.stage is None and opts.tag is None and opts.step is None:
        check_one_base(specs, ref)  # the base came from the first adapter's record
    return ref, dict(zip(adapter_ids(specs, ref.label), (s.path for s in specs), strict=True))


def _bank_entries(adapters: dict[str, Any]) -> list[Any]:
    """Each banked adapter's tensors, read once for every replica."""
    if not adapters:
        return []
    from nanoctl.model.lora import read_adapter
    from nanoctl.model.lora_bank import BankEntry

    return [BankEntry(model_id, *read_adapter(path)[:2]) for model_id, path in adapters.items()]


def _bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket (port 0 = any free one) and its URL; a port in use is one line naming it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} cannot be resolved: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted server take its port back from TIME_WAIT; on Linux two servers still cannot
        # listen on one port at once, so "in use" stays an error.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise NanoctlError(
                f"port {port} is already in use on {host}",
                "stop the other server, or pick another --port (0 = any free)",
            ) from None
        raise NanoctlError(
            f"cannot listen on {host}:{port}: {e.strerror}", "check --host and --port"
        ) from None
    sock.set_inheritable(True)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    return sock, f"http://{shown}:{bound_port}"


def _is_loopback(sock: socket.socket) -> bool:
    try:
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:
        return False


def _draining_server() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server that drains on the first signal instead of closing the socket at once."""

        def __init__(
            self, config: Any, state: ServerState, timeout: float, say: Callable[[Event], None]
        ) -> None:
            super().__init__(config)
            self.state = state
            self.drain_timeout = timeout
            self.say = say
            self.deadline: float | None = None
            self.announced = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not recorded in _captured_signals: uvicorn re-raises those after shutdown, which would
            # turn a clean drain into death by SIGTERM (exit 143). Only flags are set here (a signal
            # handler may interrupt a print); on_tick, on the event loop, does the rest.
            if self.deadline is not None:  # a second signal: stop waiting
                self.deadline = time.monotonic()
                return
            self.deadline = time.monotonic() + self.drain_timeout
            self.state.begin_drain()  # from now on new requests get 503

        async def on_tick(self, counter: int) -> bool:
            if self.deadline is not None and not self.announced:
                self.announced = True
                self.say(
                    {"event": "draining", "in_flight": self.state.in_flight, "timeout_s": self.drain_timeout}
                )
            if self.deadline is not None and not self.should_exit:
                if self.state.in_flight == 0:
                    self.should_exit = True
                elif time.monotonic() >= self.deadline:
                    self.state.cancel_all()  # the streams end with an error event within a decode step
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def _make_server(config: Any, state: ServerState, timeout: float, say: Callable[[Event], None]) -> Any:
    # The class is built on first use so that importing this module does not import uvicorn.
    return _draining_server()(config, state, timeout, say)
