"""LoRA: exact adapter counts, merge == unmerged, PEFT's file format both ways, training with frozen
weights (resume included), memory against full SFT, and the CLI (sft --lora-rank, chat/eval --lora,
export merge-lora, bad flags)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from nanoctl.home import Home  # noqa: E402
from nanoctl.model.gpt import GPTConfig  # noqa: E402
from nanoctl.model.lora import (  # noqa: E402
    TARGETS,
    adapter_state_dict,
    add_lora,
    lora_parameters,
    make_config,
    merge_lora,
    mount_adapter,
    save_adapter,
)
from tiny_chat import VOCAB, random_model, save_model  # noqa: E402

C, L = 64, 2  # width and depth of the tiny models


def tiny(arch: str = "classic", seed: int = 0, scale: float = 0.1) -> Any:
    cfg = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=L, n_head=2, n_kv_head=2, n_embd=C, arch=arch)
    return random_model(cfg, seed=seed, scale=scale)


def randomize_adapters(model: Any, seed: int = 1) -> None:
    """Fresh adapters change nothing (B = 0): give B (and A) random values so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def conversations_file(path: Path, n: int = 40) -> Path:
    rows = [[{"role": "user", "content": f"hi {i % 4}"}, {"role": "assistant", "content": "hello there"}]
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the layer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        # rank 4, C = 64, 2 layers. A C->C matrix (q, k, v, proj) gets A 4x64 + B 64x4 = 512; fc (C->4C)
        # and mlp_proj (4C->C) get 4x64 + 256x4 = 1280. all: 2 x (4 x 512 + 2 x 1280) = 9216.
        ("all", 9216),
        ("q,v", 2 * 2 * 512),
        ("fc", 2 * 1280),
    ],
)
def test_trainable_parameter_count_is_exact(targets: str, expected: int) -> None:
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, make_config(4, None, 0.0, targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert sum(p.numel() for p in model.parameters()) == total + expected  # base weights shared, not copied


@pytest.mark.parametrize("arch", ["classic", "current"])
def test_fresh_adapter_is_identity_and_merge_equals_unmerged(arch: str) -> None:
    model = tiny(arch)
    x = torch.randint(0, VOCAB, (2, 24))
    base = model(x)
    add_lora(model, make_config(4, 8.0, 0.0, "all"))
    assert (model(x) - base).abs().max() < 1e-5  # B = 0 at init, as PEFT
    randomize_adapters(model)
    adapted = model(x)
    assert (adapted - base).abs().max() > 1e-2  # the adapter really changes the logits
    merge_lora(model)
    assert not lora_parameters(model)
    assert (model(x) - adapted).abs().max() < 1e-5
    assert set(model.state_dict()) == set(tiny(arch).state_dict())  # a plain model again


def test_only_adapters_learn() -> None:
    """A few AdamW steps move the adapters and leave every base weight bit-identical."""
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, make_config(4, None, 0.0, "q,k,v,proj"))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = torch.randint(0, VOCAB, (2, 24))
    model.train()
    for _ in range(3):
        loss = model(x, targets=x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(v.abs().sum() > 0 for k, v in adapter_state_dict(model).items() if "lora_B" in k)


def test_bad_targets_and_rank_are_usage_errors() -> None:
    from nanoctl.errors import UsageError

    with pytest.raises(UsageError, match="--lora-targets 'q,mlp'"):
        make_config(4, None, 0.0, "q,mlp")
    with pytest.raises(UsageError, match="--lora-rank"):
        make_config(0, None, 0.0, "all")
    with pytest.raises(UsageError, match="--lora-dropout"):
        make_config(4, None, 1.5, "all")
    assert make_config(4, None, 0.0, "all").targets == tuple(TARGETS)


# --- PEFT's format ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["classic", "current"])  # current: export hf with remote code
def test_peft_round_trip(home: Path, tmp_path: Path, arch: str) -> None:
    """Our adapter on `export hf` of the base, loaded by PEFT, gives our logits; PEFT's save loads back."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from nanoctl.export.hf_export import ExportHFOptions, export_hf

    model = tiny(arch)
    save_model(home, model, stage="base", tag="d2", step=0)
    export_hf(tmp_path / "hf", ExportHFOptions(), home=Home(home))
    add_lora(model, make_config(4, 16.0, 0.0, "all"))
    randomize_adapters(model)
    save_adapter(tmp_path / "adapter", model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           trust_remote_code=arch == "current")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, VOCAB, (2, 20))
    ours = model.eval()(x)
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
    assert (ours - theirs).abs().max() < 1e-4
    # the other way: what PEFT saves mounts on our model with the same result
    peft_model.save_pretrained(tmp_path / "from_peft")
    fresh = tiny(arch)
    info = mount_adapter(fresh, tmp_path / "from_peft")
    assert info["rank"] == 4 and info["alpha"] == 16.0
    assert (fresh(x) - ours).abs().max() < 1e-5


def test_mount_refuses_a_mismatched_adapter(tmp_path: Path) -> None:
    from nanoctl.errors import NanoctlError

    model = tiny()
    add_lora(model, make_config(4, None, 0.0, "all"))
    save_adapter(tmp_path / "a", model)
    wider = random_model(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=L, n_head=2, n_kv_head=2,
                                   n_embd=2 * C, arch="classic"))
    with pytest.raises(NanoctlError, match="the model wants"):
        mount_adapter(wider, tmp_path / "a")
    with pytest.raises(NanoctlError, match="no adapter_config.json"):
        mount_adapter(tiny(), tmp_path)


# --- training, resume, the CLI ----------------------------------------------------------------------------


def sft_opts(data: Path, **kw: Any) -> Any:
    from nanoctl.train.sft import SFTOptions

    base = dict(data=[str(data)], device="cpu", num_iterations=6, device_batch_size=2, target_examples_per_step=2,
                eval_every=-1, eval_steps=1, eval_metrics_every=-1, metric_tasks=[], lora_rank=4, threads=1)
    return SFTOptions(**(base | kw))


def test_lora_sft_saves_adapters_apart_and_resumes(home: Path, tmp_path: Path) -> None:
    """The run writes adapters (not the model) under adapters/sft/<tag>; the optimizer holds the adapters
    only; a run cut after step 3 resumes to the same adapter weights; the base checkpoint is untouched."""
    from nanoctl.train.sft import sft

    save_model(home, tiny("classic"), stage="base", tag="d2", step=0)
    data = conversations_file(tmp_path / "c.jsonl")
    result = sft(sft_opts(data, save_every=3), home=Home(home))
    out = Path(result.checkpoint_dir)
    assert out == home / "adapters" / "sft" / "d2"
    assert not (home / "checkpoints" / "sft").exists()
    final = torch.load(out / "model_000006.pt", weights_only=True)
    assert final and all(".lora_" in k for k in final)
    optim = torch.load(out / "optim_000006_rank0.pt", weights_only=True)
    state_numel = sum(t.numel() for s in optim["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    n_adapter = sum(v.numel() for v in final.values())
    assert state_numel == 2 * n_adapter  # AdamW's two moments, for the adapters and nothing else
    assert (out / "adapter_model.safetensors").stat().st_size < 200_000
    record = json.loads((out / "nanoctl_adapter.json").read_text())
    assert record["parent"] == {"stage": "base", "tag": "d2", "step": 0} and record["step"] == 6

    for f in out.glob("*_000006*"):  # as if killed after the step-3 checkpoint
        f.unlink()
    resumed = sft(sft_opts(data, save_every=3), home=Home(home))
    assert resumed.resumed_from == 3 and resumed.final_step == 6
    again = torch.load(out / "model_000006.pt", weights_only=True)
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)
    # a changed LoRA config is a different run: refused, not silently resumed
    from nanoctl.errors import UsageError

    with pytest.raises(UsageError, match="lora"):
        sft(sft_opts(data, save_every=3, lora_rank=8, num_iterations=8), home=Home(home))

    # `cache ls` lists the adapter run with its base; `cache rm adapters/sft/d2` removes only it
    from nanoctl.cache import list_artifacts, remove_artifacts, resolve_targets

    (entry,) = [a for a in list_artifacts(Home(home)) if a.kind == "adapter"]
    assert entry.name == "sft/d2" and entry.path == str(out)
    assert entry.detail.startswith("rank 4, alpha 8, on base/d2@0, step 6")
    assert entry.size_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert remove_artifacts(resolve_targets(["adapters/sft/d2"], Home(home))) == entry.size_bytes
    assert not out.exists() and (home / "checkpoints" / "base" / "d2").is_dir()


def test_cli_sft_lora_then_chat_eval_and_merge(home: Path, tmp_path: Path, shared_data: Path) -> None:
    from nanoctl.checkpoint import load_model
    from nanoctl.cli.main import app

    save_model(home, tiny("classic"), stage="base", tag="d2", step=0)
    data = conversations_file(tmp_path / "c.jsonl")
    runner = CliRunner()
    r = runner.invoke(app, ["sft", "--lora-rank", "4", "--lora-targets", "q,v,fc", "--data", str(data),
                            "--num-iterations", "4", "--device-batch-size", "2", "--target-examples-per-step", "2",
                            "--eval-every", "-1", "--eval-metrics-every", "-1", "--threads", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "sft: base/d2@0 -> adapters/sft/d2" in r.output and "targets q,v,fc;" in r.output
    adapter = home / "adapters" / "sft" / "d2"
    r = runner.invoke(app, ["chat", "--lora", str(adapter), "-p", "hi 1", "--max-tokens", "4", "--temperature", "0",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    reply = json.loads(r.stdout)
    assert reply["model"] == "base/d2@0+lora:sft@4" and reply["mode"] == "chat"

    r = runner.invoke(app, ["export", "merge-lora", "--lora", str(adapter), "--out-tag", "d2-merged", "--json"])
    assert r.exit_code == 0, r.output
    merged = json.loads(r.stdout)
    assert merged["stage"] == "sft" and merged["parent"]["stage"] == "base" and merged["step"] == 4
    # the merged checkpoint answers exactly as base + adapter
    m, _, meta = load_model(stage="sft", tag="d2-merged", home=home)
    assert meta["lora"]["rank"] == 4 and meta["parent"] == {"stage": "base", "tag": "d2", "step": 0}
    b, _, _ = load_model(stage="base", tag="d2", home=home)
    mount_adapter(b, adapter)
    x = torch.randint(0, VOCAB, (1, 16))
    assert (m(x) - b(x)).abs().max() < 1e-5
    r = runner.invoke(app, ["export", "merge-lora", "--lora", str(adapter), "--out-tag", "d2-merged"])
    assert r.exit_code == 2 and "--force" in r.output

    r = runner.invoke(app, ["eval", "chat", "--lora", str(adapter), "-t", "ARC-Easy", "-x", "2", "--device", "cpu",
                            "--data-dir", str(shared_data), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert list((home / "reports" / "d2").glob("eval_chat_sft-lora_000004.json"))

    # eval base --lora scores base + adapter: the same bpb as the merged checkpoint, not the base's
    def bpb(*args: str) -> float:
        r = runner.invoke(app, ["eval", "base", *args, "--eval", "bpb", "--split-tokens", "256",
                                "--device-batch-size", "2", "--device", "cpu", "--no-progress", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["bpb"]["val"]

    with_lora = bpb("--lora", str(adapter))
    assert list((home / "reports" / "d2").glob("eval_base_sft-lora_000004.json"))
    assert abs(with_lora - bpb("--stage", "sft", "--tag", "d2-merged")) < 1e-4
    assert abs(with_lora - bpb("--stage", "base", "--tag", "d2")) > 1e-6


def test_cli_bad_lora_flags_exit_2(home: Path) -> None:
    from nanoctl.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["sft", "--lora-rank", "4", "--lora-targets", "q,attn", "--dry-run"])
    assert r.exit_code == 2 and "--lora-targets" in r.output and "attn" in r.output
    r = runner.invoke(app, ["chat", "--lora", str(home / "nope"), "-p", "hi"])
    assert r.exit_code == 2 and "--lora" in r.output
    r = runner.invoke(app, ["export", "merge-lora", "--lora", str(home), "--out-tag", "x"])
    assert r.exit_code == 2 and "adapter_config.json" in r.output


# --- memory ------------------------------------------------------------------------------------------------

MEMORY_RUN = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from nanoctl.home import Home
    from nanoctl.train.sft import SFTOptions, sft
    home, data, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sft(SFTOptions(data=[data], device="cpu", num_iterations=2, device_batch_size=1, target_examples_per_step=1,
                   eval_every=-1, eval_steps=1, eval_metrics_every=-1, metric_tasks=[], lora_rank=rank,
                   output_tag="lora" if rank else "full", threads=1), home=Home.resolve(home))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec (it would start at pytest's own peak)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kib": int(hwm.split()[1])}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
@pytest.mark.slow  # two fresh processes (torch import, 28 MiB checkpoint): ~25 s CPU, a minute on a busy box
def test_lora_sft_uses_less_peak_memory_than_full_sft(home: Path, tmp_path: Path) -> None:
    """Peak RSS (VmHWM of a fresh process each) of 2 SFT steps of the same 7M-parameter model: full
    fine-tuning adds gradients and Muon/AdamW state for every weight, LoRA only for its adapters. The
    whole process is measured (imports included, the same in both), so the margin asked is half of what
    full SFT's gradients alone take."""
    from nanoctl.model.gpt import build_model

    cfg = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=4, n_head=3, n_kv_head=3, n_embd=384, arch="classic")
    model = build_model(cfg, "cpu", torch.float32)
    save_model(home, model, stage="base", tag="d4", step=0)
    params_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    del model
    data = conversations_file(tmp_path / "c.jsonl", n=8)

    def peak(rank: int) -> float:
        out = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(home), str(data), str(rank)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024

    full, lora = peak(0), peak(16)
    print(f"peak RSS: full {full:.0f} MiB, lora {lora:.0f} MiB, weights {params_mib:.0f} MiB")
    assert lora < full - 0.5 * params_mib, (full, lora, params_mib)


