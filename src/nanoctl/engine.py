"""Inference engine: KV-cached batched sampling with calculator tool use, streaming token columns.

As nanochat's Engine: one batch-1 prefill of the prompt, the cache copied into `num_samples` rows
(`KVCache.prefill`), then a decode loop that yields one column of tokens (one per row) per step with a
mask per token (1 = sampled, 0 = forced by the tool). A row finishes on `<|assistant_end|>` or `<|bos|>`.

Beyond nanochat:
- top-p (nucleus) and a repetition penalty (CTRL/HF-style: divide positive logits, multiply negative);
- per-row seeding: row i draws from its own `torch.Generator` seeded `seed + i`, so row i of a batched
  run equals a one-row run with seed `seed + i` (and every row's first token is its own draw);
- generation never runs past the model's context: it stops when the preallocated cache is full;
- the calculator is the thread-safe AST evaluator in tools/calculator.py; its errors are forced back
  as `<|output_start|>error: ...<|output_end|>` so the model sees them.

How to sample is one `SamplingParams` (temperature, top-k, top-p, repetition penalty, max new tokens,
seed) with one set of defaults, nanochat's chat ones; the chat CLI, the TUI, the evals and the benches
all pass it through. torch is imported lazily so the CLI can read those defaults without loading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nanoctl.errors import UsageError
from nanoctl.tools.calculator import use_calculator

if TYPE_CHECKING:
    import torch

    from nanoctl.model.gpt import GPT


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, validated; the one set of defaults (nanochat's chat: T 0.6, top-k 50, 512 tokens).

    Used from `nanoctl chat` (CLI, TUI, --plain) through chat.py to `Engine.generate`, and by every other
    engine caller; greedy is `SamplingParams(temperature=0.0)`. Frozen: change a field with
    `dataclasses.replace` (which validates again).
    """

    temperature: float = 0.6  # 0 = greedy (argmax)
    top_k: int | None = 50  # None or 0 = the full vocabulary
    top_p: float | None = None  # None or 1.0 = no nucleus filtering (1.0 is stored as None)
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in the row
    max_tokens: int | None = 512  # most new tokens per row; None = until the context is full
    seed: int = 42  # row i of a batch samples from its own generator seeded seed + i

    def __post_init__(self) -> None:
        if self.top_p == 1.0:
            object.__setattr__(self, "top_p", None)
        if not self.temperature >= 0.0:
            raise UsageError(f"temperature {self.temperature} must be >= 0", "0 means greedy decoding")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"top-k {self.top_k} must be >= 0", "0 means no top-k filtering")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top-p {self.top_p} must be in (0, 1]", "1 means no nucleus filtering")
        if not self.repetition_penalty > 0.0:
            raise UsageError(f"repetition penalty {self.repetition_penalty} must be > 0", "1 means off")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"max tokens {self.max_tokens} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_next_token(
    logits: torch.Tensor,
    generators: list[torch.Generator] | None,
    params: SamplingParams,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample one token per row of fp32 `logits` (B, V); returns (B,) int64.

    Uses inverse-CDF sampling with one uniform per row from that row's generator, so each row's draw
    depends only on its own logits and generator (batched == separate runs). `transform`, when given, is
    a monotonic map (the model's softcap) still to be applied: argmax and top-k are taken before it, so
    only the kept values are transformed.
    """
    import torch

    if params.greedy:
        from nanoctl.model.kernels import argmax_rows

        return argmax_rows(logits)
    assert generators is not None and len(generators) == logits.size(0)
    vocab = logits.size(-1)
    top_k = params.top_k if params.top_k and params.top_k < vocab else None
    nucleus = params.top_p is not None and params.top_p < 1.0
    idx: torch.Tensor | None = None
    if top_k is not None:
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    elif nucleus:
        logits, idx = torch.sort(logits, dim=-1, descending=True)
    if transform is not None:
        logits = transform(logits.clone() if idx is None else logits)
    # Temperature after top-k/sort: same ranking, and k values to scale instead of the whole vocab.
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if nucleus:
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        cum = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cum - probs >= params.top_p, 0.0)  # type: ignore[operator]
    cdf = probs.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators]).unsqueeze(1)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)
    if idx is not None:
        choice = idx.gather(1, choice)
    return choice.squeeze(1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in each row (`seen` is a (B, V) bool mask)."""
    import torch

    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_logits(
    raw: torch.Tensor,
    generators: list[torch.Generator] | None,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens (B,) from the model's pre-softcap logits (B, V): softcap, repetition penalty, filters, draw.

    The one sampling step of every decoder (Engine.generate and the serving scheduler). The softcap is
    monotonic: greedy and top-k cap only what they keep (see sample_next_token); the full-vocabulary cap
    runs only when the repetition penalty or top-p needs every value.
    """
    from nanoctl.model.gpt import apply_softcap

    full_cap = params.repetition_penalty != 1.0 or (
        not params.greedy and not params.top_k and params.top_p is not None and params.top_p < 1.0
    )
    logits = apply_softcap(raw.clone()) if full_cap else raw
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    transform = None if params.greedy or full_cap else apply_softcap
    return sample_next_token(logits, generators, params, transform)


def row_generators(params: SamplingParams, n: int, device: torch.device) -> list[torch.Generator] | None:
    """Row i's generator is seeded `params.seed + i` (None when greedy: nothing is drawn)."""
    import torch

    if params.greedy:
        return None
    out = []
    for i in range(n):
        g = torch.Generator(device=device)
        g.manual_seed(params.seed + i)
        out.append(g)
    return out


@contextlib.contextmanager
def last_position_logits(model: torch.nn.Module) -> Iterator[None]:
    """During a prefill only the last position's logits are used: feed lm_head just that position.

    GPT.forward has no `logits_to_keep` argument, and a 2048-token prompt would otherwise compute
    (and softcap) a 2048 x vocab fp32 tensor only to keep its last row. A GPT slices its final hidden
    state itself while `last_position_only` is set (so a CPU prefill's head takes the decode head's
    fast layout); any other module gets a pre-hook on lm_head that slices its input, removed as soon
    as the prefill returns.
    """
    if hasattr(model, "last_position_only"):  # GPT: it slices before its (CPU decode-step) head
        model.last_position_only = True
        try:
            yield
        finally:
            model.last_position_only = False
        return
    head = getattr(model, "lm_head", None)
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][:, -1:, :],))
    try:
        yield
    finally:
        handle.remove()


