"""Several LoRA adapters on one model at once, chosen per row: `nanoctl serve --lora a=DIR --lora b=DIR`.

A merged adapter (`lora.mount_adapter`) serves one adapter for free; a bank serves K of them beside the
base, in one decode batch. `mount_bank(model, entries)` wraps every matrix that any adapter targets in a
`BankedLinear`: the base module stays as it is (plain, or int8) and the K adapters are stacked under it,
A: (K+1, r, in), B: (K+1, out, r), with one scaling per adapter, so that for a row using adapter k

    y = base(x) + s[k] * B[k] (A[k] x)

for the whole batch at once, never a Python loop over rows. Which adapter each row uses is set by
`bank.select(indices)` around a forward (the scheduler: a prefill's one row, a decode step's rows in
order); -1 means the base. Three ways to compute the update, all batched matmuls:
- mixed rows, K x r <= MASKED_MAX_COLUMNS (the usual case): A of every adapter as one (K r, in) matrix,
  each row's product masked to its own adapter's r columns (times its scaling), then one matmul with B
  as (K r, out). Gathering each row's B (r x out, copied per row and step) measured 2-5x slower than
  this up to ~16 adapters of rank 16 on a CPU (K=4, r=16, 1280 -> 5120, 32 rows: 0.6 ms against 2.8);
- mixed rows, more adapters than that: each row's A and B gathered, two bmm (S-LoRA / Punica's BGMV);
- one adapter for every row over several tokens (a prefill chunk): that adapter's own A and B only.

Exactness, by construction:
- stack slot 0 is a zero adapter standing for "no adapter": -1 maps there (and to zero mask columns), so
  base rows in a mixed batch add exact zeros, and a batch of base rows only skips the update altogether;
- adapters of different ranks are padded to the largest with zero rows of A and zero columns of B: the
  padded components contribute exactly 0;
- an adapter that does not target a matrix is all zeros there too.
Each row's update reads only that row, so a row's result does not depend on its neighbours' adapters.
A banked matrix sees (rows, T, in), or the rows' tokens flattened in order (MoE's shared expert).

The matrices are found from the adapters' own tensor keys (`<module>.lora_A.weight`, as
`lora.read_adapter` returns them) with `model.get_submodule`, so any target `lora.py` writes works. The
fused CPU MLP multiplies `c_fc.weight` itself; an MLP whose `c_fc` is banked becomes `lora.AdaptedMLP`
(module calls), as `add_lora` does. MLA's kv_up is refused: its cached decode multiplies the weight
itself (the absorbed form), which one weight per row cannot follow; serve such an adapter alone (merged).
A banked matrix has no `.weight` of its own on purpose: a fused path that still read it would bypass the
adapters, and fails loudly instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoctl.errors import NanoctlError
from nanoctl.model.gpt import GPT, MLP
from nanoctl.model.lora import AdaptedMLP, LoRAConfig
from nanoctl.model.mla import MultiHeadLatentAttention

BASE = -1  # the adapter index of a row that uses none
MASKED_MAX_COLUMNS = 256  # K x r up to this: one masked matmul over every adapter, else per-row gathers


class BankEntry(NamedTuple):
    """One adapter of a bank: its name (for messages), config and our-keyed tensors (`read_adapter`)."""

    name: str
    config: LoRAConfig
    state: dict[str, torch.Tensor]


class LoRABank:
    """The K adapters mounted on a model, and which one each row of the current forward uses."""

    def __init__(self, names: list[str], modules: list[str], scaling: list[float], device: torch.device) -> None:
        self.names = names
        self.modules = modules  # dotted names of the banked matrices
        self.device = device
        self.scaling = [0.0, *scaling]  # per stack slot: slot 0 is the base's zero adapter
        self._scaling = torch.tensor(self.scaling, device=device)
        self.index: torch.Tensor | None = None  # (rows,) stack slots (adapter + 1); None: every row is base
        self.uniform: int | None = None  # the one slot every row uses, when they all use the same adapter
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    @property
    def size(self) -> int:
        return len(self.names)

    @contextlib.contextmanager
    def select(self, adapters: Sequence[int]) -> Iterator[None]:
        """Rows of the forward inside use `adapters[i]` (0..K-1, or -1 = base), in batch order."""
        bad = [a for a in adapters if not BASE <= a < self.size]
        if bad:
            raise ValueError(f"adapter index {bad[0]} is not in -1..{self.size - 1}")
        if any(a != BASE for a in adapters):
            self.index = torch.tensor([a + 1 for a in adapters], dtype=torch.long, device=self.device)
            self.uniform = adapters[0] + 1 if len(set(adapters)) == 1 else None
        try:
            yield
        finally:
            self.index, self.uniform = None, None
            self._masks.clear()

    def mask(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """(rows, K x rank): each row's adapter's scaling over that adapter's rank columns, else 0 (made
        once per forward and rank, shared by every matrix of that rank)."""
        key = (rank, dtype)
        if key not in self._masks:
            assert self.index is not None
            own = F.one_hot(self.index, self.size + 1)[:, 1:].to(dtype)  # (rows, K); base rows: all 0
            self._masks[key] = (own * self._scaling[1:].to(dtype)).repeat_interleave(rank, dim=1)
        return self._masks[key]

    def row_scaling(self, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, 1): each row's adapter's scaling (0 for the base)."""
        assert self.index is not None
        return self._scaling.to(dtype)[self.index].view(-1, 1, 1)


