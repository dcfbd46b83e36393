"""KV caches for incremental decoding: KVCache (rows share one position) and SlotKVCache (continuous
batching: every row has its own length).

`GPT.new_kv_cache` / `GPT.new_slot_cache` build them sized for the model; the attention module
(model/gpt.py) writes into them.
"""

from __future__ import annotations

import torch

# Ragged decode on a CPU uses the native per-row kernel (kernels.ragged_decode_attention); False: SDPA
# over the padded span everywhere (the tests compare the two).
NATIVE_ATTENTION = True


class KVCache:
    """Preallocated per-layer K/V for incremental decoding: k_cache/v_cache are (L, B, T, H_kv, D)
    (v_cache's D may differ: 0 for MLA, which caches its latent and rope key as one K "head").

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
        v_head_dim: int | None = None,
    ) -> None:
        shape = (num_layers, batch_size, seq_len, num_kv_heads, head_dim)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.n_layers = num_layers
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        # v_head_dim 0: no V at all (MLA reads its values from the cached latent in k_cache)
        v_dim = head_dim if v_head_dim is None else v_head_dim
        self.v_cache = torch.zeros((*shape[:-1], v_dim), device=device, dtype=dtype)
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


class SlotKVCache:
    """K/V for continuous batching: `slots` rows, each with its own length (one request's sample each).

    Rows join and leave independently. A newcomer's prompt is prefilled through `row(slot)`, a batch-1
    view with the plain `KVCache` interface (the model's ordinary cached path, chunk by chunk); running
    rows decode together through `decode_view(slots)`, whose per-row positions the model's ragged path
    reads (`RaggedView.ragged`). Sliding windows, value embeddings and smear all work per row: windows
    are masks over each row's own positions and smear keeps each row's previous embedding.
    """

    def __init__(
        self,
        slots: int,
        num_kv_heads: int,
        seq_len: int,
        head_dim: int,
        num_layers: int,
        n_embd: int,
        device: torch.device | str,
        dtype: torch.dtype,
        v_head_dim: int | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (num_layers, slots, seq_len, num_kv_heads, head_dim)
        self.slots = slots
        self.seq_len = seq_len
        self.n_layers = num_layers
        # K/V may be stored narrower than the activations (`serve --kv-dtype float16`): writes round,
        # reads widen (the native CPU kernel reads fp16 directly).
        kv_dtype = kv_dtype or dtype
        self.k_cache = torch.zeros(shape, device=device, dtype=kv_dtype)
        v_dim = head_dim if v_head_dim is None else v_head_dim  # 0: no V (MLA), as KVCache
        self.v_cache = torch.zeros((*shape[:-1], v_dim), device=device, dtype=kv_dtype)
        self.prev = torch.zeros(slots, 1, n_embd, device=device, dtype=dtype)
        self.lengths = [0] * slots  # positions written per row (host-side: no device sync to read)

    def row(self, slot: int) -> _RowView:
        return _RowView(self, slot)

    def decode_view(self, slots: list[int]) -> RaggedView:
        return RaggedView(self, slots)

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src` (parallel samples of one prompt share its prefill)."""
        n = self.lengths[src]
        self.k_cache[:, dst, :n] = self.k_cache[:, src, :n]
        self.v_cache[:, dst, :n] = self.v_cache[:, src, :n]
        self.prev[dst] = self.prev[src]
        self.lengths[dst] = n

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0  # stale K/V past a row's length are never read


class _RowView:
    """One row of a SlotKVCache seen as a batch-1 KVCache (prefill of one request)."""

    def __init__(self, cache: SlotKVCache, slot: int) -> None:
        self.cache, self.slot = cache, slot
        self.batch_size = 1
        self.seq_len = cache.seq_len
        self.n_layers = cache.n_layers

    def get_pos(self) -> int:
        return self.cache.lengths[self.slot]

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slot
        return self.cache.k_cache[layer_idx, s : s + 1], self.cache.v_cache[layer_idx, s : s + 1]

    def advance(self, num_tokens: int) -> None:
        self.cache.lengths[self.slot] += num_tokens

    @property
    def prev_embedding(self) -> torch.Tensor | None:
        # A row at position 0 has no previous token (smear starts fresh), as a new KVCache.
        # A copy: the model reads it and then overwrites the row with this chunk's last embedding.
        return None if self.get_pos() == 0 else self.cache.prev[self.slot : self.slot + 1].clone()

    @prev_embedding.setter
    def prev_embedding(self, value: torch.Tensor) -> None:
        self.cache.prev[self.slot : self.slot + 1] = value


class RaggedView:
    """Several rows of a SlotKVCache decoding one token each, every row at its own position.

    On a CPU in fp32 (an fp32 or fp16 cache) each row attends over exactly its own keys (the native
    kernel). Otherwise attention reads the rows' K/V as one contiguous slice of slots (`span`):
    gathering scattered rows copied every layer's K/V once per step, which cost more than the attention
    itself. Slots in the span that are not decoding (their request is still prefilling, or they are
    free) ride along as "holes": their query is zero, they see only their own position 0 (no empty
    softmax), nothing is written to them and their output is dropped. When holes would outnumber the
    rows, the rows are gathered instead.
    """

    ragged = True

    def __init__(self, cache: SlotKVCache, slots: list[int]) -> None:
        self.cache = cache
        self.slots = slots
        self.batch_size = len(slots)
        self.seq_len = cache.seq_len
        device = cache.k_cache.device
        self.index = torch.tensor(slots, dtype=torch.long, device=device)
        lengths = self.lengths = [cache.lengths[s] for s in slots]
        self.max_len = max(lengths) + 1  # keys to attend over after this step's write
        self.positions = torch.tensor(lengths, dtype=torch.long, device=device)
        lo, hi = min(slots), max(slots) + 1
        self.span = (lo, hi) if hi - lo <= 2 * len(slots) else None
        self._local: torch.Tensor | None = None  # rows' places in the span, when it has holes
        self._span_positions = self.positions
        if self.span is not None and hi - lo != len(slots):
            self._local = self.index - lo
            span_positions = [0] * (hi - lo)
            for s, n in zip(slots, lengths, strict=True):
                span_positions[s - lo] = n
            self._span_positions = torch.tensor(span_positions, dtype=torch.long, device=device)
        self._masks: dict[int, torch.Tensor] = {}  # per window size; the same for every layer

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k_cache[layer_idx], self.cache.v_cache[layer_idx]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The span's slots of a (slots, T, ...) layer tensor (or the gathered rows), up to the longest row."""
        if self.span is not None:
            return t[self.span[0] : self.span[1], : self.max_len]
        return t[:, : self.max_len].index_select(0, self.index)  # slice first: gather only what is read

    def mask(self, window: int) -> torch.Tensor:
        """(span or B, 1, 1, max_len) bool: each row sees its own past, at most `window` back (< 0: all)."""
        m = self._masks.get(window)
        if m is None:
            cols = torch.arange(self.max_len, device=self.positions.device).unsqueeze(0)
            pos = self._span_positions.unsqueeze(1)
            m = cols <= pos
            if window >= 0:
                m = m & (pos - cols <= window)
            m = self._masks[window] = m[:, None, None, :]
        return m

    def attend(
        self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, window: int, scale: float
    ) -> torch.Tensor:
        """q (B, 1, H, D) of this view's rows against one layer's cache (already holding this step's
        K/V): (B, 1, H, Dv)."""
        from nanoctl.model.attention import ragged_sdpa
        from nanoctl.model.kernels import ragged_decode_attention

        if NATIVE_ATTENTION:  # a CPU in fp32: each row over exactly its own keys (None: not here)
            y = ragged_decode_attention(q, k_layer, v_layer, self.slots, self.lengths, window, scale)
            if y is not None:
                return y
        keys = self.rows(k_layer).transpose(1, 2).to(q.dtype)
        values = self.rows(v_layer).transpose(1, 2).to(q.dtype)
        if self._local is not None:
            q = q.new_zeros((keys.size(0), *q.shape[1:])).index_copy_(0, self._local, q)
        y = ragged_sdpa(q.transpose(1, 2), keys, values, self.mask(window), scale).transpose(1, 2)
        return y if self._local is None else y.index_select(0, self._local)

    def advance(self, num_tokens: int) -> None:
        for s in self.slots:
            self.cache.lengths[s] += num_tokens

    @property
    def prev_embedding(self) -> torch.Tensor:
        return self.cache.prev.index_select(0, self.index)

    @prev_embedding.setter
    def prev_embedding(self, value: torch.Tensor) -> None:
        self.cache.prev.index_copy_(0, self.index, value.to(self.cache.prev.dtype))
