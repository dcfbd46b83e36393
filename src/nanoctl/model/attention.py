"""Attention backends: which kernel runs causal (sliding-window) attention, and the kernels' call sites.

FA3 (`flash_attn_interface`) or FA2 (`flash_attn`) when importable on CUDA with a 16-bit dtype; otherwise
SDPA, with FlexAttention block masks for sliding-window layers under torch.compile on CUDA. The choice is
resolved once at import and can be forced with NANOCTL_ATTENTION. Tensors are (B, T, H, D) for
`full_attention` and (B, H, T, D) for `sdpa`. The attention module itself lives in model/gpt.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from nanoctl.errors import UsageError

ATTENTION_ENV = "NANOCTL_ATTENTION"  # auto | sdpa (no flash, no flex) | flash (require FA2/FA3)


def _probe_flash() -> tuple[str, Any] | None:
    """FA3 (`flash_attn_interface`) or FA2 (`flash_attn`) when importable on a CUDA machine."""
    if not torch.cuda.is_available():
        return None
    for name, mod_name in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn")):
        try:
            return name, __import__(mod_name)
        except Exception:  # missing, or built for another CUDA/torch: fall back to SDPA
            continue
    return None


# Resolved once at import (as nanochat does) so forward() never touches the environment or imports while
# torch.compile traces it. FA3 from the HF `kernels` hub is not fetched: nothing is downloaded at runtime.
_FLASH = _probe_flash()
_ATTN_CHOICE = os.environ.get(ATTENTION_ENV, "auto").strip().lower()


def flash_kernel() -> str | None:
    """The flash kernel found at import: "fa3", "fa2", or None (no CUDA, or no flash-attn package)."""
    return None if _FLASH is None else _FLASH[0]


def flex_available() -> bool:
    """Whether this torch has FlexAttention (block-sparse sliding windows under torch.compile on CUDA)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


# Sliding-window block masks for FlexAttention, keyed by (seq_len, window, device). Filled by
# prepare_flex_masks() (GPT.prepare_flex_attention) *before* torch.compile traces forward (the lookup is
# then a constant), the way torchtitan keeps its masks; a missing key falls back to SDPA.
_FLEX_MASKS: dict[tuple[int, int, str], Any] = {}


def _sliding_block_mask(seq_len: int, window: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return create_block_mask(visible, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel full-sequence attention uses: "fa3", "fa2" or "sdpa" (NANOCTL_ATTENTION=sdpa forces SDPA).

    Flash kernels need CUDA and a 16-bit compute dtype; KV-cache decode always uses SDPA.
    """
    if _ATTN_CHOICE == "flash" and _FLASH is None:
        raise UsageError(
            f"{ATTENTION_ENV}=flash but neither flash_attn_interface (FA3) nor flash_attn (FA2) imports",
            f"install flash-attn, or unset {ATTENTION_ENV}",
        )
    if _ATTN_CHOICE == "sdpa" or _FLASH is None:
        return "sdpa"
    if torch.device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    return _FLASH[0]


def prepare_flex_masks(device: torch.device, dtype: torch.dtype, windows: list[int], seq_len: int) -> bool:
    """Build the FlexAttention block masks for the windowed layers at `seq_len` (see GPT.prepare_flex_attention).

    Returns False (SDPA stays in use) off CUDA, with flash kernels available, under NANOCTL_ATTENTION=sdpa,
    or when this torch lacks FlexAttention.
    """
    if device.type != "cuda" or _ATTN_CHOICE == "sdpa" or not flex_available():
        return False
    if attention_backend(device, dtype) != "sdpa":
        return False  # FA2/FA3 handle windows natively
    for window in set(windows):
        if 0 <= window < seq_len - 1:
            _FLEX_MASKS[(seq_len, window, str(device))] = _sliding_block_mask(seq_len, window, device)
    return True


def attention_summary(
    device: torch.device, dtype: torch.dtype, windows: list[int], seq_len: int, flex: bool
) -> str:
    """One line for the run banner: which kernel the training forward uses for attention."""
    backend = attention_backend(device, dtype)
    windowed = any(0 <= w < seq_len - 1 for w in windows)
    if backend != "sdpa":
        return f"{backend} (flash attention, native sliding windows)"
    if not windowed:
        return "sdpa (causal)"
    if flex:
        return "FlexAttention for sliding-window layers, sdpa for full layers"
    if _ATTN_CHOICE == "sdpa":
        return f"sdpa with a window mask ({ATTENTION_ENV}=sdpa)"
    if device.type == "cuda":
        return "sdpa with a dense window mask (slow: compile, or install flash-attn, for a fast kernel)"
    return "sdpa with a window mask"


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    q_start: int,
    k_start: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal (optionally windowed) attention in (B, H, T, D) layout via SDPA.

    Queries sit at absolute positions q_start.., keys at k_start..; a key is visible when it is not in the
    future and at most `window` positions back (window < 0: unlimited). An explicit mask is built only when
    is_causal (or no mask) cannot express it.
    """
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    q_end = q_start + Tq - 1
    windowed = 0 <= window < q_end - k_start  # some key is too far back for some query
    if not windowed and q_start == k_start and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    if not windowed and Tq == 1 and k_start + Tk - 1 <= q_start:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, scale=scale)
    if gqa and q.is_cuda:
        # SDPA's efficient (masked) kernel lacks GQA; expand K/V rather than fall back to the math kernel.
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    rows = torch.arange(q_start, q_start + Tq, device=q.device).unsqueeze(1)
    cols = torch.arange(k_start, k_start + Tk, device=q.device).unsqueeze(0)
    mask = cols <= rows
    if window >= 0:
        mask = mask & (rows - cols <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Training / full-recompute causal attention over one whole sequence; (B, T, H, D) in and out.

    FA3/FA2 when `attention_backend` picks them; else FlexAttention for a windowed layer whose block mask
    was prepared (compiled forward only); else SDPA.
    """
    T = q.size(1)
    if _FLASH is not None and q.is_cuda and attention_backend(q.device, q.dtype) != "sdpa":
        left = window if 0 <= window < T - 1 else -1
        out = _FLASH[1].flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(left, 0))
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    block_mask = _FLEX_MASKS.get((T, window, str(q.device))) if 0 <= window < T - 1 else None
    if block_mask is not None and torch.compiler.is_compiling():
        # SDPA can express a window only as a dense mask (no flash kernel, every block computed);
        # FlexAttention skips the blocks outside the window. It is fast only when compiled.
        from torch.nn.attention.flex_attention import flex_attention

        y = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    else:
        y = sdpa(q, k, v, window, 0, 0, scale)
    return y.transpose(1, 2)


def ragged_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row against that row's keys, (B, H, T, D) layout; `mask` (B, 1, 1, Tk) marks
    the keys each row may see (its own length and window). Continuous-batching decode."""
    gqa = q.size(1) != k.size(1)
    if gqa and q.is_cuda:
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
