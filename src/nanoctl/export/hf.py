"""HF transformers interop: the classic arch == transformers' NanoChatForCausalLM.

`to_hf_config` gives config.json fields for NanoChatConfig; `to_hf_state_dict` / `from_hf_state_dict` map
state-dict keys between nanochat's names and HF's (same tensors, no transposes). Only the classic arch
maps: HF NanoChat has no sliding windows, value embeddings, scalars, smear or backout.
"""

from __future__ import annotations

from typing import Any

import torch

from nanoctl.errors import UsageError
from nanoctl.model.gpt import ROPE_BASE, SOFTCAP, GPTConfig

_HF_LAYER_KEYS = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}


def require_classic(config: GPTConfig) -> None:
    """Raise a UsageError unless `config` maps onto HF NanoChat (classic arch, vocab a multiple of 64)."""
    if config.arch != "classic":
        raise UsageError(
            "only the classic arch maps onto HF transformers NanoChat",
            "HF NanoChat has no sliding windows, value embeddings, scalars, smear or backout; "
            "train with --arch classic to export",
        )
    if config.vocab_size % 64:
        raise UsageError(f"vocab_size {config.vocab_size} is not a multiple of 64: HF needs unpadded tables")


def to_hf_config(
    config: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """`config.json` fields for transformers' NanoChatConfig (intermediate_size set explicitly)."""
    require_classic(config)
    out: dict[str, Any] = {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "final_logit_softcapping": SOFTCAP,
        "rope_parameters": {"rope_theta": ROPE_BASE["classic"], "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    }
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
        out["pad_token_id"] = eos_token_id
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """nanochat keys -> HF NanoChat keys (no transposes; strips torch.compile's `_orig_mod.`)."""
    require_classic(config)
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    out = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(config.n_layer):
        for ours, theirs in _HF_LAYER_KEYS.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"transformer.h.{i}.{ours}"]
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF NanoChat keys -> nanochat keys (the inverse of to_hf_state_dict)."""
    require_classic(config)
    out = {
        "transformer.wte.weight": state_dict["model.embed_tokens.weight"],
        "lm_head.weight": state_dict["lm_head.weight"],
    }
    for i in range(config.n_layer):
        for ours, theirs in _HF_LAYER_KEYS.items():
            out[f"transformer.h.{i}.{ours}"] = state_dict[f"model.layers.{i}.{theirs}"]
    return out
