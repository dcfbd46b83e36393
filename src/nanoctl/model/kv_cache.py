"""KVCache: the preallocated per-layer key/value cache for incremental decoding.

`GPT.new_kv_cache` builds one sized for the model; the attention module (model/gpt.py) writes into it.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer K/V for incremental decoding: k_cache/v_cache are (L, B, T, H_kv, D).

    All rows share one position (nanochat's design: rows are samples of one prompt). The model's forward
    writes new K/V at `get_pos()` and advances after the last layer. `prev_embedding` holds the last
    normalized token embedding for smear.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        seq_len: int,
        head_dim: int,
        num_layers: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch_size, seq_len, num_kv_heads, head_dim)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.n_layers = num_layers
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        # FA3 layout keeps per-row lengths on the device; the Python int avoids a sync per get_pos().
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._pos = 0
        self.prev_embedding: torch.Tensor | None = None

    def reset(self) -> None:
        self._pos = 0
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self) -> int:
        return self._pos

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens: int) -> None:
        self._pos += num_tokens
        self.cache_seqlens += num_tokens

    def prefill(self, other: KVCache) -> None:
        """Copy a batch-1 cache (a prompt prefill) into every row of this one."""
        if other.batch_size != 1:
            raise ValueError(f"prefill copies from a batch-1 cache, got batch {other.batch_size}")
        if self.get_pos() != 0:
            raise ValueError("prefill needs an empty cache; call reset() first")
        n = other.get_pos()
        if n > self.seq_len:
            raise ValueError(f"cache of {self.seq_len} positions cannot hold a {n}-token prefill")
        if other.k_cache.shape[0] != self.n_layers or other.k_cache.shape[3:] != self.k_cache.shape[3:]:
            raise ValueError("prefill between caches of different layer/head shapes")
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()
        self.advance(n)
