"""Model definitions: the nanochat GPT (model/gpt.py). Importing this package imports torch."""

from nanoctl.model.gpt import GPT, GPTConfig, KVCache, build_model, config_for_depth

__all__ = ["GPT", "GPTConfig", "KVCache", "build_model", "config_for_depth"]