class BankedLinear(nn.Module):
    """A base linear layer plus K stacked adapters; each row adds its own adapter's update."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, bank: LoRABank) -> None:
        super().__init__()
        self.base = base
        slots, self.rank, self.in_features = lora_A.shape
        self.out_features = int(lora_B.size(1))
        self.register_buffer("lora_A", lora_A)  # (K+1, r, in), slot 0 zeros
        self.register_buffer("lora_B", lora_B)  # (K+1, out, r), slot 0 zeros
        self.bank = bank  # a plain object, not a child module: shared by every banked matrix
        self.masked = (slots - 1) * self.rank <= MASKED_MAX_COLUMNS
        if self.masked:  # every adapter side by side: (K r, in) and (K r, out)
            self.register_buffer("a_cat", lora_A[1:].reshape(-1, self.in_features), persistent=False)
            b_cat = lora_B[1:].transpose(1, 2).reshape(-1, self.out_features).contiguous()
            self.register_buffer("b_cat", b_cat, persistent=False)
        else:  # laid out for the per-row gathers: (K+1, in, r) and (K+1, r, out)
            self.register_buffer("a_t", lora_A.transpose(1, 2).contiguous(), persistent=False)
            self.register_buffer("b_t", lora_B.transpose(1, 2).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bank, index = self.bank, self.bank.index
        if index is None:
            return out
        rows, dtype = index.numel(), x.dtype
        # x is (rows, T, in), or rows x T tokens flattened in order (MoE's shared expert sees (rows*T, in))
        if x.size(0) % rows:
            raise ValueError(f"{rows} adapter indices for a batch of {x.size(0)} rows")
        flat = x.reshape(rows, -1, self.in_features)
        if bank.uniform is not None and flat.size(1) > 1:  # a prefill chunk: one adapter, many tokens
            k = bank.uniform
            a = flat.reshape(-1, self.in_features) @ self.lora_A[k].to(dtype).t() * bank.scaling[k]
            delta = torch.addmm(out.reshape(-1, self.out_features), a, self.lora_B[k].to(dtype).t())
        elif self.masked:
            a = (flat @ self.a_cat.to(dtype).t()) * bank.mask(self.rank, dtype).unsqueeze(1)
            delta = torch.addmm(out.reshape(-1, self.out_features), a.view(-1, a.size(-1)), self.b_cat.to(dtype))
        else:
            a = torch.bmm(flat, self.a_t[index].to(dtype)) * bank.row_scaling(dtype)
            delta = torch.baddbmm(out.reshape(rows, -1, self.out_features), a, self.b_t[index].to(dtype))
        return delta.view(out.shape)  # base + update in one op (addmm / baddbmm: out + a @ B)


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (ours, nn.Linear or an int8 one), else None."""
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (int(fin), int(fout)) if isinstance(fin, int) and isinstance(fout, int) else None