def test_serve_mounts_an_adapter(home: Path, tmp_path: Path) -> None:
    """`nanoctl serve --lora DIR` loads the adapter's base, serves base + adapter under a +lora model id."""
    import os
    import signal

    import httpx

    model = tiny("classic")
    save_model(home, model, stage="base", tag="d2", step=0)
    add_lora(model, make_config(4, None, 0.0, "all"))
    randomize_adapters(model)
    adapter = tmp_path / "adapter"
    save_adapter(adapter, model, {"stage": "sft", "tag": "d2", "step": 7,
                                  "parent": {"stage": "base", "tag": "d2", "step": 0}})
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoctl", "--home", str(home), "serve", "--lora", str(adapter), "--port", "0",
         "--device", "cpu", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # events, one JSON object a line; "ready" once the model is loaded
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") in ("ready", "error"):
                break
        assert event.get("event") == "ready", proc.stderr.read() if proc.poll() is not None else event
        assert event["model"] == "base/d2@0+lora:sft@7"
        models = httpx.get(event["url"] + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["base/d2@0+lora:sft@7"]
        reply = httpx.post(event["url"] + "/v1/chat/completions", timeout=60, json={
            "model": "base/d2@0+lora:sft@7", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0})
        assert reply.status_code == 200, reply.text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_mid_and_rl_train_adapters_too(home: Path, tmp_path: Path) -> None:
    """The options live on every post-training stage: mid and rl write adapters under adapters/<stage>/."""
    from nanoctl.train.mid import MidOptions, mid
    from nanoctl.train.rl import RLOptions, rl

    save_model(home, tiny("classic"), stage="base", tag="d2", step=0)
    save_model(home, tiny("classic", seed=3), stage="sft", tag="d2", step=0, with_tokenizer=False)
    data = conversations_file(tmp_path / "c.jsonl")
    m = mid(MidOptions(data=[str(data)], device="cpu", num_iterations=2, device_batch_size=2, total_batch_size=128,
                       max_seq_len=64, eval_every=-1, lora_rank=2, threads=1), home=Home(home))
    r = rl(RLOptions(task="SpellingBee", device="cpu", num_iterations=1, device_batch_size=2, examples_per_step=1,
                     num_samples=2, max_new_tokens=8, eval_every=-1, eval_examples=1, lora_rank=2, lora_targets="q,v",
                     threads=1), home=Home(home))
    for result, stage, parent in ((m, "mid", "base"), (r, "rl", "sft")):
        out = Path(result.checkpoint_dir)
        assert out == home / "adapters" / stage / "d2"
        record = json.loads((out / "nanoctl_adapter.json").read_text())
        assert record["stage"] == stage and record["parent"]["stage"] == parent
        weights = torch.load(out / f"model_{result.final_step:06d}.pt", weights_only=True)
        assert weights and all(".lora_" in k for k in weights)
    assert not (home / "checkpoints" / "mid").exists() and not (home / "checkpoints" / "rl").exists()
