"""int8 inference on the CPU: `--quantize int8` for chat, serve and eval.

What becomes int8 (through PyTorch's own quantized modules; no kernels of ours):
- every large matrix: attention c_q/c_k/c_v/c_proj, MLP c_fc/c_proj and the lm_head, as
  `torch.ao.nn.quantized.dynamic.Linear` (int8 weights per output channel; activations stay fp32 between
  layers and are quantized per call inside fbgemm/x86's int8 GEMM, whose output is fp32);
- the token embedding and the value embeddings, as `torch.ao.nn.quantized.Embedding` (8-bit rows, one
  fp32 scale and offset per row). At d6 the embeddings are 2/3 of the weights: leaving them fp32 would
  cap the saving near 1.3x instead of ~4x.
Kept in fp32: the tiny gates (ve_gate 12 x heads, smear_gate 24 x 1) and the residual scalars, where int8
would save nothing and only add error.

Why torch.ao and not torchao: torchao 0.18's eager CPU int8 linears (Int8WeightOnly and
Int8DynamicActivationInt8Weight) measured 2-14x *slower* than fp32 at d6 shapes, where torch.ao's dynamic
linear is 2-16x faster (`python bench/quantize_bench.py --linears`, bench/RESULTS.md); torchao looks to
torch.compile (inductor) for CPU speed, which chat on a CPU does not run. `torch.ao.quantization` prints a deprecation
notice (its eager API is slated to move to torchao), but torch 2.15 still ships it and its fbgemm/x86
kernels; `quantize_model` raises a one-line error naming the missing piece if a later torch drops it.

One property to know: the dynamic int8 GEMM picks one activation scale per call, over all the rows in
it, so in a batch (serve's continuous batching, `-n` samples) a row's logits move slightly with the other
rows' activations. Greedy replies of the tests' models are unchanged; runs are reproducible for the same
batch, not bit-identical between a request served alone and next to others (fp32 is).

The fused CPU paths of the fp32 model read `.weight` tensors directly (MLP `linear_relu_square`, the
decode head, the chunked head+loss); an int8 module has no such tensor, so quantization switches the
MLPs and the model to subclasses that call the modules instead (same children, same names).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.inference_options import check_quantize
from nanoctl.model.gpt import GPT, MLP

QUANTIZABLE_ARCHS = ("current", "classic")
_LINEARS = (("attn", "c_q"), ("attn", "c_k"), ("attn", "c_v"), ("attn", "c_proj"), ("mlp", "c_fc"),
            ("mlp", "c_proj"))  # fmt: skip


def quantize_model(model: GPT, mode: str) -> GPT:
    """Quantize `model` (on the CPU, fp32, eval mode) in place for inference; returns it.

    mode "none" returns the model untouched. The result runs forward (plain, cached, ragged) and
    generation like the original; it cannot be trained or saved as a checkpoint.
    """
    check_quantize(mode, model.get_device(), model.compute_dtype)
    if mode == "none":
        return model
    if getattr(model, "quantization", "none") != "none":
        raise NanoctlError(f"the model is already quantized ({model.quantization})")  # type: ignore[attr-defined]
    if model.config.arch not in QUANTIZABLE_ARCHS:
        raise UsageError(
            f"--quantize {mode} supports the {' and '.join(QUANTIZABLE_ARCHS)} archs, not {model.config.arch!r}",
            "run this model with --quantize none",
        )
    nnq, nnqd, qconfigs = _torch_quantized()
    linear_qconfig, embedding_qconfig = qconfigs
    engine = _engine()

    def linear(module: nn.Module) -> nn.Module:
        # from_float accepts plain nn.Linear only (our Linear subclass casts dtypes, moot in fp32)
        plain = nn.Linear(module.in_features, module.out_features, bias=False)
        plain.weight = module.weight
        plain.qconfig = linear_qconfig
        return nnqd.Linear.from_float(plain)

    def embedding(module: nn.Embedding) -> nn.Module:
        module.qconfig = embedding_qconfig
        return nnq.Embedding.from_float(module)

    with warnings.catch_warnings(), torch.no_grad():
        # torch.ao's deprecation notices, once per module: known and explained in the module docstring
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated", category=UserWarning)
        previous, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
        try:
            for block in model.transformer.h:
                for parent_name, name in _LINEARS:
                    parent = getattr(block, parent_name)
                    setattr(parent, name, linear(getattr(parent, name)))
                block.mlp.__class__ = Int8MLP  # same children and keys; forward differs
            model.lm_head = linear(model.lm_head)
            model.transformer.wte = embedding(model.transformer.wte)
            if model.is_current:
                for key in list(model.value_embeds.keys()):
                    model.value_embeds[key] = embedding(model.value_embeds[key])
        finally:
            torch.backends.quantized.engine = previous
    model.__class__ = Int8GPT
    model.quantization = mode  # type: ignore[attr-defined]
    model.eval()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as stored: int8 data plus its scales and offsets, fp32 as is."""

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                n = value.numel() * value.element_size()
                if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                    return n + 16  # one float64 scale and one int64 zero point
                qparams = (value.q_per_channel_scales(), value.q_per_channel_zero_points())
                return n + sum(t.numel() * t.element_size() for t in qparams)
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        return 0  # dtype markers and the like

    return sum(size(v) for v in model.state_dict().values())


def _torch_quantized() -> tuple[Any, Any, tuple[Any, Any]]:
    """torch.ao's quantized modules and qconfigs, or a one-line error if this torch no longer has them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch.ao.nn.quantized as nnq
            import torch.ao.nn.quantized.dynamic as nnqd
            from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig
    except ImportError as e:
        raise NanoctlError(
            f"--quantize int8 needs torch.ao's quantized modules, which torch {torch.__version__} lacks ({e})",
            "install a torch that still ships torch.ao.quantization (2.15 does), or use --quantize none",
        ) from e
    return nnq, nnqd, (per_channel_dynamic_qconfig, float_qparams_weight_only_qconfig)


def _engine() -> str:
    """The quantized backend: x86 (fbgemm + oneDNN) on Intel/AMD, qnnpack on ARM."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise NanoctlError(
        f"this torch build has no int8 CPU backend (engines: {', '.join(engines) or 'none'})",
        "use --quantize none",
    )


class Int8MLP(MLP):
    """The MLP with int8 c_fc/c_proj: the plain ops (the fused CPU path multiplies c_fc.weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Int8GPT(GPT):
    """A GPT whose matrices and embeddings are int8: the head always runs as a module call."""

    def get_device(self) -> torch.device:
        return self.cos.device  # an int8 embedding's `weight` is a method, not a tensor

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)  # the decode fast path transposes lm_head.weight, which int8 lacks

    def _fused_loss(self, x: torch.Tensor, reduction: str) -> bool:
        return False  # the chunked head+loss multiplies lm_head.weight: F.cross_entropy instead

    def train(self, mode: bool = True) -> GPT:
        if mode:
            raise NanoctlError("an int8-quantized model is for inference only", "train the fp32 model")
        return super().train(False)
