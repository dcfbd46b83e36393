"""Configuration of a nanoctl model exported for Hugging Face transformers (remote code).

Shipped next to modeling_nanoctl.py in every exported directory and loaded with
`trust_remote_code=True`. Self-contained: it imports only transformers, never nanoctl.
"""

from __future__ import annotations

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig


class NanoctlConfig(PreTrainedConfig):
    """A nanoctl architecture family, picked by `arch`:

    - "current": nanochat's current architecture (value embeddings, sliding windows, smear, backout,
      scalars). `window_sizes[i]`: how far back layer i's queries see (a key at distance <= window is
      visible); -1 = the whole context. `value_embed_layers`: the layers with a value embedding.
    - "deepseek": the classic trunk (no scalars, smear, backout or value embeddings) with Multi-head Latent
      Attention (`kv_lora_rank`, `q_lora_rank` (0 = no query bottleneck), `qk_rope_head_dim`,
      `qk_nope_head_dim`, `v_head_dim`) and DeepSeekMoE after the first `first_k_dense_replace` dense
      layers (`n_routed_experts`, `num_experts_per_tok`, `n_shared_experts`, `moe_intermediate_size`).
      Field names follow transformers' DeepseekV3Config.

    `arch` picks the attention/MLP classes in modeling_nanoctl.py (one entry per architecture family).
    """

    model_type = "nanoctl"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        arch: str = "current",
        vocab_size: int = 32768,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 100_000.0,
        window_sizes: list[int] | None = None,
        value_embed_layers: list[int] | None = None,
        ve_gate_channels: int = 12,
        smear_gate_channels: int = 24,
        backout_layer: int | None = None,
        qk_scale: float = 1.2,
        final_logit_softcapping: float | None = 15.0,
        n_routed_experts: int = 0,
        num_experts_per_tok: int = 0,
        n_shared_experts: int = 0,
        moe_intermediate_size: int = 0,
        first_k_dense_replace: int = 0,
        kv_lora_rank: int = 0,
        q_lora_rank: int = 0,
        qk_rope_head_dim: int = 0,
        qk_nope_head_dim: int = 0,
        v_head_dim: int = 0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.window_sizes = list(window_sizes) if window_sizes is not None else [-1] * num_hidden_layers
        self.value_embed_layers = list(value_embed_layers) if value_embed_layers is not None else []
        self.ve_gate_channels = ve_gate_channels
        self.smear_gate_channels = smear_gate_channels
        self.backout_layer = num_hidden_layers // 2 if backout_layer is None else backout_layer
        self.qk_scale = qk_scale
        self.final_logit_softcapping = final_logit_softcapping
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
