"""HF transformers interop: the classic arch == transformers' NanoChatForCausalLM; the current and deepseek
archs == our remote code (export/remote_code/modeling_nanoctl.py, loaded with trust_remote_code=True).

`to_hf_config` gives config.json fields for NanoChatConfig; `to_hf_state_dict` / `from_hf_state_dict` map
state-dict keys between nanochat's names and HF's (same tensors, no transposes). HF NanoChat has no sliding
windows, value embeddings, scalars, smear or backout, so the current arch goes through `to_remote_config` /
`to_remote_state_dict` instead (same module names as HF NanoChat for the shared parts, so PEFT targets match;
deepseek's MLA/MoE tensors take transformers' DeepseekV3 names, the expert stacks kept as they are).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nanoctl.errors import UsageError
from nanoctl.model.gpt import (
    QK_SCALE,
    ROPE_BASE,
    SMEAR_GATE_CHANNELS,
    SOFTCAP,
    VE_GATE_CHANNELS,
    GPTConfig,
    has_ve,
    window_sizes,
)

# How each arch leaves for transformers; an arch missing here (a new variant) is refused by name.
HF_EXPORTS = {
    "classic": "transformers' own NanoChatForCausalLM",
    "current": "remote code (modeling_nanoctl.py, trust_remote_code=True)",
    "deepseek": "remote code (modeling_nanoctl.py, trust_remote_code=True)",
}
REMOTE_ARCHS = ("current", "deepseek")
REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_CODE_FILES = ("configuration_nanoctl.py", "modeling_nanoctl.py")
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_nanoctl.NanoctlConfig",
    "AutoModel": "modeling_nanoctl.NanoctlModel",
    "AutoModelForCausalLM": "modeling_nanoctl.NanoctlForCausalLM",
}
# Tensors of the current arch outside the layers: nanochat name -> remote-code name
_REMOTE_TOP_KEYS = {
    "resid_lambdas": "model.resid_lambdas",
    "x0_lambdas": "model.x0_lambdas",
    "smear_gate.weight": "model.smear_gate.weight",
    "smear_lambda": "model.smear_lambda",
    "backout_lambda": "model.backout_lambda",
}

# deepseek layer tensors: nanoctl name -> remote-code name (DeepseekV3's names; experts stay stacked)
_DEEPSEEK_ATTN_KEYS = {
    "attn.c_q.weight": "self_attn.q_proj.weight",  # q_lora_rank == 0
    "attn.kv_down.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_up.weight": "self_attn.kv_b_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
}
_DEEPSEEK_Q_LORA_KEYS = {
    "attn.q_down.weight": "self_attn.q_a_proj.weight",
    "attn.c_q.weight": "self_attn.q_b_proj.weight",
}
_DEEPSEEK_DENSE_KEYS = {"mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_proj.weight": "mlp.fc2.weight"}
_DEEPSEEK_MOE_KEYS = {
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.w_fc": "mlp.experts.fc1",
    "mlp.w_proj": "mlp.experts.fc2",
}
_DEEPSEEK_SHARED_KEYS = {
    "mlp.shared.c_fc.weight": "mlp.shared_experts.fc1.weight",
    "mlp.shared.c_proj.weight": "mlp.shared_experts.fc2.weight",
}
# Kept fp32 whatever --dtype: the routing bias only ranks experts, and ours stays fp32 in every compute
# dtype (a bf16-rounded bias could pick other experts than nanoctl does).
FP32_TENSOR_SUFFIXES = ("e_score_correction_bias",)
# Training-only tensors: multi-token prediction is not part of generation, so it is left out.
_TRAINING_ONLY_PREFIXES = ("mtp.",)

_HF_LAYER_KEYS = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}


def require_exportable(config: GPTConfig) -> None:
    """Raise a UsageError naming the arch when no HF export exists for it."""
    if config.arch in HF_EXPORTS:
        return
    what = f"the {config.arch!r} arch"
    known = "; ".join(f"{arch}: {how}" for arch, how in HF_EXPORTS.items())
    raise UsageError(
        f"{what} has no Hugging Face export yet (model_config arch={config.arch!r})",
        f"archs that export: {known}",
    )


def require_classic(config: GPTConfig) -> None:
    """Raise a UsageError unless `config` maps onto HF NanoChat (classic arch, vocab a multiple of 64)."""
    if config.arch != "classic":
        raise UsageError(
            "only the classic arch maps onto HF transformers NanoChat",
            "HF NanoChat has no sliding windows, value embeddings, scalars, smear or backout; "
            "`nanoctl export hf` writes the current arch with remote code (to_remote_config)",
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
    return _with_special_ids(out, bos_token_id, eos_token_id)


def _with_special_ids(out: dict[str, Any], bos: int | None, eos: int | None) -> dict[str, Any]:
    # Our specials sit at the end of the vocab: HF's defaults (0/1/1) would name ordinary tokens.
    if bos is not None:
        out["bos_token_id"] = bos
    if eos is not None:
        out["eos_token_id"] = eos
        out["pad_token_id"] = eos
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


def to_remote_config(
    config: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """`config.json` for the remote-code NanoctlConfig (current or deepseek arch), with its auto_map."""
    if config.arch not in REMOTE_ARCHS:
        require_exportable(config)
        raise UsageError(f"the {config.arch!r} arch does not export through modeling_nanoctl.py")
    out: dict[str, Any] = {
        "architectures": ["NanoctlForCausalLM"],
        "model_type": "nanoctl",
        "auto_map": dict(REMOTE_AUTO_MAP),
        "arch": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,  # the dense MLP (deepseek: its first layers')
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,  # deepseek: n_head (MLA has no separate KV heads)
        "max_position_embeddings": config.sequence_len,
        "rope_theta": ROPE_BASE[config.arch],
        "window_sizes": window_sizes(config),
        "final_logit_softcapping": SOFTCAP,
        "tie_word_embeddings": False,
    }
    if config.arch == "deepseek":
        out.update(
            n_routed_experts=config.n_experts,
            num_experts_per_tok=config.top_k,
            n_shared_experts=config.n_shared_experts,
            moe_intermediate_size=config.moe_intermediate_size,
            first_k_dense_replace=config.n_dense_layers,
            kv_lora_rank=config.kv_lora_rank,
            q_lora_rank=config.q_lora_rank,
            qk_rope_head_dim=config.qk_rope_head_dim,
            qk_nope_head_dim=config.qk_nope_head_dim,
            v_head_dim=config.v_head_dim,
        )
    else:
        out.update(
            value_embed_layers=[i for i in range(config.n_layer) if has_ve(i, config.n_layer)],
            ve_gate_channels=VE_GATE_CHANNELS,
            smear_gate_channels=SMEAR_GATE_CHANNELS,
            backout_layer=config.n_layer // 2,
            qk_scale=QK_SCALE,
        )
    return _with_special_ids(out, bos_token_id, eos_token_id)


def _deepseek_layer_keys(config: GPTConfig) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for i in range(config.n_layer):
        layer = dict(_DEEPSEEK_ATTN_KEYS)
        if config.q_lora_rank:
            layer.update(_DEEPSEEK_Q_LORA_KEYS)
        if i < config.n_dense_layers:
            layer.update(_DEEPSEEK_DENSE_KEYS)
        else:
            layer.update(_DEEPSEEK_MOE_KEYS)
            if config.n_shared_experts:
                layer.update(_DEEPSEEK_SHARED_KEYS)
        mapping.update(
            {f"transformer.h.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer.items()}
        )
    return mapping


def to_remote_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """nanochat keys -> remote-code keys (current or deepseek arch). Vocab-padded tables are cropped to
    vocab_size; deepseek's training-only multi-token-prediction tensors (mtp.*) are left out.

    Every other tensor must map: one this exporter does not know (a newer variant) is refused by name
    rather than dropped, since dropping it would give a model with wrong logits.
    """
    if config.arch not in REMOTE_ARCHS:
        raise UsageError(f"the {config.arch!r} arch does not export through modeling_nanoctl.py")
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    V = config.vocab_size
    mapping = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    if config.arch == "deepseek":
        sd = {k: v for k, v in sd.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}
        mapping.update(_deepseek_layer_keys(config))
    else:
        mapping.update(_REMOTE_TOP_KEYS)
        for i in range(config.n_layer):
            for ours, theirs in _HF_LAYER_KEYS.items():
                mapping[f"transformer.h.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
            if has_ve(i, config.n_layer):
                mapping[f"transformer.h.{i}.attn.ve_gate.weight"] = (
                    f"model.layers.{i}.self_attn.ve_gate.weight"
                )
                mapping[f"value_embeds.{i}.weight"] = f"model.value_embeds.{i}.weight"
    unknown = sorted(set(sd) - set(mapping))
    if unknown:
        raise UsageError(
            f"checkpoint tensor {unknown[0]!r} (and {len(unknown) - 1} more) has no place in the HF export",
            "this checkpoint uses a feature the exporter does not know; export it with the nanoctl that made it",
        )
    missing = sorted(set(mapping) - set(sd))
    if missing:
        raise UsageError(
            f"checkpoint lacks tensor {missing[0]!r}",
            f"the checkpoint is incomplete or not {config.arch}-arch",
        )
    vocab_tables = {"transformer.wte.weight", "lm_head.weight"} | {
        k for k in mapping if k.startswith("value_embeds.")
    }
    return {theirs: sd[ours][:V] if ours in vocab_tables else sd[ours] for ours, theirs in mapping.items()}
