"""The GPT model: nanochat's architecture (HEAD, July 2026) plus the "classic" Oct-2025 preset.

arch="current" (nanochat HEAD):
- RoPE (half-split, base 100k), QK-norm (parameter-free RMSNorm after RoPE) then q, k x1.2
- parameter-free RMSNorm: after the embedding, before each sublayer, before lm_head
- ReLU^2 MLP (4x), no biases, untied wte/lm_head, vocab padded to a multiple of 64 (logits cropped)
- GQA (n_kv_head), logit softcap 15 in fp32
- sliding windows: pattern tiled over layers, S = ceil(seq/4 to a multiple of 128), last layer full
- value embeddings (ResFormer) on alternating layers (last included), gate 3*sigmoid(W x[:, :12])
- resid_lambdas / x0_lambdas before every block, smear (previous-token mixing) and backout
arch="classic" (nanochat's first release == HF transformers NanoChatForCausalLM): same trunk without
windows, value embeddings, scalars, smear, backout and the 1.2 QK scale; RoPE base 10k.
arch="deepseek": the classic trunk with Multi-head Latent Attention (model/mla.py) and DeepSeekMoE
(model/moe.py) after the first dense layer(s); its config rules and counts live in model/deepseek.py.

Module and parameter names follow nanochat so its checkpoints load as they are. Construction is meant
to happen on the meta device (`build_model`): `__init__` allocates shapes only; `init_weights` fills them.

This file holds the architecture and its config. Next to it: model/attention.py (attention backend
selection and kernels), model/kernels.py (fused CPU eager paths: head+softcap+loss, MLP, decode head),
model/kv_cache.py (KVCache); HF transformers conversion lives in nanoctl/export/hf.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoctl.errors import UsageError
from nanoctl.model import attention
from nanoctl.model.kernels import FEW_ROWS, FewRowsMatmul, linear_relu_square, softcap_cross_entropy
from nanoctl.model.kv_cache import KVCache, RaggedView, SlotKVCache

log = logging.getLogger(__name__)

ARCHS = ("current", "classic", "deepseek")
SOFTCAP = 15.0
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input
SMEAR_GATE_CHANNELS = 24  # smear gate reads the first 24 channels of the normalized embedding
QK_SCALE = 1.2  # HEAD sharpens attention by scaling q and k after QK-norm
ROPE_BASE = {"current": 100_000.0, "classic": 10_000.0, "deepseek": 10_000.0}


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    # Tiled over layers; L = full context, S = short window (ceil(seq/4) rounded up to 128). Last layer is L.
    window_pattern: str = "SSSL"
    arch: str = "current"  # "current" (nanochat HEAD) | "classic" (Oct 2025 == HF NanoChat) | "deepseek"
    # arch="deepseek" only (model/deepseek.py); 0 = derived from the shape when the config is built.
    n_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 1  # always-on experts (one fused MLP of n_shared x moe_intermediate_size)
    moe_intermediate_size: int = 0  # hidden size of one expert (0: 4*n_embd/(top_k+shared), to 32)
    n_dense_layers: int = 1  # the first layers keep the dense MLP
    kv_lora_rank: int = 0  # MLA latent size (0: n_embd/4)
    q_lora_rank: int = 0  # query bottleneck; 0 = none (a full-rank query projection)
    qk_rope_head_dim: int = 0  # decoupled RoPE part of q/k per head (0: head_dim/2)
    qk_nope_head_dim: int = 0  # position-free part of q/k per head (0: head_dim)
    v_head_dim: int = 0  # (0: head_dim)
    mtp_depth: int = 0  # multi-token prediction modules (0 or 1)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step per optimizer step (0 = off)

    def __post_init__(self) -> None:
        self.window_pattern = self.window_pattern.upper()
        if self.arch in ("classic", "deepseek"):
            # Classic nanochat had no sliding windows; record that so configs round-trip honestly.
            self.window_pattern = "L"
        if self.arch == "deepseek":
            from nanoctl.model.deepseek import resolve_config

            resolve_config(self)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"model arch {self.arch!r} is unknown", f"use one of: {', '.join(ARCHS)}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"model config {name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise UsageError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                "pick a width that is a multiple of the head count (or change --head-dim/--aspect-ratio)",
            )
        if self.n_head % self.n_kv_head:
            raise UsageError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}",
                "GQA needs each key/value head to serve a whole number of query heads",
            )
        if self.head_dim % 2:
            raise UsageError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.window_pattern or any(c not in "SL" for c in self.window_pattern):
            raise UsageError(
                f"window_pattern {self.window_pattern!r} may only contain S and L", "for example SSSL or L"
            )
        if self.arch == "current" and self.n_embd < SMEAR_GATE_CHANNELS:
            raise UsageError(f"n_embd={self.n_embd} is too small: the current arch needs n_embd >= 24")
        if self.arch == "deepseek":
            from nanoctl.model.deepseek import validate_config

            validate_config(self)

    @property
    def rotary_dim(self) -> int:
        """Channels RoPE rotates per head: the whole head, or MLA's decoupled rope part."""
        return self.qk_rope_head_dim if self.arch == "deepseek" else self.head_dim

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.arch != "deepseek":  # dense configs (and their resume keys) stay as they always were
            from nanoctl.model.deepseek import DEEPSEEK_FIELDS

            data = {k: v for k, v in data.items() if k not in DEEPSEEK_FIELDS}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a nanochat/nanoctl `model_config` dict; unknown keys are ignored (forks add some)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def config_for_depth(
    depth: int,
    vocab_size: int,
    max_seq_len: int,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    window_pattern: str = "SSSL",
    arch: str = "current",
    **variant: Any,
) -> GPTConfig:
    """nanochat's depth -> shape rule.

    current (and deepseek): dim = ceil(depth*aspect/head_dim)*head_dim so head_dim is always exact;
    heads = dim/head_dim. classic: dim = depth*aspect; heads = ceil(dim/head_dim) (head size then
    dim/heads, which must divide). `variant`: further GPTConfig fields (the deepseek ones).
    """
    if depth < 1:
        raise UsageError(f"--depth {depth} must be >= 1")
    if aspect_ratio < 1 or head_dim < 1:
        raise UsageError(f"--aspect-ratio {aspect_ratio} and --head-dim {head_dim} must be >= 1")
    if arch == "classic":
        model_dim = depth * aspect_ratio
        num_heads = max(1, -(-model_dim // head_dim))
        if model_dim % num_heads:
            raise UsageError(
                f"classic arch: depth {depth} gives width {model_dim}, not divisible into {num_heads} heads",
                "pick a depth whose width divides evenly (e.g. an even depth) or use the current arch",
            )
        window_pattern = "L"
    else:
        model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
        num_heads = model_dim // head_dim
    return GPTConfig(
        sequence_len=max_seq_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=num_heads,
        n_kv_head=num_heads,
        n_embd=model_dim,
        window_pattern=window_pattern,
        arch=arch,
        **variant,
    )


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embedding on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config: GPTConfig) -> list[int]:
    """Left window per layer (keys at distance <= window are visible); -1 = unlimited (classic)."""
    if config.arch == "classic":
        return [-1] * config.n_layer
    long_window = config.sequence_len
    short_window = -(-long_window // 4 // 128) * 128  # ceil to the FA3 tile size: 2048 -> 512
    pattern = config.window_pattern
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window
    return sizes


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def apply_softcap(logits: torch.Tensor) -> torch.Tensor:
    """SOFTCAP * tanh(logits / SOFTCAP); in place when no gradient is being recorded."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return SOFTCAP * torch.tanh(logits / SOFTCAP)
    return logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)


def norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm (eps = finfo(dtype).eps, as nanochat).
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on (B, T, H, D); rotates by -theta like nanochat (same as HF NanoChat)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class Linear(nn.Linear):
    """nn.Linear that casts its (fp32 master) weight to the activation dtype: replaces autocast.

    CPU inference on a few rows (decode steps) goes through `kernels.FewRowsMatmul`, which keeps
    the fastest of MKL's layouts and the native packed kernel (up to 2-4x F.linear at 4-8 rows on one
    thread); its copies of the weight are dropped after every optimizer step (GPT.after_optimizer_step).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.few_rows = FewRowsMatmul()

    def takes_few_rows(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu" and self.bias is None and not torch.is_grad_enabled()
            and 0 < x.numel() <= FEW_ROWS * x.size(-1) and not torch.compiler.is_compiling()
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_few_rows(x):
            return self.few_rows(x, self.weight)
        return F.linear(x, self.weight.to(dtype=x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        qk_scale = QK_SCALE if config.arch == "current" else 1.0
        # (q * s) . (k * s) = s^2 (q . k): HEAD's QK sharpening goes into the softmax scale instead of two
        # elementwise passes (and their backward) over q and k.
        self.softmax_scale = qk_scale**2 / math.sqrt(self.head_dim)
        n_embd = config.n_embd
        self.c_q = Linear(n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(n_embd, n_embd, bias=False)
        use_ve = config.arch == "current" and has_ve(layer_idx, config.n_layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if use_ve else None

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        window: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual with an input-dependent per-head gate in (0, 3).
            assert self.ve_gate is not None
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)

        if kv_cache is None:
            # FA3/FA2, FlexAttention (windowed layers, compiled) or SDPA: see model/attention.py
            y = attention.full_attention(q, k, v, window, self.softmax_scale)
        elif getattr(kv_cache, "ragged", False):
            y = self._attend_ragged(q, k, v, window, kv_cache)  # type: ignore[arg-type]
        else:
            y = self._attend_cached(q, k, v, window, kv_cache)
        return self.c_proj(y.contiguous().view(B, T, -1))

    def _attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, kv_cache: KVCache
    ) -> torch.Tensor:
        """Write this chunk's K/V at get_pos(), attend over the visible cached prefix (windows respected)."""
        T = q.size(1)
        pos = kv_cache.get_pos()
        end = pos + T
        if end > kv_cache.seq_len:
            raise ValueError(f"KV cache holds {kv_cache.seq_len} positions; this step needs {end}")
        k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
        k_cache[:, pos:end] = k
        v_cache[:, pos:end] = v
        # Only keys within the window of the first query in this chunk can matter.
        start = max(0, pos - window) if window >= 0 else 0
        keys = k_cache[:, start:end].transpose(1, 2).to(q.dtype)  # a narrower cache widens here
        values = v_cache[:, start:end].transpose(1, 2).to(q.dtype)
        y = attention.sdpa(q.transpose(1, 2), keys, values, window, pos, start, self.softmax_scale)
        return y.transpose(1, 2)

    def _attend_ragged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, view: RaggedView
    ) -> torch.Tensor:
        """Continuous batching: one new token per row, each row at its own position (SlotKVCache)."""
        k_cache, v_cache = view.get_layer_cache(self.layer_idx)
        k_cache[view.index, view.positions] = k[:, 0].to(k_cache.dtype)
        v_cache[view.index, view.positions] = v[:, 0].to(v_cache.dtype)
        return view.attend(q, k_cache, v_cache, window, self.softmax_scale)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, hidden, bias=False)
        self.c_proj = Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_fc.takes_few_rows(x):  # a CPU decode step: relu^2 in place on the fresh product
            return self.c_proj(self.c_fc(x).relu_().square_())
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return self.c_proj(linear_relu_square(x, self.c_fc.weight))  # fused CPU eager path
        return self.c_proj(F.relu(self.c_fc(x)).square())  # compiled (CUDA): inductor fuses this itself


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        if config.arch == "deepseek":
            from nanoctl.model.deepseek import deepseek_sublayers

            self.attn, self.mlp = deepseek_sublayers(config, layer_idx)
            return
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        window: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos_sin, window, kv_cache)
        return x + self.mlp(norm(x))


# ----------------------------------------------------------------------------------------------------------
# The model


def embedding_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # Embeddings live in the compute dtype (memory); fp16 keeps them fp32 because GradScaler cannot unscale
    # fp16 gradients.
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


def _embedding(num: int, dim: int, dtype: torch.dtype) -> nn.Embedding:
    # Hand over an uninitialized table: nn.Embedding's own N(0, 1) init is wasted work (init_weights
    # overwrites it) and is very slow on the meta device (seconds per table at d12).
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim, dtype=dtype))


