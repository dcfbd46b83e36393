"""The LoRA bank (model/lora_bank.py): K adapters stacked per matrix, one adapter index per row.

Checked against the real thing: each row of a mixed batch (several adapters and the base) equals that
row run through its own merged model (`lora.merge_lora`); rank padding changes nothing; index -1 is the
base bit for bit; the fused CPU MLP does not bypass an adapter on c_fc; a ragged decode step (serve's
continuous batching) gives each row its adapter; bad adapters and indices are one clear error.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from nanoctl.errors import NanoctlError  # noqa: E402
from nanoctl.model import lora_bank  # noqa: E402
from nanoctl.model.gpt import GPTConfig  # noqa: E402
from nanoctl.model.lora import (  # noqa: E402
    AdaptedMLP,
    adapter_state_dict,
    add_lora,
    lora_parameters,
    make_config,
    merge_lora,
)
from nanoctl.model.lora_bank import BankedLinear, BankEntry, mount_bank  # noqa: E402
from tiny_chat import VOCAB, random_model, single_thread  # noqa: E402

T = 12  # tokens per row


def tiny(arch: str = "current", n_embd: int = 64, seed: int = 0) -> Any:
    moe = {"n_experts": 4, "top_k": 2} if arch == "deepseek" else {}  # layer 0 dense, layer 1 MoE
    cfg = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=n_embd,
                    arch=arch, window_pattern="SL", **moe)  # type: ignore[arg-type]  # fmt: skip
    return random_model(cfg, seed=seed, scale=0.1)


def make_adapter(base: Any, name: str, rank: int, targets: str, seed: int) -> tuple[BankEntry, Any]:
    """(bank entry, the base with this adapter merged in): random A and B, so the update is visible."""
    model = copy.deepcopy(base)
    add_lora(model, make_config(rank, None, 0.0, targets, arch=base.config.arch))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    entry = BankEntry(name, model.lora_config, {k: v.clone() for k, v in adapter_state_dict(model).items()})
    return entry, merge_lora(model).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    with single_thread():
        yield


# per arch: (targets of three adapters). deepseek: no kv_up (refused, see the last test); its fc and
# mlp_proj cover the dense MLP and the MoE layer's shared expert, which sees (rows x T) flattened tokens
ADAPTERS = {"current": ("all", "q,v", "fc,mlp_proj"), "classic": ("all", "q,v", "fc,mlp_proj"),
            "deepseek": ("q,kv_down,proj,fc,mlp_proj", "q,kv_down", "fc,mlp_proj")}  # fmt: skip


@pytest.fixture(scope="module", params=list(ADAPTERS))
def setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    base = tiny(request.param)
    first, second, third = ADAPTERS[request.param]
    made = [
        make_adapter(base, "all4", 4, first, seed=1),  # (nearly) every matrix, fc: the fused MLP path
        make_adapter(base, "qv2", 2, second, seed=2),  # another rank, fewer targets
        make_adapter(base, "mlp8", 8, third, seed=3),
    ]
    banked = copy.deepcopy(base)
    bank = mount_bank(banked, [e for e, _ in made])
    return {"base": base, "banked": banked, "bank": bank, "merged": [m for _, m in made],
            "entries": [e for e, _ in made]}  # fmt: skip


def test_mixed_batch_equals_each_rows_merged_model(setup: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    adapters = [0, -1, 1, 2, 0, 2, -1]
    ids = torch.randint(0, VOCAB, (len(adapters), T), generator=g)
    with torch.no_grad(), setup["bank"].select(adapters):
        got = setup["banked"](ids)
    with torch.no_grad():
        for row, k in enumerate(adapters):
            ref = (setup["base"] if k < 0 else setup["merged"][k])(ids[row : row + 1])[0]
            torch.testing.assert_close(got[row], ref, rtol=0, atol=1e-5)
            if k >= 0:  # and the adapter really changed this row
                assert (ref - setup["base"](ids[row : row + 1])[0]).abs().max() > 1e-3


def test_many_adapters_take_the_per_row_gather_path_to_the_same_logits(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MASKED_MAX_COLUMNS the bank gathers each row's A and B (bmm) instead of one masked matmul."""
    monkeypatch.setattr(lora_bank, "MASKED_MAX_COLUMNS", 0)
    banked = copy.deepcopy(setup["base"])
    bank = mount_bank(banked, setup["entries"])
    assert not banked.transformer.h[0].attn.c_q.masked and setup["banked"].transformer.h[0].attn.c_q.masked
    adapters = [2, -1, 0, 1, 0]
    ids = torch.randint(0, VOCAB, (len(adapters), 1), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with bank.select(adapters):
            got = banked(ids)
        with setup["bank"].select(adapters):
            masked = setup["banked"](ids)
        torch.testing.assert_close(got, masked, rtol=0, atol=1e-5)
        for row, k in enumerate(adapters):
            ref = (setup["base"] if k < 0 else setup["merged"][k])(ids[row : row + 1])[0]
            torch.testing.assert_close(got[row], ref, rtol=0, atol=1e-5)
        # A base row beside adapted ones is untouched: equal up to summation order (MoE groups rows by
        # expert, and MKL may sum a group of another size in another order); an adapter leak is >1e-3.
        torch.testing.assert_close(got[1], banked(ids)[1], rtol=0, atol=1e-6)


def test_outside_select_and_index_minus_one_are_the_base(setup: dict[str, Any]) -> None:
    ids = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    banked, bank = setup["banked"], setup["bank"]
    with torch.no_grad():
        plain = banked(ids)  # no select: every row is the base
        with bank.select([-1, -1, -1]):
            assert bank.index is None  # a base-only batch skips the update altogether
            assert torch.equal(banked(ids), plain)
        with bank.select([-1, 1, -1]):  # base rows beside an adapted one: exact zeros added
            mixed = banked(ids)
        assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
        assert not torch.allclose(mixed[1], plain[1])
        # the bank's base is the original model (the fc adapter moves the MLP off its fused path,
        # which sums in another order: equal to rounding)
        torch.testing.assert_close(plain, setup["base"](ids), rtol=0, atol=1e-5)
    assert bank.index is None


def test_base_rows_are_bit_identical_when_no_adapter_touches_the_fused_mlp() -> None:
    base = tiny()
    entries = [make_adapter(base, "attn", 4, "q,k,v,proj,mlp_proj", seed=5)[0]]
    banked = copy.deepcopy(base)
    bank = mount_bank(banked, entries)
    assert type(banked.transformer.h[0].mlp) is not AdaptedMLP  # c_fc untouched: the fused path stays
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), bank.select([-1, 0]):
        got = banked(ids)
    with torch.no_grad():
        assert torch.equal(got[0], base(ids[:1])[0])


