"""Multi-head Latent Attention (DeepSeek-V2/V3) with decoupled RoPE, for arch="deepseek".

Per token, keys and values are compressed jointly into a latent c (kv_lora_rank, RMS-normed) plus one
rope key k_r (qk_rope_head_dim) shared by all heads. Head h's key is [W_uk,h c, k_r] and its value
W_uv,h c; its query is [q_nope,h, rope(q_r,h)]. Only RoPE'd parts carry position, so the score depends
on the relative offset (nanoDeepSeek never rotated q; see reference §C).

Training (no cache) decompresses K/V and runs ordinary causal attention. Cached decode caches only
[c, k_r] per token (one K "head" of kv_lora_rank + rope dims; V unused) and attends in latent space
("absorbed" form): q_nope is folded through W_uk into the latent, the output is read through W_uv.
That is MQA with one key/value head whose value is the latent itself, so the shared SDPA paths of
model/attention.py serve both the batched (KVCache) and the continuous-batching (RaggedView) caches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from nanoctl.model import attention
from nanoctl.model.gpt import GPTConfig, Linear, apply_rotary_emb, norm


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = H = config.n_head
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.rank = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        C = config.n_embd
        self.softmax_scale = 1.0 / math.sqrt(qk_dim)
        if config.q_lora_rank:
            self.q_down: Linear | None = Linear(C, config.q_lora_rank, bias=False)
            self.c_q = Linear(config.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_down = None
            self.c_q = Linear(C, H * qk_dim, bias=False)
        self.kv_down = Linear(C, self.rank + self.rope_dim, bias=False)
        self.kv_up = Linear(self.rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.c_proj = Linear(H * self.v_dim, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        window: int,
        kv_cache: Any,
    ) -> torch.Tensor:
        B, T, _ = x.size()
        cos, sin = cos_sin
        q_in = norm(self.q_down(x)) if self.q_down is not None else x
        q = self.c_q(q_in).view(B, T, self.n_head, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rotary_emb(q_rope, cos, sin)
        kv = self.kv_down(x)
        latent = norm(kv[..., : self.rank])
        k_rope = apply_rotary_emb(kv[..., self.rank :].unsqueeze(2), cos, sin)  # (B, T, 1, rope)
        if kv_cache is None:
            y = self._attend_full(q_nope, q_rope, latent, k_rope, window)
        else:
            y = self._attend_latent(q_nope, q_rope, latent, k_rope, window, kv_cache)
        return self.c_proj(y.reshape(B, T, self.n_head * self.v_dim))

    def _attend_full(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, window: int
    ) -> torch.Tensor:
        """Training / full recompute: decompress per-head K/V from the latent, causal attention."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_up(latent).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, T, H, self.rope_dim)], dim=-1)
        if v.size(-1) == q.size(-1):
            return attention.full_attention(q, k, v, window, self.softmax_scale)
        # Flash kernels want one head size for q, k and v; SDPA does not.
        y = attention.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, 0, 0, self.softmax_scale)
        return y.transpose(1, 2)

    def kv_up_weight(self) -> torch.Tensor:
        """The (out, in) matrix kv_up applies. Subclasses whose kv_up is not a plain Linear override it
        (lora.AdaptedMLA: W + the unmerged adapter's update; quantize.Int8MLA: the dequantized int8 weight),
        so the absorbed path computes what the uncached one does."""
        return self.kv_up.weight

    def _absorbed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_up's weight as (H, nope, rank) key and (H, v, rank) value maps, in x's dtype."""
        w = self.kv_up_weight().to(x.dtype).view(self.n_head, self.nope_dim + self.v_dim, self.rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _attend_latent(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        window: int,
        cache: Any,
    ) -> torch.Tensor:
        """Cached decode/prefill in latent space: write [latent, rope key], attend, map out through W_uv."""
        w_uk, w_uv = self._absorbed(q_nope)
        q = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_rope], dim=-1)  # (B, T, H, rank+rope)
        entry = torch.cat([latent, k_rope[:, :, 0]], dim=-1)  # (B, T, rank+rope): the whole cached state
        k_cache, _ = cache.get_layer_cache(self.layer_idx)
        if getattr(cache, "ragged", False):
            k_cache[cache.index, cache.positions] = entry[:, 0].unsqueeze(1).to(k_cache.dtype)
            # the cached state is one K "head" (rank+rope); the values are its latent part
            y = cache.attend(q, k_cache, k_cache[..., : self.rank], window, self.softmax_scale).transpose(1, 2)
        else:
            T = q.size(1)
            pos = cache.get_pos()
            end = pos + T
            if end > cache.seq_len:
                raise ValueError(f"KV cache holds {cache.seq_len} positions; this step needs {end}")
            k_cache[:, pos:end] = entry.unsqueeze(2)
            start = max(0, pos - window) if window >= 0 else 0
            keys = k_cache[:, start:end].transpose(1, 2).to(q.dtype)  # a narrower cache widens here
            y = attention.sdpa(q.transpose(1, 2), keys, keys[..., : self.rank], window, pos, start, self.softmax_scale)
        return torch.einsum("bhtr,hvr->bthv", y, w_uv)
