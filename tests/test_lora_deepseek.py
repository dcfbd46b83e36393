"""LoRA on arch="deepseek" (MLA + DeepSeekMoE): exact adapter counts, merged == unmerged (the cached,
absorbed MLA path included), frozen base and routing bias, the targets the arch has, PEFT's round trip
through `export hf`'s remote code, and a real `sft --lora-rank` on a deepseek base followed by chat and
`export merge-lora`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from nanoctl.errors import NanoctlError, UsageError  # noqa: E402
from nanoctl.home import Home  # noqa: E402
from nanoctl.model.gpt import GPT, MLP, GPTConfig  # noqa: E402
from nanoctl.model.lora import (  # noqa: E402
    AdaptedMLA,
    adapter_state_dict,
    add_lora,
    lora_parameters,
    make_config,
    merge_lora,
    mount_adapter,
    save_adapter,
)
from nanoctl.model.mla import MultiHeadLatentAttention  # noqa: E402
from test_lora import conversations_file, randomize_adapters, sft_opts  # noqa: E402
from tiny_chat import VOCAB, random_model, save_model, single_thread  # noqa: E402

# B: a query bottleneck (q_a/q_b_proj) and MoE in every layer (its shared expert is then the only MLP)
BOTTLENECK = dict(q_lora_rank=24, n_dense_layers=0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def ds(seed: int = 0, scale: float = 0.1, **kw: Any) -> GPT:
    """A tiny random deepseek model: 2 layers, width 64, 2 heads, 4 experts top-2 (derived: latent 16, rope
    16, nope 32, v 32, expert hidden 96; layer 0 dense), with a routing bias that changes the choices."""
    cfg = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, arch="deepseek",
                    n_experts=4, top_k=2, **kw)  # fmt: skip
    model = random_model(cfg, seed=seed, scale=scale)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_(0.0, 0.1)
    return model


def cached_logits(model: GPT, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of x through the KV cache: a prefill chunk, then one token at a time (MLA's latent path)."""
    cache = model.new_kv_cache(x.size(0), x.size(1))
    steps = [model(x[:, :prefill], kv_cache=cache)]
    steps += [model(x[:, t : t + 1], kv_cache=cache) for t in range(prefill, x.size(1))]
    return torch.cat(steps, dim=1)