@dataclass
class RowState:
    """Per-row decoding state: forced tool-output tokens and the open python block, if any."""

    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    completed: bool = False


class Engine:
    """Drives a GPT's cached forward for sampling. Knows token ids only (plus the tool's specials)."""

    def __init__(self, model: GPT, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()
        self.stop_tokens = frozenset({self.assistant_end, self.bos})
        # Pre-softcap logits (B, V) of the last yielded column; `last_logits` caps them on demand.
        self._last_raw: torch.Tensor | None = None

    @property
    def last_logits(self) -> torch.Tensor | None:
        """Logits (B, V) the last yielded column was sampled from: lets tests compare cached decode with
        a full recompute, and callers inspect the distribution. Not part of the sampling path."""
        from nanoctl.model.gpt import apply_softcap

        return None if self._last_raw is None else apply_softcap(self._last_raw.clone())

    @property
    def context_len(self) -> int:
        return int(self.model.config.sequence_len)

    def max_new_tokens(self, prompt_len: int) -> int:
        """How many tokens can still be generated after a prompt this long (cache = context)."""
        # The last sampled token is never fed back, so a full context yields one more token.
        return max(0, self.context_len - prompt_len + 1)

    def _tool_output(self, expr_tokens: list[int]) -> list[int]:
        expr = self.tokenizer.decode(expr_tokens)
        result = use_calculator(expr)
        return [self.output_start, *self.tokenizer.encode(result), self.output_end]

    def next_token(self, row: RowState, sampled: int) -> tuple[int, bool]:
        """The row's next token and whether it was forced (a queued tool output wins over the sample);
        runs the calculator state machine: collect the expression, then queue the forced result."""
        forced = bool(row.forced)
        token = row.forced.popleft() if forced else sampled
        if token in self.stop_tokens:
            row.completed = True
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            if row.python_tokens:
                row.forced.extend(self._tool_output(row.python_tokens))
            row.python_tokens = []
        elif row.in_python:
            row.python_tokens.append(token)
        return token, forced

    def generate(
        self,
        tokens: list[int],
        params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        **overrides: Any,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield `(token_column, token_masks)` per step: one token per row, mask 1 sampled / 0 forced.

        `params` defaults to `SamplingParams()`. Stops when every row has emitted a stop token, after
        `params.max_tokens` columns, or when the context is full. Rows that finished keep receiving
        (meaningless) tokens until all are done, as nanochat. The prompt and params are checked here,
        before the first column is asked for.

        `overrides` (SamplingParams field names: `max_tokens=`, `temperature=`, ...) replace fields of
        `params`; transitional, for callers not yet passing a SamplingParams (train/rl.py).
        """
        import torch

        params = params if params is not None else SamplingParams()
        if overrides:
            params = dataclasses.replace(params, **overrides)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise UsageError("the prompt must be a non-empty list of token ids")
        if num_samples < 1:
            raise UsageError(f"num_samples {num_samples} must be >= 1")
        prompt_len = len(tokens)
        if prompt_len > self.context_len:
            raise UsageError(
                f"prompt of {prompt_len} tokens does not fit the model's {self.context_len}-token context",
                "shorten it (chat drops the oldest turns automatically)",
            )
        limit = self.max_new_tokens(prompt_len)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        # inference_mode wraps a generator function per step (it is not held across the yields).
        return torch.inference_mode()(self._generate)(tokens, params, num_samples, limit)

    def _generate(
        self, tokens: list[int], params: SamplingParams, num_samples: int, limit: int
    ) -> Iterator[tuple[list[int], list[int]]]:
        import torch

        if limit == 0:
            return
        prompt_len = len(tokens)
        model = self.model
        device = model.get_device()
        # Positions ever written: the prompt plus every generated token but the last.
        cache_len = prompt_len + limit - 1
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        if num_samples == 1:
            cache = model.new_kv_cache(1, cache_len)
            with last_position_logits(model):
                logits = model(ids, kv_cache=cache, softcap=False)[:, -1, :]
        else:
            # One batch-1 prefill shared by all rows: the prompt is processed once, then copied.
            prefill = model.new_kv_cache(1, prompt_len)
            with last_position_logits(model):
                logits = model(ids, kv_cache=prefill, softcap=False)[:, -1, :].expand(num_samples, -1)
            cache = model.new_kv_cache(num_samples, cache_len)
            cache.prefill(prefill)
            del prefill

        generators = row_generators(params, num_samples, device)
        seen: torch.Tensor | None = None
        rows_index = torch.arange(num_samples, device=device)
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(num_samples, logits.size(-1), dtype=torch.bool, device=device)
            seen[:, torch.tensor(tokens, device=device)] = True

        rows = [RowState() for _ in range(num_samples)]
        for step in range(limit):
            if step > 0:
                logits = model(ids, kv_cache=cache, softcap=False)[:, -1, :]
            sampled = sample_logits(logits, generators, params, seen).tolist()
            column: list[int] = []
            masks: list[int] = []
            for i, row in enumerate(rows):
                token, forced = self.next_token(row, sampled[i])
                column.append(token)
                masks.append(0 if forced else 1)
            self._last_raw = logits
            yield column, masks
            if all(row.completed for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            if seen is not None:
                seen[rows_index, ids.squeeze(1)] = True

    def generate_batch(
        self,
        tokens: list[int],
        params: SamplingParams | None = None,
        *,
        num_samples: int = 1,
        **overrides: Any,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming: `(results, masks)` per row, each the prompt followed by the generated tokens
        (terminal tokens excluded), as nanochat; prompt positions have mask 0."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, column_masks in self.generate(tokens, params, num_samples=num_samples, **overrides):
            for i, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if completed[i]:
                    continue
                if token in self.stop_tokens:
                    completed[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return results, masks
