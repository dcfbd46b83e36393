"""Options that change how chat, serve and eval load a checkpoint for inference, declared once.

Torch-free at import (the CLI imports it for its help); the work is in nanoctl.model.quantize and
nanoctl.model.lora, applied in one order by `prepare_for_inference`. `--quantize` is the
first; other load-time choices shared by those commands (an adapter to mount) belong here too.
"""

from __future__ import annotations

from typing import Any

from nanoctl.errors import UsageError
from nanoctl.options import RUNTIME, option

# The dtype names every --dtype-like flag takes, alias -> torch's name. Torch-free so a CLI can check a
# flag before importing torch; nanoctl.device.parse_dtype maps them to torch dtypes.
DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}  # fmt: skip

QUANTIZE_MODES = ("none", "int8")
QUANTIZE_DEFAULT = "none"
QUANTIZE_HELP = (
    "Weights at inference: none (as trained) or int8 (CPU only: int8 linear layers and embeddings, "
    "fp32 activations; ~4x smaller, faster decode)."
)


def quantize_option(panel: str = RUNTIME) -> Any:
    """The `quantize` field of an options dataclass (chat, serve, eval base, eval chat)."""
    return option(QUANTIZE_DEFAULT, help=QUANTIZE_HELP, panel=panel)


def check_quantize(mode: str, device: Any = None, dtype: Any = None) -> None:
    """UsageError for an unknown mode, or for int8 off the CPU or with a compute dtype other than fp32.

    `device`/`dtype` may be names or torch objects; None (not resolved yet) skips that check.
    """
    if mode not in QUANTIZE_MODES:
        raise UsageError(f"--quantize {mode!r} is not a mode", f"use one of: {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return
    device_type = getattr(device, "type", None) or (None if device is None else str(device).split(":")[0])
    if device_type not in (None, "auto", "cpu"):
        raise UsageError(
            f"--quantize {mode} runs on the CPU only, not on {device}",
            "add --device cpu (on a GPU, bf16 is the fast path: leave --quantize at none)",
        )
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    if name not in (None, "float32", "fp32", "float"):
        raise UsageError(
            f"--quantize {mode} computes in float32, not --dtype {name}",
            "leave --dtype unset (or float32) with --quantize int8",
        )


def prepare_for_inference(model: Any, lora: str | None, quantize: str) -> dict[str, Any] | None:
    """Mount `lora` (merged into the weights), then quantize: the int8 weights must include the adapter.

    The one place that order lives (chat, serve and both evals load through it). Returns the adapter's
    record, or None without one.
    """
    record = None
    if lora is not None:
        from nanoctl.model.lora import mount_adapter

        record = mount_adapter(model, lora)  # merged: replies cost what the base's do
    if quantize != "none":
        from nanoctl.model.quantize import quantize_model

        quantize_model(model, quantize)
    return record


def record_name(stage: str, step: int, lora: dict[str, Any] | None, quantize: str) -> tuple[str, int]:
    """The (stage, step) an eval record is written under: `<stage>-lora` and/or `-<quantize>` suffixes, so
    the plain checkpoint's own results are never overwritten."""
    if lora is not None:
        stage, step = f"{lora.get('stage', 'peft')}-lora", int(lora.get("step", step))
    if quantize != "none":
        stage = f"{stage}-{quantize}"
    return stage, step
