"""Fused CPU kernels: eager-mode fast paths with the same math as the plain ops (tested against them).

- `softcap_cross_entropy`: lm_head matmul + logit softcap + cross-entropy in row chunks, gradients made in
  forward; its tanh/exp/sum/gradient tail is one native pass (`native_softcap_kernel`) when available.
- `linear_relu_square`: the MLP's relu(x @ W^T)^2 with the minimum of elementwise passes.
- `FewRowsMatmul`: x @ W^T for CPU decode steps (few rows, no grad): lm_head and every block linear,
  in whichever of MKL's two layouts or the native packed kernel runs fastest on this CPU.
- `argmax_rows`: greedy decoding's argmax per row (`nanoctl._rustbpe.argmax_rows`), torch's semantics.
- `ragged_decode_attention`: continuous-batching decode attention, each row over exactly its own keys
  (`nanoctl._rustbpe.ragged_decode_attention`).

CUDA keeps the plain ops, which torch.compile fuses; the model (model/gpt.py) decides when these apply.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

NATIVE_LOSS_ENV = "NANOCTL_NATIVE_LOSS"  # "0": the fused CPU loss uses torch ops, not the native pass


def _native(name: str) -> Any:
    """A kernel of the native extension (`nanoctl._rustbpe`), or None in one built before it existed."""
    try:
        from nanoctl import _rustbpe
    except ImportError:
        return None
    return getattr(_rustbpe, name, None)


def native_softcap_kernel() -> Any:
    """The native one-pass tanh/exp/sum/gradient kernel (`nanoctl._rustbpe.softcap_exp_grad`), or None."""
    if os.environ.get(NATIVE_LOSS_ENV, "1") == "0":
        return None
    return _native("softcap_exp_grad")


class _SoftcapCrossEntropy(torch.autograd.Function):
    """lm_head matmul + logit softcap + cross-entropy, chunked over rows, gradients made in forward.

    The plain path materializes (N, vocab) fp32 logits several times over (matmul, divide, tanh, multiply,
    log-softmax, and the same again in backward); on a CPU those passes over ~N x 32768 floats cost more
    than the matmuls themselves. Here each chunk of rows goes matmul -> softcap -> logsumexp -> (softmax -
    onehot) * (1 - tanh^2) -> two matmuls for the input and weight gradients while it is still in cache,
    and backward only scales the stored gradients. Same math as F.cross_entropy(ignore_index=-1) on
    softcap * tanh(logits / softcap); used for mean/sum losses (and "none" without grad).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        vocab_size: int,
        softcap: float,
        reduction: str,
        chunk_rows: int,
        need_grad: bool,
    ) -> torch.Tensor:
        w = weight[:vocab_size].to(x.dtype)
        n = x.size(0)
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        count = valid.sum()
        if need_grad and reduction == "none":
            raise ValueError("per-row losses with gradients take the unfused path")
        scale = 1.0 / count.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=x.device)
        row_weight = valid.float() * scale
        losses = torch.empty(n, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
        # (vocab, rows) buffers reused by every chunk: fresh ~32 MiB outputs per chunk cost more in page
        # faults than the elementwise work on them. (vocab, rows) is the layout in which MKL runs W @ x^T,
        # W^T @ g and g @ x fastest at these shapes (bench/train_bench.py).
        rows_max = min(chunk_rows, n)
        native = native_softcap_kernel()
        z_buf = torch.empty(vocab_size * rows_max, dtype=torch.float32, device=x.device)
        e_buf = None if native is not None else torch.empty_like(z_buf)
        threads = torch.get_num_threads()
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            xs, ok, tgt = x[start:end], valid[start:end], safe_targets[start:end]
            z = z_buf[: vocab_size * (end - start)].view(vocab_size, end - start)
            xs_scaled_t = (xs * (1.0 / softcap)).t()  # the 1/softcap rides on the small operand
            if x.dtype == torch.float32:
                torch.mm(w, xs_scaled_t, out=z)
            else:
                z.copy_(torch.mm(w, xs_scaled_t))
            z_target = z.gather(0, tgt.view(1, -1)).squeeze(0).tanh()  # capped target logit / softcap
            # |capped| <= softcap, so exp cannot overflow: no max-subtraction pass is needed
            if native is not None:
                # one pass: z = tanh(u), e = exp(softcap z), column sums of e, and g = e (1 - z^2) in place
                sum_exp = torch.zeros(end - start, dtype=torch.float32, device=x.device)
                native(z.data_ptr(), vocab_size, end - start, softcap, sum_exp.data_ptr(), threads)
                g_full = z
            else:
                assert e_buf is not None
                e = e_buf[: vocab_size * (end - start)].view(vocab_size, end - start)
                z.tanh_()  # capped logits^T = softcap * z
                torch.mul(z, softcap, out=e).exp_()
                sum_exp = e.sum(dim=0)
                g_full = e.addcmul_(e, z.mul_(z), value=-1.0) if need_grad else e
            losses[start:end] = torch.where(ok, sum_exp.log() - softcap * z_target, 0.0)
            if need_grad:
                assert grad_x is not None and grad_w is not None
                # d = rw * (softmax - onehot) * (1 - z^2). Only g = exp * (1 - z^2) is made at full size; the
                # per-row factor rw / sum_exp and the one-hot term go onto the small operands of the matmuls.
                rw = row_weight[start:end]
                per_row = (rw / sum_exp).unsqueeze(1)
                onehot_weight = (rw * (1.0 - z_target * z_target)).unsqueeze(1)
                g = g_full.to(x.dtype)  # exp * (1 - z^2)
                gx = torch.mm(w.t(), g).t()
                grad_x[start:end] = gx * per_row.to(x.dtype) - w[tgt] * onehot_weight.to(x.dtype)
                if grad_w.dtype == g.dtype:
                    grad_w[:vocab_size].addmm_(g, xs * per_row)
                else:
                    grad_w[:vocab_size].add_(g.mm(xs * per_row.to(x.dtype)).float())
                grad_w.index_add_(0, tgt, (xs.float() * -onehot_weight))
        ctx.save_for_backward(grad_x, grad_w)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / count.float() if reduction == "mean" else total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out, None, None, None, None, None, None


def softcap_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    softcap: float = 15.0,
    reduction: str = "mean",
    chunk_rows: int = 256,
) -> torch.Tensor:
    """cross_entropy(softcap * tanh((x @ weight[:vocab].T) / softcap), targets, ignore_index=-1), fused.

    x (N, C), targets (N,). Gradients flow to x and weight; reduction mean|sum (|none without grad).
    """
    # (forward always runs with grad mode off, so whether gradients are wanted is decided out here)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _SoftcapCrossEntropy.apply(
        x, weight, targets, vocab_size, softcap, reduction, chunk_rows, need_grad
    )


