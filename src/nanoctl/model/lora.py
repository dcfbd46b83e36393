"""LoRA: low-rank adapters on the block matrices, saved in PEFT's file format.

`add_lora(model, config)` replaces the targeted `Linear`s of every block with `LoRALinear`s that keep the
base weight (same parameter, same state-dict key) and add `lora_A` (r x in, Kaiming-uniform as PEFT) and
`lora_B` (out x r, zeros), so a fresh adapter changes nothing: y = W x + (alpha / r) B A dropout(x).
Everything else is frozen; `lora_parameters` are the only trainable tensors.

Targets (`--lora-targets`) depend on the arch (`ARCH_TARGETS`):
- current/classic: q, k, v, proj (attention output), fc (MLP up), mlp_proj (MLP down);
- deepseek (MLA + DeepSeekMoE): q (the query projection, and its down-projection when the model has a
  query bottleneck), kv_down (MLA's joint KV down-projection, latent + rope key), kv_up (the latent's
  up-projection to per-head keys and values), proj (attention output), fc / mlp_proj (up / down of the
  dense first layer(s)' MLP and of the MoE layers' shared expert(s)).
`all` is every target of the model's arch. In a deepseek model the router and the routed experts stay
frozen and unadapted: the experts are (E, out, in) Parameter stacks, not Linear modules, which PEFT's
module-based LoRA cannot address (its files could not carry them), and a per-expert update on a matrix
PEFT cannot rebuild would lose the exact merge and round trip. Training a LoRA on a deepseek model also
freezes the routing bias (its balancing step is off): the bias is part of the base, which the adapter
files do not carry.

MLA's cached decode multiplies kv_up's weight as a matrix (the absorbed form, model/mla.py); while an
adapter on kv_up is unmerged (training, RL's sampling, `mount_adapter(merge=False)`) the attention runs as
`AdaptedMLA`, whose weight there is W + (alpha / r) B A, the map the uncached path applies.

Files (an adapter directory): `adapter_config.json` + `adapter_model.safetensors`, PEFT's LoRA format
with the module names of `nanoctl export hf` (transformers' NanoChat, or the deepseek remote code's
q_proj / q_a_proj / q_b_proj / kv_a_proj_with_mqa / kv_b_proj / o_proj / mlp.fc1 / mlp.shared_experts.fc1
...), e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export_dir), adapter_dir)` applies it.

Why not `peft` itself: it is an optional extra, and its wrapper moves the base weight to
`c_q.base_layer.weight`, which breaks our checkpoint keys and the fused CPU MLP path. The layer here is
a few lines and writes the same files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoctl.adapters import RECORD_FILE  # ours beside PEFT's files: base checkpoint, stage, step
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.model.gpt import GPT, MLP, Linear
from nanoctl.model.mla import MultiHeadLatentAttention

# target name -> (our module under transformer.h.<i>, transformers NanoChat's module under model.layers.<i>)
TARGETS: dict[str, tuple[str, str]] = {
    "q": ("attn.c_q", "self_attn.q_proj"),
    "k": ("attn.c_k", "self_attn.k_proj"),
    "v": ("attn.c_v", "self_attn.v_proj"),
    "proj": ("attn.c_proj", "self_attn.o_proj"),  # attention output projection
    "fc": ("mlp.c_fc", "mlp.fc1"),  # MLP up projection
    "mlp_proj": ("mlp.c_proj", "mlp.fc2"),  # MLP down projection
}
# arch -> target name -> the (ours, export hf's) module pairs it covers in a block; a block adapts the
# ones it has (deepseek: the dense layers have mlp.c_fc, the MoE layers mlp.shared.c_fc).
ARCH_TARGETS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "current": {t: (pair,) for t, pair in TARGETS.items()},
    "classic": {t: (pair,) for t, pair in TARGETS.items()},
    "deepseek": {
        # q_down exists only with a query bottleneck (q_lora_rank); c_q is then export hf's q_b_proj
        "q": (("attn.q_down", "self_attn.q_a_proj"), ("attn.c_q", "self_attn.q_proj")),
        "kv_down": (("attn.kv_down", "self_attn.kv_a_proj_with_mqa"),),  # latent + rope key
        "kv_up": (("attn.kv_up", "self_attn.kv_b_proj"),),  # latent -> per-head keys and values
        "proj": (("attn.c_proj", "self_attn.o_proj"),),
        "fc": (("mlp.c_fc", "mlp.fc1"), ("mlp.shared.c_fc", "mlp.shared_experts.fc1")),
        "mlp_proj": (("mlp.c_proj", "mlp.fc2"), ("mlp.shared.c_proj", "mlp.shared_experts.fc2")),
    },
}
# Module names both ways, over every arch (the same module has the same name and target everywhere).
_PAIRS = [(t, ours, hf) for table in ARCH_TARGETS.values() for t, pairs in table.items() for ours, hf in pairs]
_OURS_TO_HF = {ours: hf for _, ours, hf in _PAIRS}
_HF_TO_OURS = {hf: ours for _, ours, hf in _PAIRS} | {"self_attn.q_b_proj": "attn.c_q"}
_TARGET_OF = {ours: t for t, ours, _ in _PAIRS}
# every arch's target names, in an order each arch's own order is a subsequence of (read_adapter's order)
_ALL_NAMES = ("q", "k", "v", "kv_down", "kv_up", "proj", "fc", "mlp_proj")
DEFAULT_TARGETS = "all"  # every block matrix (QLoRA's finding: adapting all of them works best)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    def peft_config(self, target_modules: Iterable[str] | None = None) -> dict[str, Any]:
        """adapter_config.json as PEFT writes it for a plain LoRA (no rslora/dora, no bias, no saved modules).

        `target_modules`: export hf's module names adapted (save_adapter passes the ones the model has);
        unset, they follow from the targets' names."""
        if target_modules is None:
            target_modules = {_OURS_TO_HF[ours] for t, ours, _ in _PAIRS if t in self.targets}
            target_modules = {m for m in target_modules if m != "self_attn.q_a_proj"}  # bottleneck only
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": sorted({m.split(".")[-1] for m in target_modules}),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None,
            "revision": None,
        }


