"""`--quantize int8` on arch="deepseek" (MLA + DeepSeekMoE), nanoctl.model.quantize.

Tolerances, on tiny models (width 64, where int8 is at its coarsest), as for the dense archs in
test_quantize.py: logits within 5% of the largest fp32 logit (measured: 1.5%), greedy replies
token-identical, and on a tiny model trained on real text (a pretraining shard) the held-out loss within
2% relative (measured: 0.1%; the same tokens and bytes, so bpb moves by the same ratio).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nanoctl.engine import Engine
from nanoctl.errors import NanoctlError
from nanoctl.model.gpt import GPT, GPTConfig, build_model
from nanoctl.model.quantize import Int8GPT, Int8MLA, Int8MLP, Int8MoE, weight_bytes
from test_quantize import PROMPTS, greedy_reply, int8_copy, int8_engine_matching_fp32, scheduler_replies
from tiny_chat import (
    CONVERSATIONS,
    VOCAB,
    conversation_batch,
    prompt_for,
    random_model,
    single_thread,
    tiny_tokenizer,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def ds_config(n_embd: int = 64, **kw: object) -> GPTConfig:
    """2 layers, 2 heads, 4 routed experts top-2 + 1 shared, layer 0 dense (the deepseek defaults)."""
    base = dict(sequence_len=128, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=n_embd,
                arch="deepseek", n_experts=4, top_k=2)  # fmt: skip
    return GPTConfig(**(base | kw))  # type: ignore[arg-type]


def train(model: GPT, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 16) -> GPT:
    """AdamW over the rows in turn, `batch` at a time, with the framework's routing-bias step after each."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(steps):
        i = step * batch % len(x)
        loss = model(x[i : i + batch], targets=y[i : i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_optimizer_step()
    return model.eval()


@functools.cache
def chat_model() -> GPT:
    """A deepseek model that memorized tiny_chat's CONVERSATIONS: greedy decoding reproduces them."""
    x, y = conversation_batch(CONVERSATIONS)
    torch.manual_seed(0)
    with single_thread():
        return train(build_model(ds_config(), "cpu", torch.float32), x, y, steps=100)


# -- the model ---------------------------------------------------------------------------------------------


def test_int8_logits_are_close_and_every_matrix_but_the_router_is_int8() -> None:
    model = chat_model()
    q = int8_copy(model)
    assert isinstance(q, Int8GPT) and all(isinstance(b.attn, Int8MLA) for b in q.transformer.h)
    assert isinstance(q.transformer.h[0].mlp, Int8MLP) and isinstance(q.transformer.h[1].mlp, Int8MoE)
    assert isinstance(q.transformer.h[1].mlp.shared, Int8MLP) and len(q.transformer.h[1].mlp.experts_fc) == 4
    plain = [n for n, m in q.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert plain == ["transformer.h.1.mlp.router"], plain  # the router stays fp32; so do no other matrices
    matrices = [n for n, p in q.named_parameters() if p.dim() > 1]
    assert matrices == ["transformer.h.1.mlp.router.weight"], matrices  # the expert stacks are gone
    tok = tiny_tokenizer()
    ids = torch.tensor([tok.render_conversation(c)[0] for c in CONVERSATIONS[:1]])
    with torch.inference_mode():
        want, got = model(ids), q(ids)
        cache = q.new_kv_cache(1, ids.size(1))
        cached = torch.cat([q(ids[:, :10], kv_cache=cache)] + [q(ids[:, t : t + 1], kv_cache=cache)
                                                                for t in range(10, ids.size(1))], dim=1)  # fmt: skip
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert 0 < err < 0.05, err  # really quantized (not identical), and close
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    # the cached path reads kv_up's int8 weight dequantized (Int8MLA): within int8's error as well
    cached_err = (cached - want).abs().max().item() / want.abs().max().item()
    assert cached_err < 0.05, cached_err


def test_held_out_loss_on_real_text_within_2_percent(shared_data: Path) -> None:
    """A tiny deepseek LM trained for a moment on a pretraining shard: int8 moves its held-out loss (and
    so its bpb: same tokens, same bytes) by under 2% (measured: about 0.1%)."""
    import pyarrow.parquet as pq

    texts = pq.ParquetFile(shared_data / "pretrain" / "shard_00000.parquet").read_row_group(0, columns=["text"])
    ids = tiny_tokenizer().encode(" ".join(t.as_py() for t in texts.column("text")[:4]))[: 256 * 65]
    rows = torch.tensor(ids).view(-1, 65)  # 248 rows of 65 tokens to train on, 8 (512 targets) held out
    train_rows, val_rows = rows[:248], rows[248:]
    torch.manual_seed(0)
    model = train(build_model(ds_config(), "cpu", torch.float32), train_rows[:, :-1], train_rows[:, 1:], steps=60)
    q = int8_copy(model)
    with torch.inference_mode():
        fp32 = model(val_rows[:, :-1].contiguous(), targets=val_rows[:, 1:].contiguous()).item()
        int8 = q(val_rows[:, :-1], targets=val_rows[:, 1:]).item()  # strided views: Int8GPT copies them
    assert fp32 < 0.65 * torch.log(torch.tensor(float(VOCAB))).item()  # it learned something (uniform: 5.77)
    assert int8 != fp32 and abs(int8 / fp32 - 1) < 0.02, (fp32, int8)


def test_weights_shrink_3_4x_and_the_experts_are_most_of_it() -> None:
    """State bytes (int8 data + per-row scales) at width 128: >= 3.4x smaller. With the routed experts left
    fp32 the ratio would be about 2x: they are most of a deepseek model."""
    model = random_model(ds_config(n_embd=128), scale=0.02)
    fp32 = weight_bytes(model)
    assert fp32 == sum(t.numel() * 4 for t in model.state_dict().values())
    q = int8_copy(model)
    ratio = fp32 / weight_bytes(q)
    expert_bytes = sum(t.numel() * 4 for n, t in model.state_dict().items() if n.endswith(("w_fc", "w_proj")))
    int8_experts = sum(weight_bytes(m.experts_fc) + weight_bytes(m.experts_proj)
                       for m in q.modules() if isinstance(m, Int8MoE))  # fmt: skip
    without = fp32 / (weight_bytes(q) - int8_experts + expert_bytes)
    print(f"state bytes: fp32 {fp32}, int8 {weight_bytes(q)} ({ratio:.2f}x); experts fp32: {without:.2f}x")
    assert ratio >= 3.4, ratio
    assert without < 2.5, without


def test_engine_replies_match_fp32() -> None:
    int8_engine_matching_fp32(chat_model(), tiny_tokenizer())


def test_continuous_batching_scheduler_serves_the_int8_model() -> None:
    model, tok = chat_model(), tiny_tokenizer()
    want = [greedy_reply(Engine(model, tok), prompt_for(t)) for t in PROMPTS]
    got = scheduler_replies(int8_copy(model), PROMPTS * 2)  # 6 requests on 4 rows: ragged MLA decode
    assert [g[: len(w)] for g, w in zip(got, want * 2, strict=True)] == want * 2


def test_bottleneck_and_mtp_variant_and_adapters(tmp_path: Path) -> None:
    """A query bottleneck (q_down) is int8 too, the training-only MTP module is dropped; an adapter is
    quantized with the weights once merged (mount_adapter's default) and refused while unmerged."""
    from nanoctl.model.lora import add_lora, lora_parameters, make_config, merge_lora

    model = random_model(ds_config(q_lora_rank=24, mtp_depth=1), scale=0.1)
    q = int8_copy(model)
    assert q.mtp is None and not isinstance(q.transformer.h[0].attn.q_down, nn.Linear)
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = model(x), q(x)
    assert (got - want).abs().max().item() / want.abs().max().item() < 0.05

    add_lora(model, make_config(4, None, 0.0, "all", "deepseek"))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.05)
    with pytest.raises(NanoctlError, match="unmerged LoRA adapters"):
        int8_copy(model)
    with torch.inference_mode():
        adapted = model(x)
        merged = int8_copy(merge_lora(model))(x)
    assert (adapted - want).abs().max() > 1e-2  # the adapter matters...
    assert (merged - adapted).abs().max().item() / adapted.abs().max().item() < 0.05  # ...and int8 kept it
