"""A nanoctl model (nanochat's current architecture, or the deepseek variant) for Hugging Face
transformers (remote code).

Shipped in every exported directory with configuration_nanoctl.py; load it with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Self-contained: torch and
transformers only, never nanoctl. The math follows nanoctl's model/gpt.py exactly:

- token embedding, parameter-free RMSNorm, then smear (x[t] += lam * sigmoid(W x[t][:24]) * x[t-1])
- before every layer x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the smeared embedding)
- attention: q/k/v projections, a gated value embedding added to v on some layers, half-split RoPE
  (rotating by -theta), QK RMSNorm, softmax scale qk_scale^2 / sqrt(head_dim), causal with a per-layer
  sliding window, GQA
- MLP: fc2(relu(fc1(x))^2)
- backout: the output of layer `backout_layer`, times backout_lambda, is subtracted before the final norm
- untied lm_head, logits softcapped: cap * tanh(logits / cap), in fp32

Module names follow transformers' NanoChat (model.layers.N.self_attn.q_proj, mlp.fc1, ...), so PEFT's
usual target modules apply. Attention and MLP are separate classes looked up by `config.arch`
(ATTENTION_CLASSES, MLP_CLASSES) so another architecture family can add its own pieces beside these.

arch "deepseek" (nanoctl's model/mla.py, model/moe.py, model/deepseek.py): the classic trunk (no scalars,
smear, backout or value embeddings; RoPE base 10k) with
- Multi-head Latent Attention: per token a latent c = rms_norm(first kv_lora_rank channels of
  kv_a_proj_with_mqa(x)) and one rope key k_r (the rest, rotated) shared by all heads; head h's key is
  [W_uk,h c, k_r], its value W_uv,h c (kv_b_proj = [W_uk; W_uv] per head); its query [q_nope, rope(q_r)]
  (q_proj, or q_b_proj(rms_norm(q_a_proj(x)))); no QK-norm; scale 1 / sqrt(nope + rope dims)
- DeepSeekMoE after the first `first_k_dense_replace` dense layers: shared experts (one MLP of
  n_shared_experts x moe_intermediate_size) + routed ReLU^2 experts stored as (E, out, in) stacks; the
  router picks the top-k of sigmoid(W_g x) + e_score_correction_bias (the bias only selects) and weights
  the chosen sigmoid scores normalized to sum 1
- nanoctl's multi-token prediction module is training-only and is not exported.

The KV cache is transformers' DynamicCache with full-length layers; the sliding windows are applied by
the attention mask, so every layer's cache holds the whole sequence (simple, and exact). For deepseek the
cache holds only what MLA needs, as nanoctl's own: key slot = the rotated rope key (B, 1, T, rope), value
slot = the latent (B, 1, T, kv_lora_rank); cached steps attend in latent space ("absorbed": q_nope folded
through W_uk, the output read through W_uv), uncached forwards decompress K/V, each as nanoctl does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nanoctl import NanoctlConfig

# transformers renamed the cache argument and output field `past_key_values` -> `cache` (5.24); accept
# and return whichever this version uses.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free; eps = finfo(dtype).eps (F.rms_norm's default), as nanochat.
    return F.rms_norm(x, (x.size(-1),))


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, 1, head_dim/2) for integer positions (B, T); computed in fp32."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (base ** (channels / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return freqs.cos().to(dtype).unsqueeze(2), freqs.sin().to(dtype).unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on (B, T, H, D), rotating by -theta (nanochat's convention)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention_mask_for(
    q_pos: torch.Tensor, k_len: int, window: int, key_padding: torch.Tensor | None
) -> torch.Tensor:
    """Boolean (B|1, 1, Tq, Tk) mask: key j visible to query at position p when j <= p and p - j <= window.

    Keys are the cache positions 0..k_len-1. `key_padding` (B, k_len), 1 = a real token. A query always
    sees itself, so a padded query row is never fully masked (SDPA would return NaN).
    """
    k_pos = torch.arange(k_len, device=q_pos.device)
    rows = q_pos.unsqueeze(-1)  # (B, Tq, 1)
    visible = k_pos <= rows
    if window >= 0:
        visible = visible & (rows - k_pos <= window)
    if key_padding is not None:
        visible = visible & key_padding[:, None, :].bool()
    visible = visible | (k_pos == rows)
    return visible.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Layers


class NanoctlAttention(nn.Module):
    """Causal self-attention with RoPE, QK-norm, GQA, a sliding window and an optional value embedding."""

    def __init__(self, config: NanoctlConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.window = config.window_sizes[layer_idx]
        self.rope_theta = config.rope_theta
        self.scale = config.qk_scale**2 / math.sqrt(self.head_dim)  # (s q).(s k) = s^2 q.k
        hidden, kv_dim = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.ve_channels = config.ve_gate_channels
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(self.ve_channels, self.num_kv_heads, bias=False) if has_ve else None

    def forward(
        self,
        x: torch.Tensor,
        value_embed: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        masks: dict[int, torch.Tensor],
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if value_embed is not None and self.ve_gate is not None:
            # ResFormer value residual with an input-dependent per-head gate in (0, 3).
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_channels]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = masks[self.window]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanoctlMLP(nn.Module):
    """fc2(relu(fc1(x))^2), no biases."""

    def __init__(self, config: NanoctlConfig, layer_idx: int, intermediate_size: int | None = None) -> None:
        super().__init__()
        hidden = intermediate_size or config.intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


class NanoctlLatentAttention(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE (arch "deepseek"); see the module docstring."""

    def __init__(self, config: NanoctlConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.rank = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        hidden = config.hidden_size
        self.window = config.window_sizes[layer_idx]
        self.scale = 1.0 / math.sqrt(qk_dim)
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope_dim, bias=False)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        value_embed: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        masks: dict[int, torch.Tensor],
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, nope, rope = self.num_heads, self.nope_dim, self.rope_dim
        cos, sin = cos_sin
        q = self.q_b_proj(rms_norm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, H, nope + rope).split([nope, rope], dim=-1)
        q_rope = apply_rotary(q_rope, cos, sin)
        kv = self.kv_a_proj_with_mqa(x)
        latent = rms_norm(kv[..., : self.rank])
        k_rope = apply_rotary(kv[..., self.rank :].unsqueeze(2), cos, sin)  # (B, T, 1, rope)
        mask = masks[self.window]
        if cache is None:
            # Decompress per-head K/V (nanoctl's training / full-recompute path).
            k_nope, v = self.kv_b_proj(latent).view(B, T, H, nope + self.v_dim).split([nope, self.v_dim], -1)
            q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
            k = torch.cat([k_nope, k_rope.expand(B, T, H, rope)], dim=-1).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=self.scale)
            y = y.transpose(1, 2)
        else:
            # Latent space: one shared key/value "head" [c, k_r] / c, so the cache stays small.
            w = self._kv_b_weight(x).view(H, nope + self.v_dim, self.rank)
            w_uk, w_uv = w[:, :nope], w[:, nope:]
            q = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_rope], dim=-1).transpose(1, 2)
            rope_keys, latents = cache.update(k_rope.transpose(1, 2), latent.unsqueeze(1), self.layer_idx)
            keys = torch.cat([latents, rope_keys], dim=-1)  # (B, 1, Tk, rank + rope)
            y = F.scaled_dot_product_attention(
                q, keys, latents, attn_mask=mask, scale=self.scale, enable_gqa=H > 1
            )  # (B, H, T, rank)
            y = torch.einsum("bhtr,hvr->bthv", y, w_uv)
        return self.o_proj(y.reshape(B, T, H * self.v_dim))

    def _kv_b_weight(self, x: torch.Tensor) -> torch.Tensor:
        """kv_b_proj's (out, in) weight; under a wrapper (a PEFT LoRA, a quantized layer) `.weight` is not
        the map applied, so read that off an identity: cached steps then see what uncached ones do."""
        if type(self.kv_b_proj) is nn.Linear:
            return self.kv_b_proj.weight
        return self.kv_b_proj(torch.eye(self.rank, dtype=x.dtype, device=x.device)).T