class _LinearReluSquare(torch.autograd.Function):
    """relu(x @ W^T)^2 for the MLP's first half, with the elementwise work cut to the minimum.

    Eager autograd runs relu, square and, backward, a product, a scale, a threshold mask and a copy, each
    a pass over the (tokens x 4 dim) hidden tensor. Here relu is applied in place to the fresh matmul
    output and backward is one product and one scale: d/du relu(u)^2 = 2 relu(u), which is already zero
    where u <= 0. Used on CPU in eager mode; torch.compile fuses the plain version itself.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = weight.to(x.dtype)
        h = F.linear(x, w).relu_()
        ctx.save_for_backward(x, weight, h)
        return h.square()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, weight, h = ctx.saved_tensors
        grad_h = torch.mul(grad, h).mul_(2.0)
        flat_grad = grad_h.reshape(-1, grad_h.size(-1))
        grad_x = (flat_grad @ weight.to(grad_h.dtype)).view_as(x)
        grad_w = flat_grad.t().mm(x.reshape(-1, x.size(-1))).to(weight.dtype)
        return grad_x, grad_w


def linear_relu_square(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """relu(x @ weight^T)^2 with gradients to x and weight (the fused `_LinearReluSquare`)."""
    return _LinearReluSquare.apply(x, weight)


_ARGMAX_ROWS = _native("argmax_rows")


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for (B, V) logits; the native pass on a CPU in fp32.

    torch's CPU argmax reads ~1 G floats/s: 0.45 ms for 16 rows of a 32768 vocab, a cost that grows
    with the decode batch (and so with continuous batching) while the rest of a step barely does.
    Same result: the first maximal index, a NaN counting as the maximum.
    """
    if _ARGMAX_ROWS is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return torch.argmax(logits, dim=-1)
    logits = logits.contiguous()
    out = torch.empty(logits.size(0), dtype=torch.long)
    if logits.numel():
        _ARGMAX_ROWS(logits.data_ptr(), logits.size(0), logits.size(1), out.data_ptr())
    return out