def parse_targets(text: str, flag: str = "--lora-targets", arch: str | None = None) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'); an unknown or empty name is a UsageError naming the flag.

    `arch` set: the names that arch has (`all` = every one of them); unset: any arch's names, and `all`
    the dense archs' six."""
    table = ARCH_TARGETS.get(arch or "current")
    if table is None:
        raise UsageError(f"LoRA supports the {', '.join(ARCH_TARGETS)} archs, not {arch!r}",
                         "fine-tune this model without --lora-rank")
    known = tuple(table) if arch else _ALL_NAMES
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("all",):
        names = tuple(table)
    bad = [t for t in names if t not in known]
    if bad or not names:
        got = ", ".join(bad) if bad else "nothing"
        what = f"a LoRA target of the {arch} arch" if arch else "a LoRA target"
        raise UsageError(f"{flag} {text!r}: {got} is not {what}",
                         f"use all or a comma-separated subset of {', '.join(known)} (e.g. {flag} q,v)")
    return tuple(dict.fromkeys(names))


def make_config(rank: int, alpha: float | None, dropout: float, targets: str, arch: str | None = None) -> LoRAConfig:
    """A checked config from the CLI's values (alpha None = 2 x rank, PEFT's usual choice); `arch`: the
    base model's, which decides what the targets (and `all`) may name."""
    if rank < 1:
        raise UsageError(f"--lora-rank {rank} must be >= 1 (0 = full fine-tuning)")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--lora-dropout {dropout} must be in [0, 1)")
    alpha = float(2 * rank if alpha is None else alpha)
    if alpha <= 0:
        raise UsageError(f"--lora-alpha {alpha} must be > 0")
    return LoRAConfig(rank, alpha, dropout, parse_targets(targets, arch=arch))


