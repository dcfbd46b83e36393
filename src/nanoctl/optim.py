"""MuonAdamW: Muon for transformer matrices, AdamW for embeddings/head/scalars; 1 or N processes.

As nanochat HEAD's optimizer (adapted there from modded-nanogpt), folded into one class:
- With one process it is a plain optimizer. Under torch.distributed (world > 1) no DDP wrapper is needed:
  `step()` averages gradients itself (reduce_scatter for large tensors, all_reduce for small ones), each
  rank updates only the shard it owns, and all_gather puts the updated weights back on every rank
  (ZeRO-2: optimizer state is sharded, so `state_dict()` is this rank's shard).
- Muon step: Nesterov momentum -> (bf16) -> MuonEq row equilibration -> Polar Express (5 iterations)
  -> Muon+ renormalization to sqrt(min(m, n)) -> NorMuon-style factored variance reduction ->
  cautious weight decay -> update at lr * sqrt(max(1, rows/cols)).
- AdamW step: fp32 math whatever the param dtype, decoupled weight decay first, bias-corrected moments.
- On CUDA both steps are torch.compile'd (fullgraph); per-step hyperparameters (lr, momentum, wd, step)
  are passed as 0-D CPU tensors so changing them never recompiles. On CPU/MPS they run eagerly (no
  compile latency for tests and small runs).

Param groups (built by GPT.setup_optimizer) carry `kind` ("adamw" | "muon") and `initial_lr`.
AdamW groups: lr, betas, eps, weight_decay. Muon groups (all params one shape): lr, momentum, ns_steps,
beta2, weight_decay.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from nanoctl.errors import NanoctlError

# torch.compile of the step kernels: default on CUDA only; "0" never; "all" on every device (CPU too, as
# nanochat does; bench/train_bench.py --nanochat-d6 uses it for its compiled peer)
COMPILE_ENV = "NANOCTL_OPTIM_COMPILE"
SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all-reduced and updated whole on every rank

# Polar Express coefficients for 5 iterations (safety factor 2e-2, cushion 2), from Amsel, Persson, Musco,
# Gower, "The Polar Express" (arXiv 2505.16932); the values nanochat and modded-nanogpt use.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


# ----------------------------------------------------------------------------------------------------------
# Step kernels (pure tensor math; compiled on CUDA)


def adamw_step(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step_t: Tensor,
    lr_t: Tensor,
    beta1_t: Tensor,
    beta2_t: Tensor,
    eps_t: Tensor,
    wd_t: Tensor,
) -> None:
    """In-place AdamW on one tensor: decoupled decay, then bias-corrected Adam, all in fp32."""
    # bf16 params (embeddings) and bf16 state: do the math in fp32 (1 - beta2 is lossy in bf16; MPS also
    # rejects mixed-dtype ops) and write back at the end.
    p32 = p.float()
    m32 = exp_avg.float()
    v32 = exp_avg_sq.float()
    g32 = grad.float()
    p32.mul_(1 - lr_t * wd_t)
    m32.lerp_(g32, 1 - beta1_t)
    v32.lerp_(g32.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    # one temporary, updated in place: on a CPU each fresh (vocab x dim) buffer costs page faults
    update = v32.div(bias2).sqrt_().add_(eps_t)
    torch.div(m32, update, out=update)
    p32.add_(update.mul_(-(lr_t / bias1)))
    p.copy_(p32)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)


def polar_express(g: Tensor, ns_steps: int) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in a (..., m, n) stack."""
    X = g / (g.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # spectral norm <= 1 with a margin
    if g.size(-2) > g.size(-1):  # tall: iterate on the small n x n Gram matrix
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_step(
    grads: Tensor,
    params: Tensor,
    momentum_buffer: Tensor,
    second_momentum_buffer: Tensor,
    momentum_t: Tensor,
    lr_t: Tensor,
    wd_t: Tensor,
    beta2_t: Tensor,
    ns_steps: int,
    red_dim: int,
    orth_bf16: bool,
) -> None:
    """In-place Muon on a stack of same-shape matrices (K, m, n); `grads` is used as scratch."""
    # Nesterov momentum: buffer lerps toward the gradient, the update looks one step ahead.
    momentum = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)

    X = g.bfloat16() if orth_bf16 else g
    # MuonEq: rescale every row to the mean row norm so the spectrum entering the iteration is better
    # conditioned.
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)
    X = polar_express(X, ns_steps)
    g = X.to(params.dtype)

    # Muon+: snap the Frobenius norm to that of an exact semi-orthogonal matrix (fixes under-convergence).
    target_norm = min(g.size(-2), g.size(-1)) ** 0.5
    g = g * (target_norm / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(g.dtype)

    # NorMuon-style variance reduction: factored (per row or per column) second moment, then rescale so
    # the update keeps its overall norm.
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)

    # Cautious weight decay: decay only where the update and the weight agree in sign.
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