_DECODE_ATTENTION = _native("ragged_decode_attention")


def ragged_decode_attention(
    q: torch.Tensor,
    k_layer: torch.Tensor,
    v_layer: torch.Tensor,
    slots: list[int],
    positions: list[int],
    window: int,
    scale: float,
) -> torch.Tensor | None:
    """One decode query per row against that row's own cached keys, on a CPU in fp32 (native kernel).

    q (B, 1, H, Dk); k_layer/v_layer one layer's (slots, T, H_kv, D) cache, already holding this
    step's K/V, last axis contiguous (v may be a slice of k, as MLA's latent values are); row b is
    slot `slots[b]` with its new token at `positions[b]`, seeing keys back to `positions[b] - window`
    (window < 0: all). The cache may hold fp32 or fp16 (a `--kv-dtype float16` cache; the arithmetic is
    fp32). Returns (B, 1, H, Dv), or None when the kernel cannot take these tensors (not a CPU, q not
    fp32, another cache dtype, no native extension): the caller then uses SDPA. Unlike the padded SDPA
    batch it reads no key past a row's own length and needs no mask (1.5-3x faster per decode step's
    attention on 2-core boxes, bench/serve_bench.py).
    """
    tensors = (q, k_layer, v_layer)
    if _DECODE_ATTENTION is None or any(t.device.type != "cpu" for t in tensors) or q.dtype != torch.float32:
        return None
    if k_layer.dtype != v_layer.dtype or k_layer.dtype not in (torch.float32, torch.float16):
        return None
    if k_layer.stride(-1) != 1 or v_layer.stride(-1) != 1:
        return None
    batch, _, heads, k_dim = q.shape
    q = q.reshape(batch, heads, k_dim).contiguous()
    out = q.new_empty((batch, 1, heads, v_layer.size(-1)))

    def reachable(t: torch.Tensor) -> int:  # elements from t's first one to the end of its storage
        return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()

    _DECODE_ATTENTION(
        q.data_ptr(), k_layer.data_ptr(), reachable(k_layer), tuple(k_layer.stride()[:3]), k_dim,
        v_layer.data_ptr(), reachable(v_layer), tuple(v_layer.stride()[:3]), v_layer.size(-1),
        heads, k_layer.size(2), slots, positions, window, scale, out.data_ptr(), torch.get_num_threads(),
        k_layer.dtype == torch.float16,
    )  # fmt: skip
    return out


_PACKED_MATMUL = _native("packed_matmul")
PANEL = 16  # weight rows per packed panel (nanoctl._rustbpe.packed_matmul)


FEW_ROWS = 32  # the most rows (tokens) a product may have to take the few-rows path


