"""DeepSeekMoE for arch="deepseek": shared expert(s) + fine-grained routed experts, sigmoid top-k router,
auxiliary-loss-free load balancing.

Routing (DeepSeek-V3): affinity s = sigmoid(W_g x) per expert; the top-k experts are chosen by s + b,
where b is a per-expert bias used for selection only; the gate weights are the chosen s, normalized to
sum to 1. After every optimizer step b += rate * sign(mean load - load) (`update_bias`): overloaded
experts become less attractive, underloaded ones more, without a loss term that fights the LM loss.
The bias is a persistent buffer (saved in checkpoints); the load counts are not (they are zero at
every save, right after an update).

Experts are ReLU^2 MLPs like the dense one, stored as (E, out, in) stacks (Muon orthogonalizes each
expert's matrix: the stack axis is a batch axis in optim.muon_step). Token-expert pairs are sorted by
expert, then each expert's contiguous group runs as one matmul, in a loop over experts (never over
tokens). `torch._grouped_mm` would fuse that loop, but in torch 2.15 its backward is unimplemented on
CPU, and its CUDA path is not yet verified here (no GPU run): left for a GPU session.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoctl.model.gpt import MLP, GPTConfig, Linear
from nanoctl.model.kernels import linear_relu_square


class MoE(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        E, C, hidden = config.n_experts, config.n_embd, config.moe_intermediate_size
        self.n_experts, self.top_k = E, config.top_k
        self.bias_update_rate = config.bias_update_rate
        self.router = Linear(C, E, bias=False)
        self.w_fc = nn.Parameter(torch.empty(E, hidden, C))
        self.w_proj = nn.Parameter(torch.empty(E, C, hidden))
        self.shared = MLP(config, config.n_shared_experts * hidden) if config.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        # tokens routed to each expert since the last bias update (training forwards only)
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) -> chosen experts (N, k) and their normalized gate weights (N, k), fp32."""
        scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))
        with torch.no_grad():
            chosen = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, chosen)
        return chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        chosen, weights = self.route(flat)
        if self.training:
            self.expert_load += torch.bincount(chosen.flatten(), minlength=self.n_experts).float()
        out = self._experts(flat, chosen, weights.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, C)

    def _experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(x), grouped by expert."""
        k = chosen.size(1)
        flat_expert = chosen.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token = order // k  # the token of each expert-sorted (token, expert) pair
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        xs = x.index_select(0, token)
        ys = torch.cat(self._expert_outputs(xs.split(counts.tolist())))  # one host sync for the group sizes
        ys = ys * weights.flatten().index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add(0, token, ys)

    def _expert_outputs(self, groups: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Expert e on groups[e], its tokens, for every expert with tokens (in expert order); the int8
        model (quantize.Int8MoE) overrides this with its per-expert int8 linears."""
        dtype = groups[0].dtype
        w_fc, w_proj = self.w_fc.to(dtype), self.w_proj.to(dtype)
        parts = []
        fused = groups[0].device.type == "cpu" and not torch.compiler.is_compiling()
        for e, seg in enumerate(groups):
            if seg.size(0) == 0:
                continue
            h = linear_relu_square(seg, w_fc[e]) if fused else F.relu(F.linear(seg, w_fc[e])).square()
            parts.append(F.linear(h, w_proj[e]))
        return parts

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """One balancing step from this layer's (all-reduced) load; clears the running count."""
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()
