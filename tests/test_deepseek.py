"""arch="deepseek": MLA cached decode vs full recompute (batched and continuous-batching caches), the KV
footprint, hand-counted parameters and FLOPs, grouped expert compute vs a per-token reference, Muon on
expert stacks, aux-loss-free bias balancing (on: balanced; off: visibly not), checkpoints, the CLI
presets and errors, a tiny pretrain -> sft -> chat/serve/eval chain, and exact resume after SIGKILL."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from nanoctl.errors import UsageError
from nanoctl.model.gpt import GPT, GPTConfig, build_model
from tiny_chat import random_model, single_thread

VOCAB = 320


def ds_config(**kw: object) -> GPTConfig:
    base = dict(sequence_len=64, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=2, n_embd=64, arch="deepseek",
                n_experts=4, top_k=2)  # fmt: skip
    base.update(kw)
    return GPTConfig(**base)  # type: ignore[arg-type]


# --- MLA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_cached_decode_equals_full_recompute(q_lora_rank: int) -> None:
    model = random_model(ds_config(q_lora_rank=q_lora_rank))
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), single_thread():
        full = model(x)
        cache = model.new_kv_cache(2, 32)
        assert cache.v_cache.numel() == 0 and cache.k_cache.shape[-2:] == (1, 16 + 16)  # latent + rope key only
        steps = [model(x[:, :12], kv_cache=cache)] + [model(x[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)

        # continuous batching: rows prefilled to different lengths, decoding together from odd slots
        slots = model.new_slot_cache(3, 32)
        for slot, row, n in ((2, 0, 5), (0, 1, 9)):
            model(x[row : row + 1, :n], kv_cache=slots.row(slot))
        out = model(torch.stack([x[0, 5:6], x[1, 9:10]]), kv_cache=slots.decode_view([2, 0]))
        torch.testing.assert_close(out[:, 0], torch.stack([full[0, 5], full[1, 9]]), atol=1e-4, rtol=1e-4)


def test_mla_scores_depend_on_relative_position_only() -> None:
    # decoupled RoPE: the same 6 tokens after a shifted prefix give the same attention pattern only if q
    # is rotated too (the fork's bug: q unrotated, scores tied to the absolute key position)
    model = random_model(ds_config(n_layer=1, n_dense_layers=1))
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        outs = []
        for shift in (0, 7):
            cos, sin = model.cos[:, shift : shift + 6], model.sin[:, shift : shift + 6]
            outs.append(attn(x, None, (cos, sin), -1, None))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_kv_bytes_per_token_mla_quarter_of_gpt_at_equal_width() -> None:
    for depth, width, heads in ((6, 384, 4), (12, 768, 6), (24, 1536, 12)):
        common = dict(sequence_len=64, vocab_size=VOCAB, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=width)
        with torch.device("meta"):
            mla, gpt = GPT(GPTConfig(arch="deepseek", **common)), GPT(GPTConfig(arch="classic", **common))  # type: ignore[arg-type]
        hd = width // heads
        assert mla.kv_bytes_per_token() == depth * (width // 4 + hd // 2) * 4  # fp32: latent + rope key
        assert gpt.kv_bytes_per_token() == depth * 2 * width * 4
        assert mla.kv_bytes_per_token() <= gpt.kv_bytes_per_token() / 4


# --- MoE ------------------------------------------------------------------------------------------------


def test_grouped_experts_equal_a_per_token_reference() -> None:
    model = random_model(ds_config())
    moe = model.transformer.h[1].mlp
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # the bias moves selection, not weights
        got = moe(x).reshape(-1, 64)
        flat = x.reshape(-1, 64)
        for t in range(flat.size(0)):
            scores = torch.sigmoid(moe.router.weight @ flat[t])
            chosen = torch.topk(scores + moe.expert_bias, 2).indices
            gates = scores[chosen] / scores[chosen].sum()
            want = moe.shared(flat[t : t + 1])[0]
            for g, e in zip(gates, chosen, strict=True):
                want = want + g * (moe.w_proj[e] @ torch.relu(moe.w_fc[e] @ flat[t]).square())
            torch.testing.assert_close(got[t], want, atol=1e-4, rtol=1e-4)


def test_muon_on_an_expert_stack_is_per_expert() -> None:
    from nanoctl.optim import MuonAdamW

    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(3, 16, 8))
    singles = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    grads = torch.randn(3, 16, 8)
    stack.grad = grads.clone()
    for e, p in enumerate(singles):
        p.grad = grads[e].clone()
    kw = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    MuonAdamW([dict(params=[stack], name="stack", **kw)]).step()
    MuonAdamW([dict(params=singles, name="singles", **kw)]).step()
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in singles]), atol=1e-5, rtol=1e-4)


def _train_toy(rate: float, steps: int = 60) -> torch.Tensor:
    """A short training of a tiny deepseek model on repetitive text with the real optimizer and hook;
    returns the expert load fractions of the MoE layer over the last 20 steps."""
    from tiny_chat import TEXTS, tiny_tokenizer

    tok = tiny_tokenizer()
    ids = torch.tensor([t for text in TEXTS for t in tok.encode(text)])
    torch.manual_seed(0)
    model = build_model(ds_config(n_layer=2, n_experts=8, top_k=1, bias_update_rate=rate), "cpu", torch.float32)
    moe = model.transformer.h[1].mlp
    batches = []
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - 33, (8,), generator=torch.Generator().manual_seed(step))
        batches.append(torch.stack([ids[s : s + 33] for s in starts]))
    # An unlucky router init: expert 0's row points along the mean MoE input, so it wins for most tokens.
    inputs: list[torch.Tensor] = []
    hook = moe.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(batches[0][:, :-1])
    hook.remove()
    mean = inputs[0].reshape(-1, 64).mean(0)
    with torch.no_grad():
        moe.router.weight[0] += 4.0 * mean / mean.square().sum()
    opt = model.setup_optimizer(matrix_lr=0.02, unembedding_lr=0.01, embedding_lr=0.1)
    model.train()
    seen = torch.zeros(8)
    with single_thread():
        for step in range(steps):
            batch = batches[step]
            loss = model(batch[:, :-1], targets=batch[:, 1:])
            loss.backward()
            opt.step()
            if step >= steps - 20:
                seen += moe.expert_load
            model.after_optimizer_step()
            model.zero_grad(set_to_none=True)
    assert moe.expert_load.sum() == 0  # the hook consumed the count
    return seen / seen.sum()


def test_bias_balancing_keeps_every_expert_under_twice_its_share() -> None:
    off = _train_toy(rate=0.0)
    on = _train_toy(rate=0.02)
    fair = 1 / 8
    assert off.max() > 2 * fair, off  # without balancing the skew stays: the test can fail
    assert on.max() <= 2 * fair, on


def test_mtp_adds_a_training_loss_only() -> None:
    model = random_model(ds_config(mtp_depth=1))
    plain = random_model(ds_config(mtp_depth=0))
    missing = plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert missing and all(k.startswith("mtp.") for k in missing)  # the trunk is the same network
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inference = model.eval()(x[:, :-1], targets=x[:, 1:])
        torch.testing.assert_close(inference, plain.eval()(x[:, :-1], targets=x[:, 1:]))
    loss = model.train()(x[:, :-1], targets=x[:, 1:])
    assert loss.item() > inference.item()  # + 0.3 x the t+2 prediction loss
    loss.backward()
    assert model.mtp is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())


def test_bias_is_saved_and_restored(tmp_path: Path) -> None:
    from nanoctl.checkpoint import load_model
    from tiny_chat import save_model

    model = random_model(ds_config())
    with torch.no_grad():
        model.transformer.h[2].mlp.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    assert "transformer.h.2.mlp.expert_bias" in model.state_dict()
    assert not any("expert_load" in k for k in model.state_dict())  # a running count, zero at every save
    save_model(tmp_path, model, stage="base", tag="ds")
    loaded, _, meta = load_model(stage="base", tag="ds", home=tmp_path)
    assert meta["model_config"]["arch"] == "deepseek" and loaded.config == model.config
    torch.testing.assert_close(loaded.transformer.h[2].mlp.expert_bias, torch.tensor([0.5, -0.5, 0.25, 0.0]))
    x = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# --- config, counts, CLI ----------------------------------------------------------------------------------


def test_hand_count_of_params_and_flops() -> None:
    cfg = ds_config(n_layer=3, n_experts=4, top_k=2, n_shared_experts=1, moe_intermediate_size=96,
                    kv_lora_rank=16, qk_rope_head_dim=8, mtp_depth=0)  # fmt: skip
    with torch.device("meta"):
        model = GPT(cfg)
    C, H, hd, r, dr, inter, V = 64, 2, 32, 16, 8, 96, 320
    attn = C * H * (hd + dr) + C * (r + dr) + r * H * (hd + hd) + H * hd * C  # q, kv down, kv up, out
    dense = 2 * C * 4 * C
    expert = 2 * C * inter
    moe_total = C * 4 + 4 * expert + expert  # router, 4 routed, 1 shared
    moe_active = C * 4 + 2 * expert + expert
    emb = V * C
    total = 2 * emb + 3 * attn + dense + 2 * moe_total
    active = 2 * emb + 3 * attn + dense + 2 * moe_active
    counts = model.num_scaling_params()
    assert counts["total"] == total == sum(p.numel() for p in model.parameters())
    assert counts["active"] == active
    flops = 6 * (active - emb) + 3 * 6 * H * (hd + dr + hd) * 64
    assert model.estimate_flops() == flops

    with torch.device("meta"):
        mtp = GPT(ds_config(n_layer=3, n_experts=4, moe_intermediate_size=96, kv_lora_rank=16,
                            qk_rope_head_dim=8, mtp_depth=1))  # fmt: skip
    extra = 2 * C * C + attn + dense  # projection + one dense MLA block
    assert mtp.num_scaling_params()["active"] == active + extra
    assert mtp.estimate_flops() == flops + 6 * extra + 6 * H * (hd + dr + hd) * 64 + 6 * emb  # + head again


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(top_k=5), "--top-k 5 is more than --experts 4"),
        (dict(experts_bad=True), "--experts 0"),
        (dict(mtp_depth=2), "--mtp-depth 2"),
        (dict(kv_lora_rank=-3), "--kv-lora-rank -3"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_flag(kw: dict[str, object], match: str) -> None:
    if kw.pop("experts_bad", False):
        kw["n_experts"] = 0
    with pytest.raises(UsageError, match=match):
        ds_config(**kw)


def test_scale_presets_and_overrides() -> None:
    from nanoctl.train.pretrain import PretrainOptions, plan_pretrain

    want = {"small": (6, 384, 4, 8, 2), "base": (12, 768, 6, 16, 4), "large": (24, 1536, 12, 32, 6)}
    for scale, (depth, width, heads, experts, top_k) in want.items():
        p = plan_pretrain(PretrainOptions(arch="deepseek", scale=scale), 32768, "cuda")
        c = p.model_config
        assert (c["n_layer"], c["n_embd"], c["n_head"], c["n_experts"], c["top_k"]) == (depth, width, heads, experts, top_k)
        assert p.params["active"] < p.params["total"]
    p = plan_pretrain(PretrainOptions(arch="deepseek", scale="small", experts=4, top_k=1, kv_lora_rank=64), 512, "cpu")
    assert (p.model_config["n_experts"], p.model_config["top_k"], p.model_config["kv_lora_rank"]) == (4, 1, 64)
    assert any(line.startswith("KV cache:") for line in p.lines())
    with pytest.raises(UsageError, match="--scale 'huge' is unknown"):
        plan_pretrain(PretrainOptions(arch="deepseek", scale="huge"), 512, "cpu")
    with pytest.raises(UsageError, match="--experts applies only to --arch deepseek"):
        plan_pretrain(PretrainOptions(experts=4), 512, "cpu")


def test_dry_run_prints_total_active_and_flops(home: Path) -> None:
    from typer.testing import CliRunner

    from nanoctl.cli import app

    res = CliRunner().invoke(app, ["pretrain", "--arch", "deepseek", "--depth", "12", "--experts", "16",
                                   "--top-k", "4", "--dry-run"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = res.stdout + res.stderr
    assert "active" in out and "total" in out and "FLOPs/token" in out and "16 routed experts, top-4" in out


# --- every stage ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_home(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A home with a 512-token tokenizer (pretrain text + GSM8K + identity) and 3 real shards."""
    import pyarrow.parquet as pq

    from nanoctl.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ds") / "home"
    texts = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:200]
    texts += [json.loads(line)["question"] for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]]
    Tokenizer.train_from_iterator(iter(texts), vocab_size=512).save(root / "tokenizer")
    data = root / "data" / "base"
    data.mkdir(parents=True)
    for i, src in enumerate(["shard_00000", "shard_00001", "shard_00008"]):
        shutil.copyfile(shared_data / "pretrain" / f"{src}.parquet", data / f"shard_{i:05d}.parquet")
    return root