class LoRALinear(Linear):
    """A frozen base `Linear` plus a trainable low-rank update, PEFT's layout (lora_A, lora_B)."""

    def __init__(self, base: Linear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)  # not Linear.__init__: the base weight is reused, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = None
        device = base.weight.device
        # fp32 like our master weights; forward casts to the activation dtype as Linear does
        self.lora_A = nn.Linear(self.in_features, config.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(dtype=x.dtype))
        a = F.linear(self.lora_dropout(x), self.lora_A.weight.to(dtype=x.dtype))
        return out + F.linear(a, self.lora_B.weight.to(dtype=x.dtype)) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to the weight: scaling x B A (fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


class AdaptedMLP(MLP):
    """The MLP while its c_fc carries an adapter: the fused CPU path reads c_fc.weight alone, so this one
    runs the plain ops (merge_lora turns it back into an MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class AdaptedMLA(MultiHeadLatentAttention):
    """MLA while its kv_up carries an adapter: the cached (absorbed) path multiplies kv_up's weight as a
    matrix, so it gets W + scaling B A, what the uncached path's kv_up(latent) applies (differentiable:
    RL samples with the adapters it trains)."""

    def kv_up_weight(self) -> torch.Tensor:
        kv_up: LoRALinear = self.kv_up  # type: ignore[assignment]
        return kv_up.weight + kv_up.delta().to(kv_up.weight.dtype)


# adapted module class -> the plain one merge_lora restores (same children and keys; only forward differs)
_PLAIN_CLASS: dict[type, type] = {AdaptedMLP: MLP, AdaptedMLA: MultiHeadLatentAttention}


def _modules(model: GPT, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, str, str]]:
    """(parent module, attribute, our dotted module name, target) for every targeted matrix of every block."""
    table = ARCH_TARGETS[model.config.arch]
    out = []
    for i, block in enumerate(model.transformer.h):
        for t in targets:
            for ours, _ in table[t]:
                parent_name, _, attr = ours.rpartition(".")
                try:
                    parent = block.get_submodule(parent_name)
                except AttributeError:
                    continue  # e.g. mlp.shared in a dense layer
                if isinstance(getattr(parent, attr, None), Linear):
                    out.append((parent, attr, f"transformer.h.{i}.{ours}", t))
    return out


def add_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Adapters on the targeted matrices; every other parameter frozen. In place; returns the model."""
    arch = model.config.arch
    table = ARCH_TARGETS.get(arch)
    if table is None:
        raise UsageError(f"LoRA supports the {', '.join(ARCH_TARGETS)} archs, not {arch!r}",
                         "fine-tune this model without --lora-rank")
    lacking = [t for t in config.targets if t not in table]
    if lacking:
        raise UsageError(f"--lora-targets {','.join(config.targets)}: the {arch} arch has no {', '.join(lacking)}"
                         " matrix", f"use all or a comma-separated subset of {', '.join(table)}")
    modules = _modules(model, config.targets)
    empty = [t for t in config.targets if not any(m[3] == t for m in modules)]
    if empty and set(config.targets) != set(table):  # `all`: what the model has (a deepseek may lack MLPs)
        raise UsageError(f"--lora-targets {','.join(config.targets)}: no block of this {arch} model has a"
                         f" {', '.join(empty)} matrix", f"leave {', '.join(empty)} out of --lora-targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, _, _ in modules:
        base = getattr(parent, attr)
        if isinstance(base, LoRALinear):
            raise NanoctlError("the model already carries LoRA adapters", "merge them first (merge_lora)")
        setattr(parent, attr, LoRALinear(base, config))
        if isinstance(parent, MLP) and attr == "c_fc":
            parent.__class__ = AdaptedMLP
        elif isinstance(parent, MultiHeadLatentAttention) and attr == "kv_up":
            parent.__class__ = AdaptedMLA
    if arch == "deepseek":
        from nanoctl.model.deepseek import moe_layers

        for moe in moe_layers(model):
            moe.bias_update_rate = 0.0  # the routing bias is base: frozen with it (the files cannot carry it)
    model.lora_config = config  # type: ignore[attr-defined]
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our key names (what a LoRA run's checkpoints hold)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_adapter_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load adapter tensors into a model carrying adapters; every adapter key must be present, nothing else."""
    own = adapter_state_dict(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise NanoctlError(
            f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}",
            "use the adapter with the base model (and --lora-targets) it was trained with",
        )
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight (W += scaling B A) and drop the adapters. In place."""
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        parent_name, _, attr = module_name.rpartition(".")
        merged = Linear(module.in_features, module.out_features, bias=False, device=module.weight.device,
                        dtype=module.weight.dtype)
        merged.weight.copy_((module.weight.float() + module.delta()).to(module.weight.dtype))
        merged.weight.requires_grad_(module.weight.requires_grad)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, merged)
        if type(parent) in _PLAIN_CLASS:
            parent.__class__ = _PLAIN_CLASS[type(parent)]  # back on the fused CPU paths
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------------------------------------
# PEFT's file format


def _hf_name(ours: str, bottleneck: bool) -> str:
    """transformer.h.3.attn.c_q -> model.layers.3.self_attn.q_proj (export hf's module names); c_q is
    q_b_proj in a deepseek layer with a query bottleneck (`bottleneck`)."""
    parts = ours.split(".")
    layer, module = parts[2], ".".join(parts[3:])
    hf = "self_attn.q_b_proj" if bottleneck and module == "attn.c_q" else _OURS_TO_HF[module]
    return f"model.layers.{layer}.{hf}"


def to_peft_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter keys -> PEFT's (base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight)."""
    # target q adapts q_down and c_q together, so a layer's q_down adapter marks its query bottleneck
    bottleneck = {key.split(".")[2] for key in state if ".attn.q_down.lora_" in key}
    out = {}
    for key, value in state.items():
        module, _, rest = key.partition(".lora_")
        out[f"{PEFT_PREFIX}{_hf_name(module, module.split('.')[2] in bottleneck)}.lora_{rest}"] = value
    return out


def from_peft_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's adapter keys -> ours (the inverse of to_peft_state_dict)."""
    out = {}
    for key, value in state.items():
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        # model.layers.<i>.<module path>.lora_<A|B>[.default].weight
        ab = next((j for j, p in enumerate(parts) if p.startswith("lora_")), len(parts))
        module = ".".join(parts[3:ab])
        if (parts[:2] != ["model", "layers"] or len(parts) < 7 or not parts[2].isdigit()
                or module not in _HF_TO_OURS or parts[ab] not in ("lora_A", "lora_B")):
            raise NanoctlError(
                f"adapter tensor {key!r} is not a LoRA matrix of a NanoChat block",
                "only adapters on q/k/v/o_proj and fc1/fc2 (deepseek: q_a/q_b_proj, kv_a_proj_with_mqa,"
                " kv_b_proj, shared_experts.fc1/fc2), without modules_to_save, can be mounted",
            )
        out[f"transformer.h.{parts[2]}.{_HF_TO_OURS[module]}.{parts[ab]}.weight"] = value
    return out


def save_adapter(directory: str | Path, model: GPT, extra: dict[str, Any] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (atomically) for the model's adapters."""
    from safetensors.torch import save_file

    from nanoctl.atomic import atomic_path, atomic_write_json

    config: LoRAConfig = model.lora_config  # type: ignore[assignment]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in to_peft_state_dict(adapter_state_dict(model)).items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    modules = {k.partition(".lora_")[0].rpartition(".")[2] for k in tensors}  # q_proj, kv_b_proj, fc1, ...
    atomic_write_json(directory / CONFIG_FILE, config.peft_config(modules))
    atomic_write_json(directory / RECORD_FILE, extra or {})
    return directory


def read_adapter(directory: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, our-keyed tensors, nanoctl's own record) of an adapter directory in PEFT's format."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise NanoctlError(f"--lora {directory}: no {CONFIG_FILE} + {WEIGHTS_FILE} there",
                           "pass an adapter directory written by `nanoctl sft --lora-rank R` (or by PEFT)")
    try:
        raw = json.loads(cfg_path.read_text())
        if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora") or raw.get("use_rslora"):
            raise ValueError("only plain LoRA adapters (no DoRA/rsLoRA) are supported")
        if raw.get("rank_pattern") or raw.get("alpha_pattern"):
            raise ValueError("per-module rank/alpha patterns are not supported")
        rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
        state = from_peft_state_dict(load_file(str(weights)))
    except (ValueError, KeyError, OSError) as e:
        raise NanoctlError(f"--lora {directory}: unreadable adapter ({e})", "re-save it with PEFT or nanoctl") from e
    found = {_TARGET_OF[".".join(k.partition(".lora_")[0].split(".")[3:])] for k in state}
    targets = tuple(t for t in _ALL_NAMES if t in found)
    if not targets:
        raise NanoctlError(f"--lora {directory}: the adapter holds no LoRA matrix", "check the directory")
    record = directory / RECORD_FILE
    extra = json.loads(record.read_text()) if record.is_file() else {}
    return LoRAConfig(rank, alpha, float(raw.get("lora_dropout") or 0.0), targets), state, extra


def mount_adapter(model: GPT, directory: str | Path, merge: bool = True) -> dict[str, Any]:
    """Apply an adapter directory to `model` (merged into the weights by default: inference costs nothing
    extra). Returns nanoctl's record of the adapter plus its config."""
    config, state, extra = read_adapter(directory)
    n_layer, arch = model.config.n_layer, model.config.arch
    layers = {int(k.split(".")[2]) for k in state}
    if layers and max(layers) >= n_layer:
        raise NanoctlError(f"--lora {directory}: the adapter has layer {max(layers)}, the model {n_layer} layers",
                           "mount it on the base model it was trained on")
    foreign = [t for t in config.targets if t not in ARCH_TARGETS.get(arch, {})]
    if foreign:
        raise NanoctlError(f"--lora {directory}: the adapter adapts {', '.join(foreign)}, which a {arch} model lacks",
                           "mount it on the base model it was trained on")
    add_lora(model, config)
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        own = params.get(name)  # a name the model lacks: load_adapter_state lists it
        if own is not None and own.shape != tensor.shape:
            raise NanoctlError(
                f"--lora {directory}: {name} is {tuple(tensor.shape)}, the model wants {tuple(own.shape)}",
                "mount it on the base model it was trained on",
            )
    load_adapter_state(model, {k: v.to(model.get_device()) for k, v in state.items()})
    if merge:
        merge_lora(model)
    return {**extra, "path": str(Path(directory).expanduser()), **config.to_dict()}