class NanoctlRouter(nn.Module):
    """Sigmoid top-k routing with a selection-only bias (DeepSeek-V3's auxiliary-loss-free balancing)."""

    def __init__(self, config: NanoctlConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) -> chosen experts (N, k) and their normalized gate weights (N, k), fp32."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores + self.e_score_correction_bias.float()
        chosen = torch.topk(biased, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, chosen)
        return chosen, weights / weights.sum(dim=-1, keepdim=True)


class NanoctlExperts(nn.Module):
    """The routed ReLU^2 experts as (E, out, in) stacks: fc1 (E, hidden, C), fc2 (E, C, hidden)."""

    def __init__(self, config: NanoctlConfig) -> None:
        super().__init__()
        E, C, hidden = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.fc1 = nn.Parameter(torch.empty(E, hidden, C))
        self.fc2 = nn.Parameter(torch.empty(E, C, hidden))

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(x); token-expert pairs grouped by expert
        (one matmul per expert, as nanoctl's model/moe.py)."""
        k = chosen.size(1)
        flat_expert = chosen.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token = order // k
        counts = torch.bincount(flat_expert, minlength=self.fc1.size(0))
        xs = x.index_select(0, token)
        parts = []
        for e, seg in enumerate(xs.split(counts.tolist())):
            if seg.size(0):
                parts.append(F.linear(F.relu(F.linear(seg, self.fc1[e])).square(), self.fc2[e]))
        ys = torch.cat(parts) * weights.flatten().index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add(0, token, ys)


class NanoctlMoE(nn.Module):
    """DeepSeekMoE: shared experts (always on) + routed experts weighted by the router."""

    def __init__(self, config: NanoctlConfig, layer_idx: int) -> None:
        super().__init__()
        self.gate = NanoctlRouter(config)
        self.experts = NanoctlExperts(config)
        shared = config.n_shared_experts * config.moe_intermediate_size
        self.shared_experts = NanoctlMLP(config, layer_idx, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        chosen, weights = self.gate(flat)
        out = self.experts(flat, chosen, weights.to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, C)


# One entry per architecture family (config.arch); a new family registers its attention and MLP here.
# The first `first_k_dense_replace` layers use the dense NanoctlMLP whatever the family.
ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "current": NanoctlAttention,
    "deepseek": NanoctlLatentAttention,
}
MLP_CLASSES: dict[str, type[nn.Module]] = {"current": NanoctlMLP, "deepseek": NanoctlMoE}
# Families with nanochat's trunk extras (residual/x0 scalars, smear, backout); the others are classic.
TRUNK_EXTRAS = {"current"}


class NanoctlDecoderLayer(nn.Module):
    """Pre-norm block with parameter-free norms: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: NanoctlConfig, layer_idx: int) -> None:
        super().__init__()
        if config.arch not in ATTENTION_CLASSES:
            raise ValueError(
                f"config.arch {config.arch!r} is not one this modeling_nanoctl.py knows "
                f"({', '.join(sorted(ATTENTION_CLASSES))}); re-export with a newer nanoctl"
            )
        self.self_attn = ATTENTION_CLASSES[config.arch](config, layer_idx)
        dense = layer_idx < config.first_k_dense_replace
        self.mlp = (NanoctlMLP if dense else MLP_CLASSES[config.arch])(config, layer_idx)

    def forward(
        self,
        x: torch.Tensor,
        value_embed: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        masks: dict[int, torch.Tensor],
        cache: Cache | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(rms_norm(x), value_embed, cos_sin, masks, cache)
        return x + self.mlp(rms_norm(x))


# ----------------------------------------------------------------------------------------------------------
# Models


class NanoctlPreTrainedModel(PreTrainedModel):
    config_class = NanoctlConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NanoctlDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only used for a fresh (not loaded) model; nanoctl checkpoints bring every tensor.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, NanoctlRouter)):
            module.weight.normal_(0.0, std)
            if isinstance(module, NanoctlRouter):
                module.e_score_correction_bias.zero_()
        elif isinstance(module, NanoctlExperts):
            module.fc1.normal_(0.0, std)
            module.fc2.normal_(0.0, std)
        elif isinstance(module, NanoctlModel) and module.extras:
            module.resid_lambdas.fill_(1.0)
            module.x0_lambdas.zero_()
            module.smear_lambda.zero_()
            module.backout_lambda.zero_()


class NanoctlModel(NanoctlPreTrainedModel):
    """The trunk: embeddings, smear, scaled residuals, layers, backout, final norm (no head); the families
    outside TRUNK_EXTRAS (deepseek) have none of smear, scalars or backout."""

    def __init__(self, config: NanoctlConfig) -> None:
        super().__init__(config)
        n, hidden = config.num_hidden_layers, config.hidden_size
        kv_dim = config.num_key_value_heads * (hidden // config.num_attention_heads)
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList([NanoctlDecoderLayer(config, i) for i in range(n)])
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(config.vocab_size, kv_dim) for i in config.value_embed_layers}
        )
        self.extras = config.arch in TRUNK_EXTRAS
        if self.extras:
            self.resid_lambdas = nn.Parameter(torch.ones(n))
            self.x0_lambdas = nn.Parameter(torch.zeros(n))
            self.smear_gate = nn.Linear(config.smear_gate_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # MLA rotates only its decoupled rope part of each head
        self.rotary_dim = config.qk_rope_head_dim if config.arch == "deepseek" else config.head_dim
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _smear(
        self,
        x: torch.Tensor,
        cache: Cache | None,
        past: int,
        key_padding: torch.Tensor | None,
        prev_token_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mix each position with the previous one. After a cached prefix the previous token is
        `prev_token_ids` (generate() passes it, so beam reordering is followed) or else the embedding this
        cache saw last.

        With left padding (`key_padding`, 1 = real token over the cache slots), a pad is no previous token.
        """
        lam = self.smear_lambda.to(x.dtype)
        channels = self.config.smear_gate_channels
        prev = None
        if past > 0 and prev_token_ids is not None:
            prev = rms_norm(self.embed_tokens(prev_token_ids))
        elif past > 0 and cache is not None:
            prev = getattr(cache, "nanoctl_prev_embedding", None)
        if cache is not None:
            cache.nanoctl_prev_embedding = x[:, -1:, :].detach().clone()
        if prev is None:
            shifted = x[:, :-1]
            if key_padding is not None:
                shifted = shifted * key_padding[:, -x.size(1) : -1, None].to(x.dtype)
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :channels]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * shifted], dim=1)
        shifted = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        if key_padding is not None:
            shifted = shifted * key_padding[:, past - 1 : past - 1 + x.size(1), None].to(x.dtype)
        return x + lam * torch.sigmoid(self.smear_gate(x[..., :channels])) * shifted

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        prev_token_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if input_ids is None:
            # Value embeddings are looked up by token id: embeddings alone do not determine the output.
            raise ValueError("nanoctl models need input_ids (value embeddings are indexed by token id)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device) + past).unsqueeze(0).expand(B, T)
        x = rms_norm(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        cos_sin = rotary_cos_sin(position_ids, self.rotary_dim, self.config.rope_theta, x.dtype)
        key_padding = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_padding = attention_mask[:, -(past + T) :]
        q_pos = (torch.arange(T, device=input_ids.device) + past).unsqueeze(0)  # cache slots, not RoPE ids
        masks = {
            w: attention_mask_for(q_pos, past + T, w, key_padding) for w in set(self.config.window_sizes)
        }

        if self.extras:
            x = self._smear(x, cache, past, key_padding, prev_token_ids)
        x0, x_backout = x, None
        for i, layer in enumerate(self.layers):
            if self.extras:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            value_embed = self.value_embeds[key](input_ids).to(x.dtype) if key in self.value_embeds else None
            x = layer(x, value_embed, cos_sin, masks, cache)
            if self.extras and i == self.config.backout_layer:
                x_backout = x
        if x_backout is not None:
            # Remove part of the mid-depth residual (low-level features) before the head.
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        return BaseModelOutputWithPast(last_hidden_state=rms_norm(x), **{_CACHE_FIELD: cache})


class NanoctlForCausalLM(NanoctlPreTrainedModel, GenerationMixin):
    """NanoctlModel + an untied lm_head with logit softcapping."""

    def __init__(self, config: NanoctlConfig) -> None:
        super().__init__(config)
        self.model = NanoctlModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        prev_token_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            prev_token_ids=prev_token_ids,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs) -> dict:
        # Smear needs the token before the new ones; input_ids holds the whole (beam-reordered) sequence.
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and 0 < new.size(1) < input_ids.size(1):
            start = input_ids.size(1) - new.size(1)
            inputs["prev_token_ids"] = input_ids[:, start - 1 : start]
        return inputs


__all__ = ["NanoctlForCausalLM", "NanoctlModel", "NanoctlPreTrainedModel"]