TINY = dict(arch="deepseek", depth=2, head_dim=32, max_seq_len=64, device_batch_size=2, total_batch_size=256,
            experts=4, top_k=2, warmup_steps=2, eval_every=4, eval_tokens=256, sample_every=-1, device="cpu",
            threads=1, model_tag="ds")  # fmt: skip


def test_serve_decodes_what_the_engine_decodes() -> None:
    from nanoctl.engine import Engine, SamplingParams
    from tiny_chat import tiny_tokenizer

    model = random_model(ds_config(sequence_len=128))
    prompt = list(range(3, 40))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    with single_thread():
        want = [col[0] for col, _ in Engine(model, tiny_tokenizer()).generate(prompt, greedy)][:8]
        got = asyncio.run(_serve_once(model, tiny_tokenizer(), prompt, greedy))
    assert got[:8] == want


async def _serve_once(model: GPT, tok: object, prompt: list[int], params: object) -> list[int]:
    """One request through the continuous-batching scheduler (slot cache, ragged MLA decode)."""
    from nanoctl.serve.scheduler import FinishEvent, GenerationRequest, Scheduler, TokenEvent

    sched = Scheduler(model, tok, max_batch=4, prefill_chunk=16)
    sched.start()
    try:
        handle = sched.submit(GenerationRequest(prompt, params), asyncio.get_running_loop())  # type: ignore[arg-type]
        out: list[int] = []
        while True:
            ev = await asyncio.wait_for(handle.events.get(), 60)
            if isinstance(ev, TokenEvent):
                out.append(ev.token)
            elif isinstance(ev, FinishEvent):
                return out
    finally:
        sched.close()


