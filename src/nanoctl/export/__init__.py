"""Model export to other formats: HF transformers (export/hf.py, hf_export.py; the tokenizer.json conversion is nanoctl/tokenizer_json.py).

Importing this package is light; the torch-using names below are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "from_hf_state_dict",
    "require_classic",
    "require_exportable",
    "to_hf_config",
    "to_hf_state_dict",
    "to_remote_config",
    "to_remote_state_dict",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nanoctl.export import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'nanoctl.export' has no attribute {name!r}")
