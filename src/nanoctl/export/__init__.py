"""Model export to other formats: HF transformers (export/hf.py). Importing this package imports torch."""

from nanoctl.export.hf import from_hf_state_dict, require_classic, to_hf_config, to_hf_state_dict

__all__ = ["from_hf_state_dict", "require_classic", "to_hf_config", "to_hf_state_dict"]