class FewRowsMatmul:
    """x @ W^T for CPU decode steps (at most FEW_ROWS rows, no grad) in the form that runs fastest here.

    Used by every gpt.Linear, lm_head included (`Linear.takes_few_rows`). A product with few
    rows streams the whole weight for little arithmetic, and MKL's sgemm runs it at a fraction of the
    core's rate, differently per CPU and row count. The native kernel (`packed`: the weight in
    (dim x 16) panels, up to 6 rows' outputs held in registers) is used whenever it can run (fp32):
    on a 2-core EPYC it ran the head 1.5-2.6x faster than MKL's best layout at 2-32 rows and block
    linears up to 4x faster at 4 rows on one thread. Its FMA order per output does not depend on the
    row count, so a row's logits are bit-identical whichever rows share the step (a seeded request
    decodes the same alone or in a crowd). Without it (another dtype, no native extension) each
    power-of-two row bucket times MKL's two layouts once, on its first call, and keeps the faster
    (`layouts`): one row runs about 3x faster against a contiguous (dim, vocab) copy than against
    the row-major weight, while for 2-32 rows W @ x^T beat x @ W^T by 1.3-3x on one box and lost by
    up to 1.25x on another. Every form returns a contiguous (rows, out) tensor (the sampler's argmax
    and top-k read a transposed view several times slower). Same values up to summation order.

    Holds the copies it uses: not parameters, not saved. They are rebuilt when the weight's version or
    storage changes (a load, any in-place op on the parameter) and when `invalidate` is called: the
    optimizer writes through `p.data`, which leaves `_version` alone, so GPT.after_optimizer_step drops
    them after every step (a stale head once made RL rollouts depend on where a run had resumed). The
    layout choices are kept: they depend on shapes, not values.
    """

    LAYOUTS = ("transposed", "weight", "packed")  # x @ (cached W^T) | (W @ x^T)^T | native panels

    def __init__(self) -> None:
        self._copies: dict[str, torch.Tensor] = {}
        self._key: tuple[Any, ...] | None = None
        self.layouts: dict[int, str] = {}  # row bucket (a power of two) -> the fastest layout

    def invalidate(self) -> None:
        self._copies, self._key = {}, None

    def available(self, dtype: torch.dtype) -> tuple[str, ...]:
        """The layouts that can run in `dtype` (the native kernel is fp32 only)."""
        native = _PACKED_MATMUL is not None and dtype == torch.float32
        return self.LAYOUTS if native else self.LAYOUTS[:2]

    def _copy(self, weight: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
        key = (weight._version, weight.data_ptr(), dtype)
        if self._key != key:
            self._copies, self._key = {}, key
        copy = self._copies.get(layout)
        if copy is None:
            w = weight.detach().to(dtype)
            if layout == "transposed":
                copy = w.t().contiguous()
            else:  # packed[p, d, j] = W[16 p + j, d], zero rows past the vocab
                rows = -(-w.size(0) // PANEL) * PANEL
                w = torch.cat([w, w.new_zeros(rows - w.size(0), w.size(1))]) if rows != w.size(0) else w
                copy = w.view(rows // PANEL, PANEL, w.size(1)).transpose(1, 2).contiguous()
            self._copies[layout] = copy
        return copy

    def product(self, flat: torch.Tensor, weight: torch.Tensor, layout: str) -> torch.Tensor:
        """flat (rows, dim) @ weight^T in one layout: a contiguous (rows, padded vocab) tensor."""
        if layout == "weight":
            return (weight.detach().to(flat.dtype) @ flat.t()).t().contiguous()
        copy = self._copy(weight, flat.dtype, layout)
        if layout == "transposed":
            return flat @ copy
        flat = flat.contiguous()
        out = flat.new_empty((flat.size(0), weight.size(0)))
        _PACKED_MATMUL(
            flat.data_ptr(), flat.size(0), flat.size(1), copy.data_ptr(), copy.numel(), out.data_ptr(),
            weight.size(0), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def _tune(self, flat: torch.Tensor, weight: torch.Tensor) -> str:
        import time

        best, best_time = self.LAYOUTS[0], float("inf")
        for layout in self.LAYOUTS[:2]:  # MKL's two (the native kernel, when it can run, is always used)
            self.product(flat, weight, layout)  # warm: builds the copy, faults the output in
            elapsed = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                self.product(flat, weight, layout)
                elapsed = min(elapsed, time.perf_counter() - start)
            if elapsed < best_time:
                best, best_time = layout, elapsed
        for unused in set(self._copies) - set(self.layouts.values()) - {best}:
            del self._copies[unused]  # tried and not chosen by any bucket yet: give the memory back
        return best

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (..., dim) with at most FEW_ROWS rows -> (..., weight rows)."""
        rows = x.numel() // x.size(-1)
        flat = x.reshape(rows, x.size(-1))
        if "packed" in self.available(flat.dtype):
            layout = "packed"
        else:
            bucket = 1 << (rows - 1).bit_length()
            layout = self.layouts.get(bucket)
            if layout is None:
                layout = self.layouts[bucket] = self._tune(flat, weight)
        return self.product(flat, weight, layout).view(*x.shape[:-1], -1)