_COMPILED: dict[str, Callable[..., None]] = {}


def _kernel(name: str, device: torch.device) -> Callable[..., None]:
    eager = {"adamw": adamw_step, "muon": muon_step}[name]
    mode = os.environ.get(COMPILE_ENV, "1")
    if mode == "0" or (device.type != "cuda" and mode != "all"):
        return eager
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(eager, dynamic=False, fullgraph=True)
    return _COMPILED[name]


# ----------------------------------------------------------------------------------------------------------
# The optimizer


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world_mismatch(world: int) -> NanoctlError:
    return NanoctlError(
        f"optimizer state shard does not fit {world} process(es): it was saved with a different world size",
        "resume with the same number of processes (--nproc-per-node/--nnodes) it was saved with",
    )


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, for 1 or N processes (see the module docstring).

    `orth_bf16`: run the orthogonalization in bf16 (None = on CUDA with bf16 support, as nanochat does
    when its compute dtype is bf16).
    """

    def __init__(self, param_groups: list[dict[str, Any]], orth_bf16: bool | None = None) -> None:
        for group in param_groups:
            kind = group.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) > 1 or any(len(s) < 2 for s in shapes):
                    raise ValueError(f"a muon group needs matrices of one shape, got {sorted(shapes)}")
        super().__init__(param_groups, defaults={})
        self.orth_bf16 = orth_bf16
        # 0-D CPU tensors: refilled every step so compiled kernels never see a new Python constant.
        f32 = dict(dtype=torch.float32, device="cpu")
        self._adamw_t = {k: torch.tensor(0.0, **f32) for k in ("step", "lr", "beta1", "beta2", "eps", "wd")}
        self._muon_t = {k: torch.tensor(0.0, **f32) for k in ("momentum", "lr", "wd", "beta2")}

    def _use_bf16(self, device: torch.device) -> bool:
        if self.orth_bf16 is not None:
            return self.orth_bf16
        # Same rule as the compute dtype: bf16 on Ampere or newer (fp16 is unstable in the iteration).
        return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8

    @staticmethod
    def _adamw_sharded(p: Tensor, world: int) -> bool:
        # reduce_scatter splits dim 0 evenly; anything small or indivisible is all-reduced whole.
        return world > 1 and p.numel() >= SMALL_PARAM_NUMEL and p.shape[0] % world == 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard; refuse a shard saved under a different number of processes."""
        super().load_state_dict(state_dict)
        _, world = _world()
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    st = self.state.get(p, {})
                    if "exp_avg" not in st:
                        continue
                    rows = p.shape[0] // world if self._adamw_sharded(p, world) else p.shape[0]
                    if st["exp_avg"].shape[0] != rows:
                        raise _world_mismatch(world)
            elif params and "momentum_buffer" in self.state.get(params[0], {}):
                if self.state[params[0]]["momentum_buffer"].shape[0] != -(-len(params) // world):
                    raise _world_mismatch(world)

    # -- phase 1: launch gradient reductions ------------------------------------------------------------

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        # A parameter without a gradient counts as a zero gradient, so every rank runs the same
        # collectives and 1-process and N-process runs agree.
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _reduce_adamw(self, group: dict[str, Any], world: int) -> list[dict[str, Any]]:
        infos = []
        for p in group["params"]:
            grad = self._grad(p)
            if world == 1:
                infos.append(dict(work=None, grad=grad, sharded=False))
            elif not self._adamw_sharded(p, world):
                work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
                infos.append(dict(work=work, grad=grad, sharded=False))
            else:
                grad_slice = torch.empty_like(grad[: grad.shape[0] // world])
                work = dist.reduce_scatter_tensor(grad_slice, grad, op=dist.ReduceOp.AVG, async_op=True)
                infos.append(dict(work=work, grad=grad_slice, sharded=True))
        return infos

    def _reduce_muon(self, group: dict[str, Any], world: int) -> dict[str, Any]:
        params = group["params"]
        chunk = -(-len(params) // world)
        stacked = torch.stack([self._grad(p) for p in params])
        if world == 1:
            return dict(work=None, grad_chunk=stacked, stacked=stacked, chunk=chunk)
        padded = torch.zeros((chunk * world, *params[0].shape), dtype=stacked.dtype, device=stacked.device)
        padded[: len(params)] = stacked
        grad_chunk = torch.empty((chunk, *params[0].shape), dtype=stacked.dtype, device=stacked.device)
        work = dist.reduce_scatter_tensor(grad_chunk, padded, op=dist.ReduceOp.AVG, async_op=True)
        return dict(work=work, grad_chunk=grad_chunk, stacked=padded, chunk=chunk)

    # -- phase 2: update owned shards, launch gathers ---------------------------------------------------

    def _compute_adamw(
        self,
        group: dict[str, Any],
        infos: list[dict[str, Any]],
        gathers: list[dict[str, Any]],
        rank: int,
        world: int,
    ) -> None:
        t = self._adamw_t
        for p, info in zip(group["params"], infos, strict=True):
            if info["work"] is not None:
                info["work"].wait()
            if info["sharded"]:
                rows = p.shape[0] // world
                p_slice = p.data[rank * rows : (rank + 1) * rows]
            else:
                p_slice = p.data
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice)
                state["exp_avg_sq"] = torch.zeros_like(p_slice)
            state["step"] += 1
            t["step"].fill_(state["step"])
            t["lr"].fill_(group["lr"])
            t["beta1"].fill_(group["betas"][0])
            t["beta2"].fill_(group["betas"][1])
            t["eps"].fill_(group["eps"])
            t["wd"].fill_(group["weight_decay"])
            _kernel("adamw", p.device)(
                p_slice,
                info["grad"],
                state["exp_avg"],
                state["exp_avg_sq"],
                t["step"],
                t["lr"],
                t["beta1"],
                t["beta2"],
                t["eps"],
                t["wd"],
            )
            if info["sharded"]:
                # p_slice is a view of p, so gathering into p from a copy of it is safe.
                work = dist.all_gather_into_tensor(p.data, p_slice.clone(), async_op=True)
                gathers.append(dict(work=work, params=None))

    def _compute_muon(
        self,
        group: dict[str, Any],
        info: dict[str, Any],
        gathers: list[dict[str, Any]],
        rank: int,
        world: int,
    ) -> None:
        if info["work"] is not None:
            info["work"].wait()
        params: list[Tensor] = group["params"]
        chunk = info["chunk"]
        shape, device, dtype = params[0].shape, params[0].device, params[0].dtype
        start = rank * chunk
        owned = min(chunk, max(0, len(params) - start))
        # Group state lives on the first param (the shard of `chunk` matrices this rank owns).
        state = self.state[params[0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros((chunk, *shape), dtype=dtype, device=device)
        if "second_momentum_buffer" not in state:
            # Factored second moment over the larger matrix dim (per row for tall, per column for wide).
            if shape[-2] >= shape[-1]:
                state_shape = (chunk, *shape[:-1], 1)
            else:
                state_shape = (chunk, *shape[:-2], 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=dtype, device=device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2

        updated = torch.empty((chunk, *shape), dtype=dtype, device=device)
        if owned > 0:
            stacked_params = torch.stack([p.data for p in params[start : start + owned]])
            t = self._muon_t
            t["momentum"].fill_(group["momentum"])
            t["lr"].fill_(group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5)
            t["wd"].fill_(group["weight_decay"])
            t["beta2"].fill_(group["beta2"])
            _kernel("muon", device)(
                info["grad_chunk"][:owned],
                stacked_params,
                state["momentum_buffer"][:owned],
                state["second_momentum_buffer"][:owned],
                t["momentum"],
                t["lr"],
                t["wd"],
                t["beta2"],
                group["ns_steps"],
                red_dim,
                self._use_bf16(device),
            )
            updated[:owned] = stacked_params
        if owned < chunk:
            updated[owned:].zero_()
        if world == 1:
            torch._foreach_copy_([p.data for p in params], list(updated.unbind(0)))
            return
        # Reuse the padded gradient stack as the gather output (it is no longer needed).
        out = info["stacked"]
        work = dist.all_gather_into_tensor(out, updated, async_op=True)
        gathers.append(dict(work=work, params=params, stacked=out))

    # -- phase 3 ---------------------------------------------------------------------------------------

    @staticmethod
    def _finish(gathers: list[dict[str, Any]]) -> None:
        for g in gathers:
            g["work"].wait()
            if g["params"] is not None:
                params = g["params"]
                torch._foreach_copy_([p.data for p in params], list(g["stacked"][: len(params)].unbind(0)))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        rank, world = _world()
        reduces: list[Any] = []
        for group in self.param_groups:
            if not group["params"]:
                reduces.append(None)
            elif group["kind"] == "adamw":
                reduces.append(self._reduce_adamw(group, world))
            else:
                reduces.append(self._reduce_muon(group, world))
        gathers: list[dict[str, Any]] = []
        for group, info in zip(self.param_groups, reduces, strict=True):
            if info is None:
                continue
            if group["kind"] == "adamw":
                self._compute_adamw(group, info, gathers, rank, world)
            else:
                self._compute_muon(group, info, gathers, rank, world)
        self._finish(gathers)
