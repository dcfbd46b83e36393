"""Device and precision helpers: which device, which compute dtype, what peak FLOPS for MFU.

nanochat keeps these as module globals (COMPUTE_DTYPE); nanoctl passes them explicitly so one process can
build a CPU fp32 model next to a CUDA bf16 one (tests, export) without hidden state.
"""

from __future__ import annotations

import os
import sys

import torch

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.inference_options import DTYPE_ALIASES

DTYPE_ENV = "NANOCTL_DTYPE"

_DTYPE_NAMES: dict[str, torch.dtype] = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}

# bf16 dense (no sparsity) peak FLOPS, matched by substrings of the lower-cased device name; first match
# wins, so the more specific rows come first (e.g. "h100"+"pcie" before plain "h100").
_PEAK_FLOPS_TABLE: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2.5e15),
    (("b200",), 2.25e15),
    (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12),
    (("h200", "pcie"), 836e12),
    (("h200",), 989e12),
    (("gh200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),
    (("h800", "pcie"), 756e12),
    (("h800",), 989e12),
    (("a100",), 312e12),
    (("a800",), 312e12),
    (("a40",), 149.7e12),
    (("a30",), 165e12),
    (("a10g",), 70e12),
    (("a10",), 125e12),
    (("l40s",), 362e12),
    (("l40",), 181e12),
    (("l4",), 121e12),
    (("mi355",), 2.5e15),
    (("mi325",), 1.3074e15),
    (("mi300x",), 1.3074e15),
    (("mi300a",), 980.6e12),
    (("mi250x",), 383e12),
    (("mi250",), 362.1e12),
    (("5090",), 209.5e12),
    (("4090",), 165.2e12),
    (("3090",), 71e12),
    (("v100",), 125e12),  # fp16 tensor cores (V100 has no bf16); MFU is then relative to fp16
    (("t4",), 65e12),
)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


MALLOC_ENV = "NANOCTL_MALLOC_TUNING"  # "0" leaves glibc malloc's defaults alone
_MALLOC_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in the process instead of handing them back to the kernel (glibc only).

    PyTorch's CPU allocator is plain malloc; glibc serves big blocks (activations, the (vocab x dim)
    gradient and optimizer temporaries) with fresh mmaps and unmaps them on free, so every training or
    decode step page-faults its whole working set in again. Measured here: two fresh ops over a
    50 MB tensor take 53 ms with the defaults and 7 ms with large blocks kept on the heap. Peak RSS stays
    what the step needs; idle memory is not returned until exit. Returns whether the tuning is on.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get(MALLOC_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda[:N]|mps` into a torch.device (auto: cuda > mps > cpu).

    Sets TF32 matmul precision to "high" on CUDA (nanochat does the same; fp32 matmuls are rare here);
    on a CPU, keeps freed memory for reuse (`tune_cpu_allocator`).
    """
    key = (name or "auto").strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            key = "cuda"
        elif _mps_available():
            key = "mps"
        else:
            key = "cpu"
    kind = key.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not a device", "use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise NanoctlError(
            f"--device {name}: CUDA is not available on this machine",
            "use --device auto or --device cpu (or install a CUDA build of torch)",
        )
    if kind == "mps" and not _mps_available():
        raise NanoctlError(f"--device {name}: MPS is not available on this machine", "use --device cpu")
    try:
        device = torch.device(key)
    except RuntimeError as e:
        raise UsageError(
            f"--device {name!r} is not a device ({e})", "use auto, cpu, cuda, cuda:N or mps"
        ) from e
    if kind == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NanoctlError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible",
                "pick an index below that, or check CUDA_VISIBLE_DEVICES",
            )
        if device.index is None:
            # torch.cuda.set_device / memory stats refuse an index-less device: name the current one.
            device = torch.device("cuda", torch.cuda.current_device())
        torch.set_float32_matmul_precision("high")
    elif kind == "cpu":
        tune_cpu_allocator()
    return device


def parse_dtype(name: str) -> torch.dtype:
    """`bfloat16|float16|float32` (and bf16/fp16/fp32) -> torch.dtype."""
    dtype = _DTYPE_NAMES.get(name.strip().lower())
    if dtype is None:
        raise UsageError(
            f"dtype {name!r} is not one of bfloat16, float16, float32",
            f"set {DTYPE_ENV} or --dtype to one of those",
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def compute_dtype_with_reason(
    device: torch.device | str, override: str | None = None
) -> tuple[torch.dtype, str]:
    """The activation dtype plus the one-line reason it was chosen (printed in the training banner)."""
    device = torch.device(device)
    if override:
        return parse_dtype(override), "set by argument"
    env = os.environ.get(DTYPE_ENV, "").strip()
    if env:
        return parse_dtype(env), f"set by {DTYPE_ENV}"
    if device.type == "cuda":
        major, minor = _cuda_capability(device)
        if major >= 8:
            return torch.bfloat16, f"CUDA SM{major}{minor} supports bf16"
        return torch.float32, f"CUDA SM{major}{minor} is pre-Ampere (no fast bf16)"
    return torch.float32, f"{device.type} device"


def compute_dtype(device: torch.device | str, override: str | None = None) -> torch.dtype:
    """bf16 on CUDA SM80+, fp32 elsewhere; `override` (argument) > NANOCTL_DTYPE env > auto."""
    return compute_dtype_with_reason(device, override)[0]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return "CPU"


def peak_flops_for_name(name: str) -> float | None:
    """bf16 dense peak FLOPS for a GPU name, or None when it is not in the table."""
    lowered = name.lower()
    for keys, flops in _PEAK_FLOPS_TABLE:
        if all(k in lowered for k in keys):
            return flops
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak FLOPS of one device for MFU; None on CPU/MPS/unknown GPUs (MFU is then n/a)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (for honest step timings); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def max_memory_allocated_mib(device: torch.device | str) -> float:
    """Peak allocated memory in MiB since the process started; 0 where torch does not track it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return 0.0
