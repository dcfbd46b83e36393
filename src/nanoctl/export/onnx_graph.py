"""The export-only decoder that `nanoctl export onnx` traces: our GPT's math with the KV cache made explicit.

One graph serves prefill and decode. Inputs: `input_ids` (batch, seq) and, per layer, `past_key_<i>` /
`past_value_<i>` (batch, kv_heads, past, head_dim); the current arch adds `past_smear` (batch, 1, n_embd),
the previous token's normalized embedding that smear mixes in. Outputs: `logits` (batch, seq, vocab;
softcapped fp32, as GPT.forward) and `present_*` for every `past_*` (the caches with this chunk appended).
The position offset is the past length, so a fresh sequence starts from zero-length caches and a zero
smear state (a zero previous embedding leaves position 0 unmixed, exactly as GPT._smear does).

Attention is written out (matmul, mask, softmax) instead of SDPA so GQA, the per-layer sliding window and
the offset mask export as plain ONNX ops; the caches keep every position (windowed layers mask, they do
not trim), like our KVCache. The weights are the GPT's own parameters, so the graph stores them once.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanoctl.model.gpt import (
    GPT,
    SMEAR_GATE_CHANNELS,
    SOFTCAP,
    VE_GATE_CHANNELS,
    apply_rotary_emb,
    norm,
)

BATCH, PAST, SEQ = "batch", "past_sequence", "sequence"  # dimension names the runner reads


def state_names(model: GPT) -> list[str]:
    """The recurrent state, in graph order: past_key_0, past_value_0, ..., then past_smear (current)."""
    names = [f"past_{kind}_{i}" for i in range(model.config.n_layer) for kind in ("key", "value")]
    return [*names, "past_smear"] if model.is_current else names


def output_names(model: GPT) -> list[str]:
    return ["logits"] + [name.replace("past_", "present_", 1) for name in state_names(model)]


def empty_state(model: GPT, batch: int = 1, past: int = 0) -> list[torch.Tensor]:
    """Zero state: a fresh sequence (past=0), or an example of `past` cached positions for tracing."""
    cfg = model.config
    kv = torch.zeros(batch, cfg.n_kv_head, past, cfg.head_dim)
    state = [kv.clone() for _ in range(2 * cfg.n_layer)]
    if model.is_current:
        state.append(torch.zeros(batch, 1, cfg.n_embd))
    return state


class OnnxDecoder(nn.Module):
    """GPT.forward for one chunk after `past` cached positions, with the cache as tensors in and out."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_layer = cfg.n_layer
        self.current = model.is_current
        self.windows = list(model.window_sizes)
        self.vocab_size = cfg.vocab_size

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        B, T = input_ids.shape
        past = state[0].shape[2]
        positions = torch.arange(T, device=input_ids.device) + past
        cos = m.cos[:, positions]  # (1, T, 1, D/2)
        sin = m.sin[:, positions]
        keys_pos = torch.arange(T + past, device=input_ids.device)
        distance = positions.unsqueeze(1) - keys_pos.unsqueeze(0)  # (T, past+T): query minus key position

        x = norm(m.transformer.wte(input_ids).float())
        presents: list[torch.Tensor] = []
        if self.current:
            prev = state[-1]
            lam = m.smear_lambda
            gate = lam * torch.sigmoid(m.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
            shifted = torch.cat([prev, x[:, :-1]], dim=1)
            smear_out = x[:, -1:]
            x = x + gate * shifted
        x0 = x
        backout_layer = self.n_layer // 2
        x_backout = None
        for i, block in enumerate(m.transformer.h):
            if self.current:
                x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
            ve = m.value_embeds[str(i)](input_ids) if self.current and str(i) in m.value_embeds else None
            attn_out, k, v = self._attention(block.attn, norm(x), ve, cos, sin, distance, i, state)
            presents += [k, v]
            x = x + attn_out
            x = x + block.mlp.c_proj(torch.relu(block.mlp.c_fc(norm(x))).square())
            if self.current and i == backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - m.backout_lambda * x_backout
        logits = m.lm_head(norm(x))[..., : self.vocab_size]
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if self.current:
            presents.append(smear_out)
        return (logits, *presents)

    def _attention(
        self,
        attn: nn.Module,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        distance: torch.Tensor,
        i: int,
        state: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
        q = attn.c_q(x).view(B, T, H, D)
        k = attn.c_k(x).view(B, T, Hkv, D)
        v = attn.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            gate = 3 * torch.sigmoid(attn.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        k = torch.cat([state[2 * i], k.transpose(1, 2)], dim=2)  # (B, Hkv, past+T, D)
        v = torch.cat([state[2 * i + 1], v.transpose(1, 2)], dim=2)
        rep = H // Hkv
        keys = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        values = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) * attn.softmax_scale
        visible = distance >= 0
        if self.windows[i] >= 0:
            visible = visible & (distance <= self.windows[i])
        scores = scores.masked_fill(~visible, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return attn.c_proj(y), k, v
