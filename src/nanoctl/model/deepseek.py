"""arch="deepseek": config rules, init, parameter/FLOP counts, bias balancing and multi-token prediction.

The trunk is model/gpt.py's classic one (embedding norm, parameter-free RMSNorm, untied head, softcap 15,
RoPE base 10k); every layer's attention is MLA (model/mla.py) and every layer after the first
`n_dense_layers` has DeepSeekMoE (model/moe.py) in place of the dense MLP. Shapes left at 0 in GPTConfig
are derived here (`resolve_config`) so a saved config records concrete values.

Counts ("active" = what one token touches): total minus, in every MoE layer, the (E - top_k) routed
experts a token does not use. FLOPs/token = 6 x (active matmul weights + lm_head) + 6 x H x (qk + v
head dims) x T per attention layer (nanochat's convention: the full T, no causal halving).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from nanoctl.errors import UsageError
from nanoctl.model.gpt import GPT, MLP, GPTConfig, Linear, norm

DEEPSEEK_FIELDS = (
    "n_experts", "top_k", "n_shared_experts", "moe_intermediate_size", "n_dense_layers", "kv_lora_rank",
    "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "mtp_depth", "bias_update_rate",
)  # fmt: skip
MTP_LOSS_WEIGHT = 0.3  # DeepSeek-V3's lambda for the first part of training


def resolve_config(cfg: GPTConfig) -> None:
    """Fill the deepseek shapes left at 0 (see GPTConfig); MLA has no separate KV heads."""
    if not cfg.n_head or cfg.n_embd % cfg.n_head:
        return  # validate() reports the shape error
    hd = cfg.head_dim
    cfg.n_kv_head = cfg.n_head
    cfg.kv_lora_rank = cfg.kv_lora_rank or max(16, cfg.n_embd // 4)
    cfg.qk_rope_head_dim = cfg.qk_rope_head_dim or max(2, hd // 4 * 2)
    cfg.qk_nope_head_dim = cfg.qk_nope_head_dim or hd
    cfg.v_head_dim = cfg.v_head_dim or hd
    if not cfg.moe_intermediate_size:
        # fine-grained experts: the token's active experts together cost about one dense 4x MLP
        active = max(1, cfg.top_k + cfg.n_shared_experts)
        cfg.moe_intermediate_size = max(32, round(4 * cfg.n_embd / active / 32) * 32)


def validate_config(cfg: GPTConfig) -> None:
    def positive(value: Any, flag: str) -> None:
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{flag} {value!r} must be a positive integer (arch deepseek)")

    positive(cfg.n_experts, "--experts")
    positive(cfg.top_k, "--top-k")
    positive(cfg.kv_lora_rank, "--kv-lora-rank")
    for name in ("moe_intermediate_size", "qk_nope_head_dim", "v_head_dim", "qk_rope_head_dim"):
        positive(getattr(cfg, name), f"model config {name}")
    if cfg.top_k > cfg.n_experts:
        raise UsageError(f"--top-k {cfg.top_k} is more than --experts {cfg.n_experts}",
                         "each token picks top-k of the routed experts: lower --top-k or raise --experts")
    if cfg.n_shared_experts < 0 or cfg.q_lora_rank < 0:
        raise UsageError("--shared-experts and model config q_lora_rank must be >= 0")
    if not 0 <= cfg.n_dense_layers <= cfg.n_layer:
        raise UsageError(f"model config n_dense_layers={cfg.n_dense_layers} must be in 0..n_layer={cfg.n_layer}")
    if cfg.qk_rope_head_dim % 2:
        raise UsageError(f"model config qk_rope_head_dim={cfg.qk_rope_head_dim} must be even for rotary embeddings")
    if cfg.mtp_depth not in (0, 1):
        raise UsageError(f"--mtp-depth {cfg.mtp_depth} must be 0 (off) or 1", "one sequential MTP module is supported")
    if not cfg.bias_update_rate >= 0:
        raise UsageError(f"model config bias_update_rate={cfg.bias_update_rate} must be >= 0 (0 = no balancing)")


def deepseek_sublayers(config: GPTConfig, layer_idx: int) -> tuple[nn.Module, nn.Module]:
    """(attention, feed-forward) of one block: MLA, then the dense MLP or DeepSeekMoE."""
    from nanoctl.model.mla import MultiHeadLatentAttention
    from nanoctl.model.moe import MoE

    ffn = MoE(config) if layer_idx >= config.n_dense_layers else MLP(config)
    return MultiHeadLatentAttention(config, layer_idx), ffn


def moe_layers(model: nn.Module) -> list[Any]:
    from nanoctl.model.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction, depth 1: predicts token t+2 from the trunk's state at t and the
    embedding of token t+1 (one projection and one dense MLA block), through the shared embedding and
    head. Training only: the loss is added with weight MTP_LOSS_WEIGHT; inference ignores it."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        from nanoctl.model.mla import MultiHeadLatentAttention

        self.proj = Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.attn = MultiHeadLatentAttention(config, config.n_layer)
        self.mlp = MLP(config)

    def forward(
        self,
        model: GPT,
        h: torch.Tensor,
        idx: torch.Tensor,
        targets: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        loss_reduction: str,
    ) -> torch.Tensor | None:
        T = idx.size(1)
        if loss_reduction not in ("mean", "sum") or T < 2:
            return None  # per-token losses (eval) are the main head's only
        emb = norm(model.transformer.wte(idx[:, 1:]).to(h.dtype))
        z = self.proj(torch.cat([norm(h[:, :-1]), emb], dim=-1))
        cos, sin = cos_sin
        z = z + self.attn(norm(z), None, (cos[:, : T - 1], sin[:, : T - 1]), -1, None)
        z = z + self.mlp(norm(z))
        return MTP_LOSS_WEIGHT * model.head_loss(norm(z), targets[:, 1:].contiguous(), loss_reduction)


@torch.no_grad()
def init_deepseek_weights(model: GPT) -> None:
    """nanochat HEAD-style init: matrices U(+-sqrt(3/fan_in)), MLP/expert up-projections x0.4, every
    output projection (attention, MLPs, experts) zero, wte N(0, 0.8), lm_head N(0, 0.001); biases 0."""
    nn.init.normal_(model.transformer.wte.weight, mean=0.0, std=0.8)
    nn.init.normal_(model.lm_head.weight, mean=0.0, std=0.001)
    s = 3**0.5 * model.config.n_embd**-0.5
    from nanoctl.model.mla import MultiHeadLatentAttention
    from nanoctl.model.moe import MoE

    parts = [model.transformer.h] + ([model.mtp] if model.mtp is not None else [])
    modules = [m for part in parts for m in part.modules()]
    for module in modules:  # every matrix first; the special cases below then override theirs
        if isinstance(module, Linear):
            bound = (3 / module.in_features) ** 0.5
            nn.init.uniform_(module.weight, -bound, bound)
    for module in modules:
        if isinstance(module, MLP):
            nn.init.uniform_(module.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(module.c_proj.weight)
        elif isinstance(module, MoE):
            nn.init.uniform_(module.w_fc, -0.4 * s, 0.4 * s)
            nn.init.zeros_(module.w_proj)
            module.expert_bias.zero_()
            module.expert_load.zero_()
        elif isinstance(module, MultiHeadLatentAttention):
            nn.init.zeros_(module.c_proj.weight)


def count_params(model: GPT, wte: int, lm_head: int, matrices: int, total: int) -> dict[str, int]:
    cfg = model.config
    per_expert = 2 * cfg.n_embd * cfg.moe_intermediate_size
    inactive = len(moe_layers(model)) * (cfg.n_experts - cfg.top_k) * per_expert
    return {
        "wte": wte,
        "lm_head": lm_head,
        "transformer_matrices": matrices,
        "total": total,
        "active": total - inactive,
        # the Chinchilla-style ratio counts what a token uses (active matrices + head)
        "scaling": matrices - inactive + lm_head,
    }


def estimate_flops(model: GPT) -> float:
    cfg = model.config
    counts = model.num_scaling_params()
    matmul = counts["scaling"]  # active matrices + lm_head (wte is a lookup)
    heads = cfg.n_head * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    attn_layers = cfg.n_layer + cfg.mtp_depth
    flops = 6 * matmul + 6 * heads * cfg.sequence_len * attn_layers
    if cfg.mtp_depth:
        flops += 6 * counts["lm_head"]  # the shared head runs once more
    return float(flops)


def describe(cfg: GPTConfig) -> str:
    """One line for --dry-run: the MoE and MLA shapes."""
    moe_layers_n = cfg.n_layer - cfg.n_dense_layers
    mtp = f"; MTP depth {cfg.mtp_depth}" if cfg.mtp_depth else ""
    return (f"deepseek: {moe_layers_n} MoE layer(s) x ({cfg.n_experts} routed experts, top-{cfg.top_k},"
            f" + {cfg.n_shared_experts} shared; expert hidden {cfg.moe_intermediate_size}), {cfg.n_dense_layers}"
            f" dense; MLA latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim}"
            + (f", q rank {cfg.q_lora_rank}" if cfg.q_lora_rank else "") + mtp)


@torch.no_grad()
def update_routing_biases(model: GPT) -> None:
    """Bias balancing after an optimizer step, from every MoE layer's load since the last one. The loads
    are summed over ranks first, so every rank applies the same update and the biases stay identical."""
    layers = moe_layers(model)
    if not layers:
        return
    loads = torch.stack([m.expert_load for m in layers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    for m, load in zip(layers, loads, strict=True):
        m.update_bias(load)