# --- the layer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "targets", "expected"),
    [
        # rank 4 adds 4 x (in + out) per matrix. Per layer: q c_q 64->96 (2 heads x (32 nope + 16 rope)) 640,
        # kv_down 64->32 (latent 16 + rope 16) 384, kv_up 16->128 (2 x (32 + 32)) 576, proj 64->64 512: 2112.
        # fc: layer 0's dense MLP 64->256 1280 + layer 1's shared expert 64->96 640 = 1920; mlp_proj the same.
        # all: 2 x 2112 + 2 x 1920 = 8064. Router and routed experts: none.
        ({}, "all", 8064),
        ({}, "kv_up", 2 * 576),
        ({}, "fc", 1920),
        ({}, "q,kv_down", 2 * (640 + 384)),
        # bottleneck: q is q_down 64->24 (352) + c_q 24->96 (480) = 832; fc/mlp_proj the shared experts only.
        # all: 2 x (832 + 384 + 576 + 512 + 640 + 640) = 7168.
        (BOTTLENECK, "all", 7168),
        (BOTTLENECK, "q", 2 * 832),
    ],
)
def test_trainable_parameter_count_is_exact(variant: dict[str, Any], targets: str, expected: int) -> None:
    model = ds(**variant)
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, make_config(4, None, 0.0, targets, "deepseek"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert sum(p.numel() for p in model.parameters()) == total + expected  # base weights shared, not copied
    frozen = [n for n, p in model.named_parameters() if n.endswith(("w_fc", "w_proj", "router.weight"))]
    assert frozen and not any(".lora_" in n for n in frozen)


@pytest.mark.parametrize("variant", [{}, BOTTLENECK], ids=["default", "bottleneck"])
def test_merge_equals_unmerged_cached_and_uncached(variant: dict[str, Any]) -> None:
    """The unmerged adapter gives the same logits uncached, through the KV cache (the absorbed kv_up) and
    merged; merging leaves a plain model with the base's keys."""
    model = ds(**variant)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        add_lora(model, make_config(4, 8.0, 0.0, "all", "deepseek"))
        assert (model(x) - base).abs().max() < 1e-5  # B = 0 at init, as PEFT
        randomize_adapters(model)
        assert all(isinstance(b.attn, AdaptedMLA) for b in model.transformer.h)
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-2  # the adapter really changes the logits
        # an absorbed path that read the base kv_up weight would miss the adapter's update here
        torch.testing.assert_close(cached_logits(model, x, 10), adapted, atol=1e-4, rtol=1e-4)
        merge_lora(model)
        assert not lora_parameters(model)
        assert (model(x) - adapted).abs().max() < 1e-5
        torch.testing.assert_close(cached_logits(model, x, 10), adapted, atol=1e-4, rtol=1e-4)
    assert all(type(b.attn) is MultiHeadLatentAttention for b in model.transformer.h)
    assert all(type(m) is MLP for m in model.modules() if isinstance(m, MLP))  # back on the fused path
    assert set(model.state_dict()) == set(ds(**variant).state_dict())


def test_only_adapters_learn_and_the_routing_bias_stays() -> None:
    """AdamW steps with the framework's bias balancing after each: the adapters move, every base tensor
    (routing bias included) stays bit-identical; without LoRA the same steps move the bias."""
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))

    def steps(model: GPT, params: list[torch.nn.Parameter]) -> None:
        opt = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(3):
            loss = model(x, targets=x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.after_optimizer_step()

    model = ds()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, make_config(4, None, 0.0, "all", "deepseek"))
    steps(model, lora_parameters(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(v.abs().sum() > 0 for k, v in adapter_state_dict(model).items() if "lora_B" in k)

    full = ds()
    steps(full, list(full.parameters()))
    assert not torch.equal(before["transformer.h.1.mlp.expert_bias"], full.state_dict()["transformer.h.1.mlp.expert_bias"])


def test_targets_the_arch_lacks_are_usage_errors_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--lora-targets k,v: the deepseek arch has no k, v matrix") as e:
        add_lora(ds(), make_config(4, None, 0.0, "k,v"))
    assert e.value.hint == "use all or a comma-separated subset of q, kv_down, kv_up, proj, fc, mlp_proj"
    with pytest.raises(UsageError, match="--lora-targets 'q,k': k is not a LoRA target of the deepseek arch"):
        make_config(4, None, 0.0, "q,k", "deepseek")
    classic = random_model(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                                     arch="classic"))  # fmt: skip
    with pytest.raises(UsageError, match="--lora-targets kv_up: the classic arch has no kv_up matrix"):
        add_lora(classic, make_config(4, None, 0.0, "kv_up"))
    assert make_config(4, None, 0.0, "all", "deepseek").targets == ("q", "kv_down", "kv_up", "proj", "fc", "mlp_proj")

    # no dense layer, no shared expert: no MLP matrix at all; fc names nothing, `all` adapts the attention
    bare = dict(n_dense_layers=0, n_shared_experts=0)
    with pytest.raises(UsageError, match="--lora-targets fc: no block of this deepseek model has a fc matrix"):
        add_lora(ds(**bare), make_config(4, None, 0.0, "fc", "deepseek"))
    model = add_lora(ds(**bare), make_config(4, None, 0.0, "all", "deepseek"))
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 2112

    # a deepseek adapter on a dense model: refused, naming what it adapts
    randomize_adapters(model)
    save_adapter(tmp_path / "a", model)
    with pytest.raises(NanoctlError, match="adapts kv_down, kv_up, which a classic model lacks"):
        mount_adapter(classic, tmp_path / "a")


# --- PEFT's format ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "modules"),
    [
        ({}, ["fc1", "fc2", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_proj"]),
        (BOTTLENECK, ["fc1", "fc2", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]),
    ],
    ids=["default", "bottleneck"],
)
def test_peft_round_trip_through_export_hf(home: Path, tmp_path: Path, variant: dict[str, Any],
                                           modules: list[str]) -> None:
    """Our adapter on `export hf` of the base (remote code), loaded by PEFT, gives our logits (uncached and
    cached); what PEFT saves mounts back on our model with the same logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from nanoctl.export.hf_export import ExportHFOptions, export_hf

    model = ds(**variant)
    save_model(home, model, stage="base", tag="d2", step=0)
    export_hf(tmp_path / "hf", ExportHFOptions(), home=Home(home))
    add_lora(model, make_config(4, 16.0, 0.0, "all", "deepseek"))
    randomize_adapters(model)
    save_adapter(tmp_path / "adapter", model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0 and config["target_modules"] == modules

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           trust_remote_code=True)  # fmt: skip
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith(tuple(modules))]
    assert len(wrapped) == len(adapter_state_dict(model)) // 2  # every adapter of ours landed, nothing more
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.eval()(x)
        theirs = peft_model(input_ids=x).logits
        assert (ours - theirs).abs().max() < 1e-4
        want = list(model.generate(x[0].tolist(), 6, temperature=0.0))
        got = peft_model.generate(x[:1], attention_mask=torch.ones_like(x[:1]), max_new_tokens=6, do_sample=False,
                                  min_new_tokens=6)  # fmt: skip
    assert got[0, 20:].tolist() == want  # PEFT's cached (absorbed) decode on the adapted kv_b_proj too

    peft_model.save_pretrained(tmp_path / "from_peft")
    fresh = ds(**variant)
    info = mount_adapter(fresh, tmp_path / "from_peft", merge=False)
    assert info["rank"] == 4 and info["targets"] == ["q", "kv_down", "kv_up", "proj", "fc", "mlp_proj"]
    with torch.no_grad():
        assert (fresh(x) - ours).abs().max() < 1e-5


# --- training and the commands ----------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sft_lora_on_a_deepseek_base_then_chat_and_merge(home: Path, tmp_path: Path) -> None:
    """A real `sft --lora-rank 4` (library call) on a deepseek base: adapters only in the checkpoint and
    the optimizer, the base checkpoint byte-identical; then chat --lora and export merge-lora on them."""
    from nanoctl.checkpoint import load_model
    from nanoctl.cli.main import app
    from nanoctl.train.sft import sft

    base_dir = save_model(home, ds(scale=0.05), stage="base", tag="d2", step=0)
    hashes = {p.name: sha256(p) for p in base_dir.iterdir() if p.is_file()}
    data = conversations_file(tmp_path / "c.jsonl")
    result = sft(sft_opts(data, num_iterations=4), home=Home(home))
    out = Path(result.checkpoint_dir)
    assert out == home / "adapters" / "sft" / "d2" and not (home / "checkpoints" / "sft").exists()
    final = torch.load(out / "model_000004.pt", weights_only=True)
    assert final and all(".lora_" in k for k in final)
    assert sum(v.numel() for v in final.values()) == 8064  # the hand count above: every targetable matrix
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # trained
    optim = torch.load(out / "optim_000004_rank0.pt", weights_only=True)
    moments = sum(t.numel() for s in optim["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert moments == 2 * 8064  # AdamW's two moments, for the adapters and nothing else
    assert {p.name: sha256(p) for p in base_dir.iterdir() if p.is_file()} == hashes
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["fc1", "fc2", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_proj"]

    runner = CliRunner()
    r = runner.invoke(app, ["chat", "--lora", str(out), "-p", "hi 1", "--max-tokens", "4", "--temperature", "0",
                            "--device", "cpu", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "base/d2@0+lora:sft@4"
    r = runner.invoke(app, ["export", "merge-lora", "--lora", str(out), "--out-tag", "d2-merged", "--json"])
    assert r.exit_code == 0, r.output
    merged, _, meta = load_model(stage="sft", tag="d2-merged", home=home)
    assert meta["lora"]["targets"] == ["q", "kv_down", "kv_up", "proj", "fc", "mlp_proj"]
    b, _, _ = load_model(stage="base", tag="d2", home=home)
    mount_adapter(b, out)
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (merged(x) - b(x)).abs().max() < 1e-5

    # eval base --lora scores base + adapter: the merged checkpoint's bpb
    def bpb(*args: str) -> float:
        r = runner.invoke(app, ["eval", "base", *args, "--eval", "bpb", "--split-tokens", "256",
                                "--device-batch-size", "2", "--device", "cpu", "--no-progress", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["bpb"]["val"]

    with_lora = bpb("--lora", str(out))
    assert abs(with_lora - bpb("--stage", "sft", "--tag", "d2-merged")) < 1e-4
    assert abs(with_lora - bpb("--stage", "base", "--tag", "d2")) > 1e-6


def test_cli_sft_targets_are_the_base_models_arch(home: Path, tmp_path: Path) -> None:
    """`all` means the deepseek targets on a deepseek base; a dense-only name is exit 2 naming the flag."""
    from nanoctl.cli.main import app

    save_model(home, ds(), stage="base", tag="d2", step=0)
    data = conversations_file(tmp_path / "c.jsonl")
    runner = CliRunner()
    r = runner.invoke(app, ["sft", "--lora-rank", "4", "--data", str(data), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "sft: base/d2@0 -> adapters/sft/d2" in r.output and "targets q,kv_down,kv_up,proj,fc,mlp_proj;" in r.output
    r = runner.invoke(app, ["sft", "--lora-rank", "4", "--lora-targets", "q,k", "--data", str(data), "--dry-run"])
    assert r.exit_code == 2 and "--lora-targets 'q,k': k is not a LoRA target of the deepseek arch" in r.output


def test_mid_and_rl_train_deepseek_adapters(home: Path, tmp_path: Path) -> None:
    """mid and rl with --lora-rank on deepseek parents: adapters only (rl samples through the cached MLA
    path with its unmerged adapters), targets limited with --lora-targets."""
    from nanoctl.train.mid import MidOptions, mid
    from nanoctl.train.rl import RLOptions, rl

    save_model(home, ds(scale=0.05), stage="base", tag="d2", step=0)
    save_model(home, ds(seed=3, scale=0.05), stage="sft", tag="d2", step=0, with_tokenizer=False)
    data = conversations_file(tmp_path / "c.jsonl")
    m = mid(MidOptions(data=[str(data)], device="cpu", num_iterations=2, device_batch_size=2, total_batch_size=128,
                       max_seq_len=64, eval_every=-1, lora_rank=2, threads=1), home=Home(home))
    r = rl(RLOptions(task="SpellingBee", device="cpu", num_iterations=1, device_batch_size=2, examples_per_step=1,
                     num_samples=2, max_new_tokens=8, eval_every=-1, eval_examples=1, lora_rank=2,
                     lora_targets="kv_up,proj", threads=1), home=Home(home))  # fmt: skip
    for result, stage, n in ((m, "mid", 2 * 8064 // 4), (r, "rl", 2 * 2 * (16 + 128 + 64 + 64))):
        out = Path(result.checkpoint_dir)
        assert out == home / "adapters" / stage / "d2"
        weights = torch.load(out / f"model_{result.final_step:06d}.pt", weights_only=True)
        assert all(".lora_" in k for k in weights) and sum(v.numel() for v in weights.values()) == n
    assert not (home / "checkpoints" / "mid").exists() and not (home / "checkpoints" / "rl").exists()
