"""Model definitions; importing this package imports torch.

- gpt.py: the nanochat GPT architecture and its config (GPTConfig, GPT, build_model, config_for_depth)
- attention.py: attention backend selection (FA3/FA2, FlexAttention, SDPA) and the kernels' call sites
- kernels.py: fused CPU eager paths (softcap cross-entropy, ReLU^2 MLP half, decode-step lm_head)
- kv_cache.py: KVCache for incremental decoding
HF transformers conversion is in nanoctl.export.
"""

from nanoctl.model.gpt import GPT, GPTConfig, build_model, config_for_depth
from nanoctl.model.kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "build_model", "config_for_depth"]