def _pairs(entry: BankEntry) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) of one adapter, each checked to be a rank-r pair."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in entry.state.items():
        module, sep, rest = key.partition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            raise NanoctlError(f"--lora {entry.name}: {key!r} is not a LoRA matrix",
                               "use an adapter written by nanoctl or PEFT (plain LoRA)")
        parts.setdefault(module, {})[rest[0]] = tensor
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise NanoctlError(f"--lora {entry.name}: {module} has lora_{''.join(ab)} without its pair",
                               "re-save the adapter")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.size(0) != b.size(1):
            raise NanoctlError(f"--lora {entry.name}: {module} has lora_A {tuple(a.shape)} and lora_B"
                               f" {tuple(b.shape)}, not (r, in) and (out, r)", "re-save the adapter")
        out[module] = (a, b)
    return out


def _target(model: GPT, name: str, owner: str) -> tuple[nn.Module, int, int]:
    """The matrix `name` an adapter targets, with its (in, out) features; NanoctlError when it cannot be."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise NanoctlError(f"--lora {owner}: the model has no matrix {name}",
                           "serve the adapter on the base model it was trained on") from None
    if isinstance(module, BankedLinear):
        raise NanoctlError("the model already carries a LoRA bank", "mount all adapters in one bank")
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, MultiHeadLatentAttention) and name.endswith(".kv_up"):
        raise NanoctlError(f"--lora {owner}: an adapter on MLA's kv_up cannot share a batch with others"
                           " (the cached decode multiplies its weight directly)",
                           "serve this adapter alone: one --lora PATH, without a NAME=")
    features = _features(module)
    if features is None:
        raise NanoctlError(f"--lora {owner}: {name} is not a linear layer", "only linear layers take LoRA")
    return module, *features


@torch.no_grad()
def mount_bank(model: GPT, entries: Sequence[BankEntry]) -> LoRABank:
    """Stack `entries` (adapter k = entries[k]) under every matrix they target; in place. The model then
    computes the base unless a forward runs inside `bank.select(...)`. Everything is checked before the
    model is touched: an error leaves it as it was."""
    if not entries:
        raise ValueError("a LoRA bank needs at least one adapter")
    device = model.get_device()
    pairs = [_pairs(e) for e in entries]
    modules = list(dict.fromkeys(m for p in pairs for m in p))
    targets = {}
    for name in modules:
        users = [(e, p[name]) for e, p in zip(entries, pairs, strict=True) if name in p]
        module, fin, fout = targets[name] = _target(model, name, users[0][0].name)
        for entry, (a, b) in users:
            if a.size(1) != fin or b.size(0) != fout:
                raise NanoctlError(
                    f"--lora {entry.name}: {name} maps {a.size(1)} -> {b.size(0)} features, the model's"
                    f" {fin} -> {fout}", "serve the adapter on the base model it was trained on",
                )  # fmt: skip
    bank = LoRABank([e.name for e in entries], modules, [e.config.scaling for e in entries], device)
    dtype = getattr(model, "compute_dtype", torch.float32)  # the activations' dtype: no cast per step
    for name in modules:
        module, fin, fout = targets[name]
        rank = max(p[name][0].size(0) for p in pairs if name in p)
        stack_a = torch.zeros(len(entries) + 1, rank, fin, device=device, dtype=dtype)
        stack_b = torch.zeros(len(entries) + 1, fout, rank, device=device, dtype=dtype)
        for k, p in enumerate(pairs, start=1):
            if name not in p:
                continue  # this adapter leaves the matrix alone: zeros
            a, b = p[name]
            stack_a[k, : a.size(0)] = a.to(device=device, dtype=dtype)  # the rest: zero padding
            stack_b[k, :, : a.size(0)] = b.to(device=device, dtype=dtype)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, BankedLinear(module, stack_a, stack_b, bank))
        if type(parent) is MLP and attr == "c_fc":
            parent.__class__ = AdaptedMLP  # the fused path would read c_fc.weight and skip the bank
    return bank
