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

arch "deepseek" (MLA + DeepSeekMoE), the same way:
- MLA's projections (q_down when present, c_q, kv_down, kv_up, c_proj), the dense first layer(s)' MLP,
  the shared expert(s)' MLP and the lm_head become int8 linears, the token embedding an int8 embedding;
- the routed experts too: each expert's two matrices, sliced from the (E, out, in) stacks, become one
  int8 dynamic linear each (`Int8MoE`: the same grouping by expert, one int8 GEMM per expert and matrix,
  the same per-output-channel scheme as every other matrix). They are most of a deepseek model's
  weights, so leaving them fp32 would keep most of it fp32;
- kept fp32: the router (E x C; its top-k is a discrete choice that int8 error could flip) and the
  routing bias; the multi-token-prediction module is dropped (training only; an int8 model cannot train);
- MLA's cached decode reads kv_up as a matrix (the absorbed form): `Int8MLA` gives it the dequantized
  int8 weight, so cached and uncached steps use the same weights (the uncached path also quantizes its
  activations per call, the cached one multiplies them in fp32: both within int8's error of fp32).
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
from nanoctl.model.mla import MultiHeadLatentAttention
from nanoctl.model.moe import MoE

QUANTIZABLE_ARCHS = ("current", "classic", "deepseek")
_ATTN_LINEARS = ("c_q", "c_k", "c_v", "c_proj")
_MLA_LINEARS = ("q_down", "c_q", "kv_down", "kv_up", "c_proj")  # q_down: None without a query bottleneck


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
            f"--quantize {mode} supports the {', '.join(QUANTIZABLE_ARCHS)} archs, not {model.config.arch!r}",
            "run this model with --quantize none",
        )
    if getattr(model, "lora_config", None) is not None:
        # the int8 copy of a LoRALinear would keep its base weight only: the adapter silently gone
        raise NanoctlError("the model carries unmerged LoRA adapters", "merge them first (mount_adapter merges)")
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

    def linears(parent: nn.Module, names: tuple[str, ...]) -> None:
        for name in names:
            if getattr(parent, name) is not None:
                setattr(parent, name, linear(getattr(parent, name)))

    def mlp(module: MLP) -> None:
        linears(module, ("c_fc", "c_proj"))
        module.__class__ = Int8MLP  # same children and keys; forward differs

    def experts(stack: torch.Tensor) -> nn.ModuleList:
        # (E, out, in) -> E int8 linears; each slice is a view that from_float packs into its own int8 copy
        rows = []
        for w in stack.detach():
            plain = nn.Linear(w.size(1), w.size(0), bias=False)
            plain.weight = nn.Parameter(w, requires_grad=False)
            rows.append(linear(plain))
        return nn.ModuleList(rows)

    with warnings.catch_warnings(), torch.no_grad():
        # torch.ao's deprecation notices, once per module: known and explained in the module docstring
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated", category=UserWarning)
        previous, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
        try:
            for block in model.transformer.h:
                if isinstance(block.attn, MultiHeadLatentAttention):
                    linears(block.attn, _MLA_LINEARS)
                    block.attn.__class__ = Int8MLA
                else:
                    linears(block.attn, _ATTN_LINEARS)
                if isinstance(block.mlp, MoE):
                    moe = block.mlp
                    moe.experts_fc, moe.experts_proj = experts(moe.w_fc), experts(moe.w_proj)
                    del moe.w_fc, moe.w_proj  # the fp32 stacks go: Int8MoE runs the int8 linears
                    if moe.shared is not None:
                        mlp(moe.shared)
                    moe.__class__ = Int8MoE
                else:
                    mlp(block.mlp)
            model.mtp = None  # multi-token prediction runs in training only
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


class Int8MLA(MultiHeadLatentAttention):
    """MLA with int8 projections: the absorbed (cached) path multiplies kv_up's dequantized int8 weight
    (rank x heads*(nope+v), unpacked per call: small next to the step's other matrices)."""

    def kv_up_weight(self) -> torch.Tensor:
        return self.kv_up.weight().dequantize()  # a dynamic int8 linear's weight() is the quantized tensor


class Int8MoE(MoE):
    """DeepSeekMoE whose routed experts are int8 linears (experts_fc[e], experts_proj[e]); same routing
    (fp32 router), same grouping of tokens by expert."""

    def _expert_outputs(self, groups: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        fc, proj = self.experts_fc, self.experts_proj
        return [proj[e](F.relu(fc[e](seg)).square()) for e, seg in enumerate(groups) if seg.size(0)]


class Int8GPT(GPT):
    """A GPT whose matrices and embeddings are int8: the head always runs as a module call."""

    def get_device(self) -> torch.device:
        return self.cos.device  # an int8 embedding's `weight` is a method, not a tensor

    def forward(self, idx: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(idx.contiguous(), *args, **kwargs)  # the int8 lookup refuses strided indices

    def _fused_loss(self, x: torch.Tensor, reduction: str) -> bool:
        return False  # the chunked head+loss multiplies lm_head.weight: F.cross_entropy instead

    def train(self, mode: bool = True) -> GPT:
        if mode:
            raise NanoctlError("an int8-quantized model is for inference only", "train the fp32 model")
        return super().train(False)