@pytest.mark.slow
def test_pretrain_mid_sft_rl_chat_serve_eval(ds_home: Path, tmp_path: Path, shared_data: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoctl.checkpoint import load_model
    from nanoctl.engine import Engine, SamplingParams
    from nanoctl.train.mid import MidOptions, mid
    from nanoctl.train.pretrain import PretrainOptions, pretrain
    from nanoctl.train.rl import RLOptions, rl
    from nanoctl.train.sft import SFTOptions, sft

    home = tmp_path / "home"
    shutil.copytree(ds_home, home)
    monkeypatch.setenv("NANOCTL_HOME", str(home))
    monkeypatch.setitem(sys.modules, "datasets", None)  # offline
    res = pretrain(PretrainOptions(num_iterations=8, **TINY))  # type: ignore[arg-type]
    assert res.final_step == 8 and res.val_bpb is not None and math.isfinite(res.val_bpb)
    base, _, _ = load_model(stage="base", tag="ds", device="cpu", home=home)
    biases = torch.stack([m.mlp.expert_bias for m in base.transformer.h[1:]])
    assert biases.abs().sum() > 0  # the framework ran the balancing hook and the checkpoint kept it

    r = mid(MidOptions(data_dir=str(shared_data), device="cpu", num_iterations=2, device_batch_size=2,
                       eval_every=-1, eval_tokens=2 * 2 * 64, threads=1))  # fmt: skip
    assert r.final_step == 2 and r.parent["stage"] == "base"
    r = sft(SFTOptions(data_dir=str(shared_data), device="cpu", num_iterations=2, device_batch_size=2,
                       target_examples_per_step=2, eval_every=-1, eval_steps=1, eval_metrics_every=-1,
                       eval_metrics_max_problems=2, threads=1))  # fmt: skip
    assert r.final_step == 2 and r.parent["stage"] == "mid" and r.val_loss == r.val_loss
    r = rl(RLOptions(data_dir=str(shared_data), device="cpu", num_iterations=1, examples_per_step=1, num_samples=2,
                     device_batch_size=2, max_new_tokens=4, eval_every=-1, threads=1))  # fmt: skip
    assert r.final_step == 1 and r.parent["stage"] == "sft"

    model, tok, _ = load_model(stage="sft", tag="ds", device="cpu", home=home)
    assert model.config.arch == "deepseek"
    prompt = tok.render_for_completion(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    engine = Engine(model, tok)
    chat_tokens = [col[0] for col, _ in engine.generate(prompt, greedy)][:6]
    assert chat_tokens

    with single_thread():
        served = asyncio.run(_serve_once(model, tok, prompt, greedy))
    n = min(len(served), len(chat_tokens))
    assert n and served[:n] == chat_tokens[:n]  # the serve path (slot cache, ragged MLA) = the engine's

    from typer.testing import CliRunner

    from nanoctl.cli import app

    ev = CliRunner().invoke(app, ["eval", "base", "--stage", "base", "--tag", "ds", "--device", "cpu",
                                  "--eval", "bpb", "--eval", "sample", "--split-tokens", "512",
                                  "--device-batch-size", "2"])  # fmt: skip
    assert ev.exit_code == 0, ev.output


@pytest.mark.slow
def test_moe_sigkill_then_resume_reproduces_losses_and_biases(ds_home: Path, tmp_path: Path) -> None:
    import os
    import subprocess

    from test_pretrain import _wait_for, losses

    flags = {**TINY, "num_iterations": 12, "save_every": 4}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]

    def cli(home: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        e = dict(os.environ, NANOCTL_HOME=str(home), OMP_NUM_THREADS="1", **(env or {}))
        return subprocess.Popen([sys.executable, "-m", "nanoctl", "pretrain", *args], env=e,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref_home, run_home = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(ds_home, ref_home)
    shutil.copytree(ds_home, run_home)
    ref = cli(ref_home)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    killed = cli(run_home, env={"NANOCTL_STEP_SLEEP": "0.3"})
    ckpt = run_home / "checkpoints" / "base" / "ds"
    _wait_for(ckpt / "meta_000004.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (ckpt / "meta_000012.json").exists()
    resumed = cli(run_home)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resuming from step" in err, err
    assert losses(run_home, "ds") == losses(ref_home, "ds")
    a = torch.load(ckpt / "model_000012.pt", map_location="cpu")
    b = torch.load(ref_home / "checkpoints" / "base" / "ds" / "model_000012.pt", map_location="cpu")
    bias_keys = [k for k in a if k.endswith("expert_bias")]
    assert bias_keys and all(torch.equal(a[k], b[k]) for k in bias_keys)
    assert any(a[k].abs().sum() > 0 for k in bias_keys)


@pytest.mark.slow
def test_two_gloo_processes_train_deepseek(ds_home: Path, tmp_path: Path) -> None:
    import os
    import subprocess

    home = tmp_path / "home"
    shutil.copytree(ds_home, home)
    flags = {**TINY, "num_iterations": 3, "eval_every": -1, "nproc_per_node": 2}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = dict(os.environ, NANOCTL_HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "nanoctl", "pretrain", *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "x 2 process(es)" in proc.stderr
    state = torch.load(home / "checkpoints" / "base" / "ds" / "model_000003.pt", map_location="cpu")
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("expert_bias"))


def _bias_rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = random_model(ds_config())
    moe = model.transformer.h[1].mlp
    moe.expert_bias.zero_()
    moe.expert_load.copy_(torch.tensor([[9.0, 1.0, 1.0, 1.0], [0.0, 0.0, 5.0, 7.0]][rank]))  # disagreeing ranks
    model.after_optimizer_step()
    gathered = [torch.zeros(4) for _ in range(2)]
    dist.all_gather(gathered, moe.expert_bias)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: tens of seconds of imports on a busy box
def test_ranks_sum_their_loads_so_biases_stay_identical(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "biases.pt"
    mp.spawn(_bias_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    a, b = torch.load(out)
    assert torch.equal(a, b)
    # summed load [9, 1, 6, 8] (mean 6): expert 0 and 3 overloaded, 1 underloaded, 2 exactly fair
    assert torch.equal(a, torch.tensor([-1e-3, 1e-3, 0.0, -1e-3]))