class GPT(nn.Module):
    def __init__(
        self, config: GPTConfig, dtype: torch.dtype | None = None, pad_vocab_size_to: int = 64
    ) -> None:
        """Allocate shapes only: this usually runs under torch.device("meta"); init_weights() fills data."""
        super().__init__()
        self.config = config
        self.compute_dtype = dtype or torch.float32
        self.window_sizes = window_sizes(config)
        current = config.arch == "current"
        padded_vocab = -(-config.vocab_size // pad_vocab_size_to) * pad_vocab_size_to
        self.padded_vocab_size = padded_vocab
        emb_dtype = embedding_dtype(self.compute_dtype)
        self.transformer = nn.ModuleDict(
            {
                "wte": _embedding(padded_vocab, config.n_embd, emb_dtype),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = Linear(config.n_embd, padded_vocab, bias=False)
        # Set while a prefill needs only its last position's logits (engine.last_position_logits): the
        # head then runs on that one position (on a CPU, through the few-rows path).
        self.last_position_only = False
        kv_dim = config.n_kv_head * config.head_dim
        if current:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
            self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            self.backout_lambda = nn.Parameter(torch.zeros(1))
            self.value_embeds = nn.ModuleDict(
                {
                    str(i): _embedding(padded_vocab, kv_dim, emb_dtype)
                    for i in range(config.n_layer)
                    if has_ve(i, config.n_layer)
                }
            )
        # DeepSeek's multi-token prediction module(s) (training only; model/deepseek.py).
        self.mtp: nn.Module | None = None
        if config.arch == "deepseek" and config.mtp_depth:
            from nanoctl.model.deepseek import MTPModule

            self.mtp = MTPModule(config)
        # Rotary tables for 10x the training length (generation may run past it); not saved.
        self.rotary_seq_len = config.sequence_len * 10
        # Placeholders with the right shape/dtype (math on the meta device is slow); init_rotary fills them.
        shape = (1, self.rotary_seq_len, 1, config.rotary_dim // 2)
        self.register_buffer("cos", torch.empty(shape, dtype=self.compute_dtype), persistent=False)
        self.register_buffer("sin", torch.empty(shape, dtype=self.compute_dtype), persistent=False)

    @property
    def is_current(self) -> bool:
        return self.config.arch == "current"

    # -- init ------------------------------------------------------------------------------------------

    def _rotary_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.rotary_dim
        base = ROPE_BASE[self.config.arch]
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(self.compute_dtype), freqs.sin().to(self.compute_dtype)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2) broadcasts over B and H

    @torch.no_grad()
    def init_rotary(self) -> None:
        """(Re)compute the rotary buffers on the model's device (after to_empty or a meta-device load)."""
        self.cos, self.sin = self._rotary_tables(self.get_device())

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init, all in one place.

        current: wte N(0, 0.8); lm_head N(0, 0.001); c_q/c_k/c_v U(+-s), s = sqrt(3/n_embd); c_fc U(+-0.4 s);
          both c_proj zero; value embeds U(+-s); ve_gate and smear_gate U(0, 0.02); smear_lambda 0;
          backout_lambda 0.2; resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05 linearly over layers.
        classic: Linear N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))); lm_head and c_proj zero;
          wte N(0, 1).
        """
        cfg = self.config
        if cfg.arch == "deepseek":
            from nanoctl.model.deepseek import init_deepseek_weights

            init_deepseek_weights(self)
        elif self.is_current:
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
            s = 3**0.5 * cfg.n_embd**-0.5  # uniform with the std of N(0, 1/n_embd), without outliers
            for block in self.transformer.h:
                nn.init.uniform_(block.attn.c_q.weight, -s, s)
                nn.init.uniform_(block.attn.c_k.weight, -s, s)
                nn.init.uniform_(block.attn.c_v.weight, -s, s)
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
                nn.init.zeros_(block.mlp.c_proj.weight)
                if block.attn.ve_gate is not None:
                    nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
            n = cfg.n_layer
            for i in range(n):
                frac = i / max(n - 1, 1)
                self.resid_lambdas[i] = 1.15 - 0.10 * frac
                self.x0_lambdas[i] = 0.20 - 0.15 * frac
            for ve in self.value_embeds.values():
                nn.init.uniform_(ve.weight, -s, s)
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.fill_(0.0)
            self.backout_lambda.fill_(0.2)
        else:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    fan_out, fan_in = module.weight.shape
                    std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                    nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.lm_head.weight)
            for block in self.transformer.h:
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_rotary()

    # -- info ------------------------------------------------------------------------------------------

    def prepare_flex_attention(self, seq_len: int) -> bool:
        """Build the sliding-window block masks FlexAttention uses under torch.compile on CUDA.

        Call before compiling. Returns False (SDPA stays in use) off CUDA, with flash kernels available,
        under NANOCTL_ATTENTION=sdpa, or when this torch lacks FlexAttention.
        """
        return attention.prepare_flex_masks(self.get_device(), self.compute_dtype, self.window_sizes, seq_len)

    def attention_summary(self, seq_len: int, flex: bool) -> str:
        """One line for the run banner: which kernel the training forward uses for attention."""
        return attention.attention_summary(
            self.get_device(), self.compute_dtype, self.window_sizes, seq_len, flex
        )

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def scalar_params(self) -> list[nn.Parameter]:
        if not self.is_current:
            return []
        return [
            self.resid_lambdas,
            self.x0_lambdas,
            self.smear_gate.weight,
            self.smear_lambda,
            self.backout_lambda,
        ]

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group; scaling params (for Chinchilla-style ratios) = matrices + lm_head."""
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters()) if self.is_current else 0
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.matrix_params())
        scalars = sum(p.numel() for p in self.scalar_params())
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        assert total == sum(p.numel() for p in self.parameters()), "a parameter is missing from the groups"
        if self.config.arch == "deepseek":
            from nanoctl.model.deepseek import count_params

            return count_params(self, wte, lm_head, transformer_matrices, total)
        return {
            "wte": wte,
            "value_embeds": value_embeds,
            "lm_head": lm_head,
            "transformer_matrices": transformer_matrices,
            "scalars": scalars,
            "total": total,
            "scaling": transformer_matrices + lm_head,
        }

    def matrix_params(self) -> list[nn.Parameter]:
        """The blocks' matrices (Muon), MTP's included; expert weights are (E, out, in) stacks."""
        mtp = list(self.mtp.parameters()) if self.mtp is not None else []
        return list(self.transformer.h.parameters()) + mtp

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight + 12*H*hd*min(window, T) per layer for attention."""
        if self.config.arch == "deepseek":
            from nanoctl.model.deepseek import estimate_flops

            return estimate_flops(self)
        counts = self.num_scaling_params()
        matmul_params = counts["transformer_matrices"] + counts["lm_head"]
        cfg = self.config
        t = cfg.sequence_len
        attn = sum(12 * cfg.n_head * cfg.head_dim * (t if w < 0 else min(w, t)) for w in self.window_sizes)
        return float(6 * matmul_params + attn)

    def kv_layout(self) -> tuple[int, int, int]:
        """(cached heads, key dim, value dim) per layer. MLA caches one latent+rope-key "head" and no V."""
        cfg = self.config
        if cfg.arch == "deepseek":
            return 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 0
        return cfg.n_kv_head, cfg.head_dim, cfg.head_dim

    def kv_bytes_per_token(self, itemsize: int | None = None) -> int:
        """KV-cache bytes one token occupies over all layers, at `itemsize` bytes (default: compute dtype)."""
        heads, k_dim, v_dim = self.kv_layout()
        itemsize = itemsize or torch.empty((), dtype=self.compute_dtype).element_size()
        return self.config.n_layer * heads * (k_dim + v_dim) * itemsize

    def new_kv_cache(self, batch_size: int, seq_len: int) -> KVCache:
        cfg = self.config
        heads, k_dim, v_dim = self.kv_layout()
        return KVCache(
            batch_size=batch_size,
            num_kv_heads=heads,
            seq_len=seq_len,
            head_dim=k_dim,
            num_layers=cfg.n_layer,
            device=self.get_device(),
            dtype=self.compute_dtype,
            v_head_dim=v_dim,
        )

    def new_slot_cache(
        self, slots: int, seq_len: int | None = None, kv_dtype: torch.dtype | None = None
    ) -> SlotKVCache:
        """A continuous-batching cache: `slots` rows of up to `seq_len` (default: the context) each, K/V
        stored in `kv_dtype` (default: the compute dtype)."""
        cfg = self.config
        heads, k_dim, v_dim = self.kv_layout()
        return SlotKVCache(
            slots=slots,
            num_kv_heads=heads,
            seq_len=seq_len or cfg.sequence_len,
            head_dim=k_dim,
            num_layers=cfg.n_layer,
            n_embd=cfg.n_embd,
            device=self.get_device(),
            dtype=self.compute_dtype,
            v_head_dim=v_dim,
            kv_dtype=kv_dtype,
        )

    def after_optimizer_step(self) -> None:
        """Called by the training framework after every optimizer step: the decode-step copies of the
        head and linear weights go (the optimizer's writes through `.data` do not show in a weight's
        version), and DeepSeekMoE's bias balancing."""
        for module in self.modules():
            few_rows = getattr(module, "few_rows", None)  # gpt.Linear, lm_head included (LoRALinear runs F.linear)
            if few_rows is not None:
                few_rows.invalidate()
        if self.config.arch == "deepseek":
            from nanoctl.model.deepseek import update_routing_biases

            update_routing_biases(self)

    # -- optimizer -------------------------------------------------------------------------------------

    def setup_optimizer(
        self,
        unembedding_lr: float = 0.008,
        embedding_lr: float = 0.3,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        scalar_lr: float = 0.5,
        adam_betas: tuple[float, float] | None = None,
        momentum: float = 0.95,
    ) -> Any:
        """nanochat HEAD's param groups on one MuonAdamW (AdamW LRs scaled by (n_embd/768)^-0.5).

        `weight_decay` is Muon's (cautious) decay; the AdamW groups use nanochat's fixed per-group decay.
        `adam_betas`, when given, replaces the betas of every AdamW group. Each group records `initial_lr`.
        """
        from nanoctl.optim import MuonAdamW

        scale = (self.config.n_embd / 768) ** -0.5
        log.info("AdamW LR scale (n_embd/768)^-0.5 = %.6f", scale)
        matrix_params = self.matrix_params()
        adam_specs: list[tuple[str, list[nn.Parameter], float, tuple[float, float], float]] = [
            ("lm_head", list(self.lm_head.parameters()), unembedding_lr * scale, (0.8, 0.96), 0.01),
            ("wte", list(self.transformer.wte.parameters()), embedding_lr * scale, (0.8, 0.995), 0.001),
        ]
        if self.is_current:
            adam_specs += [
                (
                    "value_embeds",
                    list(self.value_embeds.parameters()),
                    0.5 * embedding_lr * scale,
                    (0.8, 0.995),
                    0.01,
                ),
                ("resid_lambdas", [self.resid_lambdas], 0.01 * scalar_lr, (0.8, 0.95), 0.05),
                ("x0_lambdas", [self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
                (
                    "smear",
                    [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
                    0.2,
                    (0.8, 0.95),
                    0.0,
                ),
            ]
        groups: list[dict[str, Any]] = []
        for name, params, lr, betas, wd in adam_specs:
            if params:
                groups.append(
                    dict(
                        kind="adamw",
                        name=name,
                        params=params,
                        lr=lr,
                        betas=adam_betas or betas,
                        eps=1e-10,
                        weight_decay=wd,
                    )
                )
        for shape in sorted({tuple(p.shape) for p in matrix_params}):
            groups.append(
                dict(
                    kind="muon",
                    name=f"muon_{'x'.join(map(str, shape))}",
                    params=[p for p in matrix_params if tuple(p.shape) == shape],
                    lr=matrix_lr,
                    momentum=momentum,
                    ns_steps=5,
                    beta2=0.9,
                    weight_decay=weight_decay,
                )
            )
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters()))
        optimizer = MuonAdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # -- forward ---------------------------------------------------------------------------------------

    def _smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """x[t] += lambda * sigmoid(W x[t][:24]) * x[t-1] (bigram-like early fusion)."""
        lam = self.smear_lambda.to(x.dtype)
        prev = None if kv_cache is None else kv_cache.prev_embedding
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:, :].clone()  # a copy, so the chunk's activations can be freed
        if prev is None:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        # Cached decode / chunked prefill: the token before this chunk comes from the cache.
        shifted = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        return x + gate * shifted

    def _fused_loss(self, x: torch.Tensor, reduction: str) -> bool:
        """Chunked fused head+loss on CPU (eager); CUDA leaves it to torch.compile / the plain path."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        return reduction in ("mean", "sum") or not torch.is_grad_enabled()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        softcap: bool = True,
    ) -> torch.Tensor:
        """Loss (targets given; ignore_index=-1) or fp32 logits (B, T, vocab_size).

        `softcap=False` returns the logits before the (monotonic) softcap: a sampler that keeps only the
        top k or the argmax can cap just those (`apply_softcap`) instead of the whole vocabulary.
        """
        B, T = idx.size()
        if getattr(kv_cache, "ragged", False):
            # Continuous-batching decode: one token per row, each at its own position.
            view: RaggedView = kv_cache  # type: ignore[assignment]
            if T != 1 or view.max_len > self.cos.size(1):
                raise ValueError(f"ragged decode takes one token per row within {self.cos.size(1)} positions")
            cos_sin = self.cos[0, view.positions].unsqueeze(1), self.sin[0, view.positions].unsqueeze(1)
        else:
            T0 = 0 if kv_cache is None else kv_cache.get_pos()
            if T0 + T > self.cos.size(1):
                raise ValueError(f"position {T0 + T} is past the rotary table ({self.cos.size(1)} positions)")
            cos_sin = self.cos[:, T0 : T0 + T], self.sin[:, T0 : T0 + T]

        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        current = self.is_current
        if current:
            x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            ve = None
            if current:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                key = str(i)
                if key in self.value_embeds:
                    ve = self.value_embeds[key](idx).to(x.dtype)
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if current and i == backout_layer:
                x_backout = x
        if x_backout is not None:
            # Remove part of the mid-depth residual (low-level features) before the head.
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        mtp_loss = None
        if self.mtp is not None and self.training and targets is not None and kv_cache is None:
            mtp_loss = self.mtp(self, x, idx, targets, cos_sin, loss_reduction)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if mtp_loss is not None:
            return self.head_loss(x, targets, loss_reduction) + mtp_loss
        return self.head_loss(x, targets, loss_reduction, softcap)

    def head_loss(
        self, x: torch.Tensor, targets: torch.Tensor | None, loss_reduction: str = "mean", softcap: bool = True
    ) -> torch.Tensor:
        """The head on the final normalized hidden state: the loss (targets given) or fp32 logits."""
        if targets is not None and self._fused_loss(x, loss_reduction):
            return softcap_cross_entropy(
                x.reshape(-1, x.size(-1)),
                self.lm_head.weight,
                targets.reshape(-1),
                self.config.vocab_size,
                SOFTCAP,
                loss_reduction,
            )
        if targets is None and self.last_position_only:
            x = x[:, -1:]
        # a CPU decode step's head (few rows, no grad) takes gpt.Linear's few-rows path
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        if targets is None and not softcap:
            return logits
        logits = apply_softcap(logits)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-1,
            reduction=loss_reduction,
        )

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[int]:
        """Naive batch-1 sampling (full recompute per token); yields token ids. The Engine is the fast path."""
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_ids = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_ids), dim=1)
            yield int(next_ids.item())


def build_model(config: GPTConfig, device: torch.device | str, dtype: torch.dtype | None = None) -> GPT:
    """Construct on the meta device, materialize on `device`, init weights. dtype None = device default."""
    device = torch.device(device)
    if dtype is None:
        from nanoctl.device import compute_dtype

        dtype = compute_dtype(device)
    with torch.device("meta"):
        model = GPT(config, dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    log.info("attention kernel: %s (compute dtype %s)", attention.attention_backend(device, dtype), dtype)
    return model