def test_rank_padding_is_exact() -> None:
    """Adapter 'r2' alone in a bank, or padded to rank 8 beside 'r8': the same logits."""
    base = tiny(seed=3)
    r2, merged = make_adapter(base, "r2", 2, "all", seed=7)
    r8, _ = make_adapter(base, "r8", 8, "all", seed=8)
    alone, padded = copy.deepcopy(base), copy.deepcopy(base)
    bank_alone, bank_padded = mount_bank(alone, [r2]), mount_bank(padded, [r8, r2])
    c_q = padded.transformer.h[0].attn.c_q
    assert isinstance(c_q, BankedLinear) and c_q.lora_A.shape[1] == 8  # stacked at the largest rank
    assert torch.count_nonzero(c_q.lora_A[2, 2:]) == 0 and torch.count_nonzero(c_q.lora_B[2, :, 2:]) == 0
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with bank_alone.select([0, 0]):
            a = alone(ids)
        with bank_padded.select([1, 1]):
            b = padded(ids)
        # the padded components are exact zeros; what is left is the bmm summing in another order
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, merged(ids), rtol=0, atol=1e-5)


def test_ragged_decode_step_gives_each_row_its_adapter(setup: dict[str, Any]) -> None:
    """serve's path: each row prefilled alone with its adapter, then one decode step over all rows."""
    banked, bank, adapters = setup["banked"], setup["bank"], [2, -1, 0, 1]
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 9, 3, 7)]  # ragged lengths
    nxt = torch.randint(0, VOCAB, (len(prompts), 1), generator=g)
    cache = banked.new_slot_cache(len(prompts))
    with torch.no_grad():
        for slot, (p, k) in enumerate(zip(prompts, adapters, strict=True)):
            with bank.select([k]):
                banked(p, kv_cache=cache.row(slot))
        with bank.select(adapters):
            got = banked(nxt, kv_cache=cache.decode_view(list(range(len(prompts)))))[:, -1]
        for row, (p, k) in enumerate(zip(prompts, adapters, strict=True)):
            ref = (setup["base"] if k < 0 else setup["merged"][k])(torch.cat([p, nxt[row : row + 1]], 1))
            torch.testing.assert_close(got[row], ref[0, -1], rtol=0, atol=1e-5)


def test_int8_base_takes_a_bank_too() -> None:
    from nanoctl.model.quantize import quantize_model

    base = tiny("classic", seed=4)
    entry, merged = make_adapter(base, "all4", 4, "all", seed=9)
    q = quantize_model(copy.deepcopy(base), "int8")
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        q_base = q(ids)
        bank = mount_bank(q, [entry])
        with bank.select([-1, -1]):
            assert torch.equal(q(ids), q_base)
        with bank.select([0, 0]):
            q_adapted = q(ids)
        want = merged(ids)
    # int8 rounding stays, but the adapter's update is there: much closer to the fp32 merged model
    assert (q_adapted - want).abs().max() < 0.5 * (q_base - want).abs().max()


def test_bad_adapters_and_indices_are_clear_errors(setup: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="adapter index 3 is not in -1..2"):
        with setup["bank"].select([0, 3]):
            pass
    wide = tiny(setup["base"].config.arch, n_embd=128)
    with pytest.raises(NanoctlError, match=r"--lora all4: transformer\.h\.0\.attn\.c_q maps 64 -> \d+ features"):
        mount_bank(copy.deepcopy(wide), setup["entries"][:1])
    deep_state = {k.replace("transformer.h.1.", "transformer.h.7."): v for k, v in setup["entries"][1].state.items()}
    with pytest.raises(NanoctlError, match=r"--lora deep: the model has no matrix transformer\.h\.7\.attn"):
        mount_bank(copy.deepcopy(setup["base"]), [BankEntry("deep", setup["entries"][1].config, deep_state)])
    half = {k: v for k, v in setup["entries"][1].state.items() if "lora_B" not in k}
    with pytest.raises(NanoctlError, match="lora_A without its pair"):
        mount_bank(copy.deepcopy(setup["base"]), [BankEntry("half", setup["entries"][1].config, half)])
    with pytest.raises(NanoctlError, match="already carries a LoRA bank"):
        mount_bank(setup["banked"], setup["entries"][:1])


def test_mla_kv_up_is_refused_with_the_way_out() -> None:
    base = tiny("deepseek")
    entry, _ = make_adapter(base, "latent", 4, "kv_up", seed=4)
    with pytest.raises(NanoctlError, match="--lora latent: an adapter on MLA's kv_up") as e:
        mount_bank(copy.deepcopy(base), [entry])
    assert "one --lora PATH" in str(e.value.hint)
