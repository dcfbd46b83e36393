"""`nanoctl export hf` for arch="deepseek" (MLA + DeepSeekMoE) through the shipped remote code: transformers
loads the directory with every tensor placed, fp32 logits and greedy KV-cache decoding agree with ours, the
HF cache holds only MLA's latent + rope key, the routing bias is loaded and used, MTP tensors are left out,
left-padded batches decode row by row, and the remote code runs where nanoctl cannot be imported."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.errors import UsageError
from nanoctl.export.hf import to_remote_state_dict
from nanoctl.export.hf_export import ExportHFOptions, export_hf, write_hf_directory
from nanoctl.home import Home
from nanoctl.model.gpt import GPT, GPTConfig, build_model
from tiny_chat import hf_logits_without_nanoctl, save_model, single_thread, tiny_tokenizer

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 100
STOPS = ("<|assistant_end|>", "<|bos|>")  # generation_config's eos ids
# A: the defaults (shared expert, first layer dense, full-rank query, v = qk_nope = head_dim).
# B: query bottleneck, MTP head, no shared expert, no dense layer, top-3 of 6, v/nope/rope dims all differ.
VARIANTS = {
    "A": {},
    "B": dict(q_lora_rank=24, mtp_depth=1, n_shared_experts=0, n_dense_layers=0, n_experts=6, top_k=3,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, kv_lora_rank=20),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def ds_model(seed: int = 0, **kw: object) -> GPT:
    """A tiny random deepseek model (3 layers, 2 heads, width 64, 4 experts top-2) with a routing bias
    large enough to change which experts are picked."""
    base = dict(sequence_len=256, vocab_size=tiny_tokenizer().get_vocab_size(), n_layer=3, n_head=2, n_kv_head=2,
                n_embd=64, arch="deepseek", n_experts=4, top_k=2)  # fmt: skip
    base.update(kw)
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**base), "cpu", torch.float32)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_(0.0, 0.3)
    return model.eval()


def _load(out: Path, **kwargs) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kwargs).eval()


def _prompt(length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path]:
    m = ds_model(**VARIANTS[request.param])
    out = tmp_path_factory.mktemp(f"hf_{request.param}") / "hf"
    write_hf_directory(out, m.state_dict(), m.config, tiny_tokenizer())
    return m, out


def test_loads_every_tensor_and_matches_logits_and_greedy_decode(exported: tuple[GPT, Path]) -> None:
    m, out = exported
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, output_loading_info=True
    )
    hf.eval()
    assert type(hf).__name__ == "NanoctlForCausalLM" and hf.dtype == torch.float32
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    idx = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, m(idx), atol=1e-4, rtol=0)
        got = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=32, do_sample=False)
    want = list(m.generate(idx[0].tolist(), 32, temperature=0.0))
    tok = tiny_tokenizer()
    stops = {tok.encode_special(s) for s in STOPS}
    cut = next((i + 1 for i, t in enumerate(want) if t in stops), len(want))  # HF stops after an eos
    assert got[0, PROMPT_LEN:].tolist() == want[:cut]
    assert cut > 8, "the random model stopped too early for the comparison to mean much"


def test_routing_bias_is_loaded_and_selects(exported: tuple[GPT, Path]) -> None:
    """The selection-only bias reaches the HF router (a zeroed one changes the logits, on both sides alike)."""
    m, out = exported
    m = copy.deepcopy(m)  # the fixture's model is shared with the other tests
    hf = _load(out)
    routers = [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    assert routers and all(r.e_score_correction_bias.abs().sum() > 0 for r in routers)
    idx = _prompt(40)
    with torch.no_grad():
        before = hf(input_ids=idx).logits
        for r in routers:
            r.e_score_correction_bias.zero_()
        for name, buf in m.named_buffers():
            if name.endswith("expert_bias"):
                buf.zero_()
        after = hf(input_ids=idx).logits
        torch.testing.assert_close(after, m(idx), atol=1e-4, rtol=0)
    assert (after - before).abs().max() > 1e-3, "the bias picked no different experts: test means nothing"


def test_mtp_is_left_out_and_moe_tensors_stay_stacked(exported: tuple[GPT, Path]) -> None:
    m, out = exported
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        cfg = m.config
        moe_layer = cfg.n_dense_layers  # the first MoE layer
        fc1 = f.get_tensor(f"model.layers.{moe_layer}.mlp.experts.fc1")
    assert not [k for k in keys if "mtp" in k]
    assert (cfg.mtp_depth > 0) == any(k.startswith("mtp.") for k in m.state_dict())
    assert fc1.shape == (cfg.n_experts, cfg.moe_intermediate_size, cfg.n_embd)
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "deepseek" and config["first_k_dense_replace"] == cfg.n_dense_layers
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanoctl.NanoctlForCausalLM"


def test_cache_holds_latent_and_rope_key_and_steps_match_full(exported: tuple[GPT, Path]) -> None:
    """A hand-written DynamicCache loop (absorbed latent attention) gives the uncached logits at every step;
    each layer caches the rope key (keys) and the latent (values) only, one shared head."""
    from transformers.cache_utils import DynamicCache

    m, out = exported
    hf = _load(out)
    cfg = m.config
    idx = _prompt(60)
    with torch.no_grad():
        full = m(idx)
        cache = DynamicCache(config=hf.config)
        got = [hf(input_ids=idx[:, :45], cache=cache, use_cache=True).logits]
        for t in range(45, 60):
            got.append(hf(input_ids=idx[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-4, rtol=0)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 60, cfg.qk_rope_head_dim)
    assert layer.values.shape == (1, 1, 60, cfg.kv_lora_rank)


def test_beam_search_reorders_the_latent_cache(exported: tuple[GPT, Path]) -> None:
    """Beams reorder the cached latents and rope keys: the cached beam search equals the uncached one."""
    _, out = exported
    hf = _load(out)
    idx = _prompt(50)
    beams = dict(num_beams=3, do_sample=False, max_new_tokens=10, min_new_tokens=10)
    with torch.no_grad():
        cached = hf.generate(idx, attention_mask=torch.ones_like(idx), use_cache=True, **beams)
        uncached = hf.generate(idx, attention_mask=torch.ones_like(idx), use_cache=False, **beams)
    assert cached.tolist() == uncached.tolist()


def test_peft_lora_on_every_projection_trains_and_decodes_cached_as_uncached(
    exported: tuple[GPT, Path],
) -> None:
    """LoRA on MLA's and the MLPs' projections: a training step runs, and the cached (absorbed) path uses
    the adapted kv_b_proj too, so cached steps still give the uncached logits."""
    from peft import LoraConfig, get_peft_model
    from transformers.cache_utils import DynamicCache

    _, out = exported
    targets = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "fc1", "fc2"]
    hf = _load(out)
    present = [t for t in targets if any(name.endswith(t) for name, _ in hf.named_modules())]
    lora = get_peft_model(hf, LoraConfig(r=4, target_modules=present, init_lora_weights=False))
    idx = _prompt(30)
    lora.train()
    loss = lora(input_ids=idx, labels=idx).loss
    loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "kv_b_proj.lora_" in n)
    lora.eval()
    with torch.no_grad():
        full = lora(input_ids=idx).logits
        cache = DynamicCache(config=hf.config)
        steps = [lora(input_ids=idx[:, :20], cache=cache, use_cache=True).logits]
        steps += [
            lora(input_ids=idx[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 30)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_left_padded_batch_generates_each_row_as_alone(tmp_path: Path) -> None:
    m = ds_model()
    write_hf_directory(tmp_path / "hf", m.state_dict(), m.config, tiny_tokenizer())
    hf = _load(tmp_path / "hf")
    long, short = _prompt(PROMPT_LEN)[0], _prompt(PROMPT_LEN - 30, seed=2)[0]
    pad = hf.generation_config.pad_token_id
    ids = torch.stack([long, torch.cat([torch.full((30,), pad), short])])
    mask = torch.stack(
        [torch.ones(PROMPT_LEN), torch.cat([torch.zeros(30), torch.ones(PROMPT_LEN - 30)])]
    ).long()
    with torch.no_grad():
        got = hf.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    for row, prompt in zip(got, (long, short), strict=True):
        assert row[PROMPT_LEN:].tolist() == list(m.generate(prompt.tolist(), 10, temperature=0.0))


def test_remote_code_loads_without_nanoctl(tmp_path: Path) -> None:
    """A fresh interpreter in which `import nanoctl` fails loads and runs the deepseek export."""
    m = ds_model(q_lora_rank=24)
    out = tmp_path / "hf"
    write_hf_directory(out, m.state_dict(), m.config, tiny_tokenizer())
    idx = _prompt(40)
    theirs = hf_logits_without_nanoctl(out, idx)
    with torch.no_grad():
        torch.testing.assert_close(theirs, m(idx)[0, -1], atol=1e-4, rtol=0)


def test_export_and_cli_from_a_checkpoint(home: Path, tmp_path: Path) -> None:
    m = ds_model(mtp_depth=1)
    save_model(home, m)
    result = export_hf(tmp_path / "lib", ExportHFOptions(), home=Home(home))
    assert result["arch"] == "deepseek" and "modeling_nanoctl.py" in result["files"]
    r = CliRunner().invoke(
        app, ["--home", str(home), "export", "hf", str(tmp_path / "o"), "--dtype", "bf16", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["arch"] == "deepseek"
    hf = _load(tmp_path / "o")
    assert hf.dtype == torch.bfloat16
    # the routing bias stays fp32 (as ours in every compute dtype): a rounded one could pick other experts
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, m.transformer.h[1].mlp.expert_bias)
    idx = _prompt(30)
    with torch.no_grad():
        logits = hf(input_ids=idx).logits.float()
        ours = m(idx)
    assert torch.isfinite(logits).all()
    # bf16 weights: close, not exact (the argmax of most positions survives)
    assert (logits.argmax(-1) == ours.argmax(-1)).float().mean() > 0.8


def test_unknown_or_missing_tensor_is_refused_by_name() -> None:
    m = ds_model()
    state = dict(m.state_dict())
    state["transformer.h.1.mlp.router_noise"] = torch.zeros(1)
    with pytest.raises(UsageError, match="router_noise"):
        to_remote_state_dict(state, m.config)
    state = dict(m.state_dict())
    del state["transformer.h.2.mlp.expert_bias"]
    with pytest.raises(UsageError, match=r"lacks tensor 'transformer\.h\.2\.mlp\.expert_bias'.*deepseek"):
        to_remote_state_dict(state, m.config)
