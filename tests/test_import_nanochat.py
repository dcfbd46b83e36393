"""`nanoctl import nanochat`: checkpoints laid out the way nanochat writes them (its own torch.save of the
state dict, `_orig_mod.` prefixes, meta JSON with model_config/user_config, a pickled tiktoken tokenizer)
import into the home, load, chat, fine-tune and export.

The fixture never goes through our save_checkpoint: it writes the files as nanochat's
checkpoint_manager.save_checkpoint and tokenizer.save do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from nanoctl.atomic import file_digest
from nanoctl.checkpoint import find_checkpoint, load_checkpoint, load_model
from nanoctl.cli.main import app
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.model.gpt import GPT
from nanoctl.nanochat_import import ImportNanochatOptions, import_nanochat
from tiny_chat import CONVERSATIONS, random_model, save_model, single_thread, tiny_config, tiny_tokenizer

NANOCHAT_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def nanochat_save(directory: Path, model: GPT, step: int, compiled: bool, **meta: Any) -> None:
    """What nanochat's save_checkpoint writes: torch.save(state_dict) and json.dump(meta, indent=2)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {("_orig_mod." if compiled else "") + k: v for k, v in model.state_dict().items()}
    if model.config.arch == "classic":  # nanochat kept wte in bf16 on CUDA
        key = ("_orig_mod." if compiled else "") + "transformer.wte.weight"
        state[key] = state[key].to(torch.bfloat16)
    torch.save(state, directory / f"model_{step:06d}.pt")
    config = {k: getattr(model.config, k) for k in NANOCHAT_KEYS}
    if model.config.arch == "current":  # classic (Oct 2025) nanochat had no window_pattern
        config["window_pattern"] = model.config.window_pattern
    data = {
        "step": step,
        "val_bpb": 1.5,
        "model_config": config,
        "user_config": {"run": "dummy", "depth": model.config.n_layer, "device_batch_size": 4},
        "device_batch_size": 4,
        "max_seq_len": model.config.sequence_len,
        **meta,
    }
    with open(directory / f"meta_{step:06d}.json", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    torch.save({"muon": {"momentum_buffer": torch.zeros(2)}}, directory / f"optim_{step:06d}_rank0.pt")


def nanochat_tokenizer(directory: Path) -> None:
    """nanochat's tokenizer/: a pickled tiktoken Encoding and token_bytes.pt (no tokenizer.json)."""
    tok = tiny_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "tokenizer.pkl", "wb") as f:
        pickle.dump(tok.enc, f)
    torch.save(torch.tensor(tok.token_bytes(), dtype=torch.int32), directory / "token_bytes.pt")


@pytest.fixture
def models() -> dict[str, GPT]:
    classic = random_model(dataclasses.replace(tiny_config(), arch="classic"), seed=2)
    with torch.no_grad():  # the values a bf16 wte holds, so the imported model must match exactly
        classic.transformer.wte.weight.copy_(classic.transformer.wte.weight.to(torch.bfloat16))
    return {"current": random_model(tiny_config(), seed=1), "classic": classic}


@pytest.fixture
def nanochat_dir(tmp_path: Path, models: dict[str, GPT]) -> Path:
    """~/.cache/nanochat: a current-arch base (torch.compile'd: prefixed keys, two steps), a classic sft."""
    base = tmp_path / "nanochat"
    nanochat_tokenizer(base / "tokenizer")
    nanochat_save(base / "base_checkpoints" / "d2", models["current"], 100, compiled=True)
    nanochat_save(base / "base_checkpoints" / "d2", models["current"], 200, compiled=True)
    nanochat_save(base / "chatsft_checkpoints" / "d2", models["classic"], 50, compiled=False, val_loss=0.9)
    return base


def logits(model: GPT) -> torch.Tensor:
    idx = torch.arange(20).view(1, 20) % 300
    with torch.no_grad():
        return model(idx)


def test_base_dir_imports_both_archs_and_loads(
    nanochat_dir: Path, home: Path, models: dict[str, GPT]
) -> None:
    summary = import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    got = {
        (c["stage"], c["tag"], c["step"]): (c["arch"], c["status"], c["method"])
        for c in summary["checkpoints"]
    }
    assert got == {
        ("base", "d2", 100): ("current", "imported", "copy"),
        ("base", "d2", 200): ("current", "imported", "copy"),
        ("sft", "d2", 50): ("classic", "imported", "copy"),
    }
    assert summary["tokenizer"]["home"] == "written"
    assert (home / "tokenizer" / "tokenizer.json").is_file()
    for stage, arch in (("base", "current"), ("sft", "classic")):
        model, tok, meta = load_model(stage=stage, device="cpu", home=home)
        assert model.config.arch == arch and meta["stage"] == stage
        torch.testing.assert_close(logits(model), logits(models[arch]), atol=1e-5, rtol=0)
        assert (Path(meta["ref"]["directory"]) / "tokenizer.json").is_file()
    meta = json.loads((home / "checkpoints" / "base" / "d2" / "meta_000200.json").read_text())
    origin = meta["imported_from"]
    assert origin["source"] == str(nanochat_dir / "base_checkpoints" / "d2") and origin["step"] == 200
    assert origin["nanochat_dir"] == "base_checkpoints" and origin["method"] == "copy"
    assert meta["val_bpb"] == 1.5 and meta["user_config"]["run"] == "dummy" and meta["final"]
    assert meta["model_config"]["arch"] == "current"
    src = nanochat_dir / "base_checkpoints" / "d2" / "model_000200.pt"
    assert meta["files"]["model_000200.pt"]["sha256"] == file_digest(src)
    assert not list((home / "checkpoints" / "base" / "d2").glob("optim_*"))  # shards only with optimizer=True
    # the loaded state has no `_orig_mod.` left (load_checkpoint strips it)
    state, _, _ = load_checkpoint(home / "checkpoints" / "base" / "d2", 200)
    assert not any(k.startswith("_orig_mod.") for k in state) and "resid_lambdas" in state


def test_reimport_is_idempotent(nanochat_dir: Path, home: Path) -> None:
    import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    dest = home / "checkpoints" / "sft" / "d2"
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    assert {c["status"] for c in again["checkpoints"]} == {"unchanged"}
    assert again["tokenizer"]["home"] == "same"
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_engine_generates_from_import(nanochat_dir: Path, home: Path) -> None:
    from nanoctl.engine import Engine, SamplingParams

    import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    model, tok, meta = load_model(device="cpu", home=home)  # newest stage: the imported sft
    assert meta["ref"]["stage"] == "sft"
    prompt = tok.render_for_completion(CONVERSATIONS[0])
    with single_thread():
        seqs, _ = Engine(model, tok).generate_batch(prompt, SamplingParams(temperature=0.0, max_tokens=8))
    new = seqs[0][len(prompt) :]
    assert 1 <= len(new) <= 8
    with torch.no_grad():  # greedy: the first token is the model's argmax after the prompt
        assert new[0] == int(model(torch.tensor([prompt]))[0, -1].argmax())


def test_tokenizer_json_alone_suffices(nanochat_dir: Path, home: Path) -> None:
    import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    dest = home / "checkpoints" / "sft" / "d2"
    (dest / "tokenizer.pkl").unlink()
    (home / "tokenizer" / "tokenizer.pkl").unlink()
    _, tok, _ = load_model(stage="sft", device="cpu", home=home)
    text = "hello there, see you soon"
    assert tok.encode(text) == tiny_tokenizer().encode(text)


def test_link_keeps_digests_valid(nanochat_dir: Path, home: Path) -> None:
    summary = import_nanochat(nanochat_dir, ImportNanochatOptions(link=True, optimizer=True), home=Home(home))
    assert {c["method"] for c in summary["checkpoints"]} == {"hardlink"}  # same filesystem (tmp_path)
    src = nanochat_dir / "chatsft_checkpoints" / "d2"
    dest = home / "checkpoints" / "sft" / "d2"
    for name in ("model_000050.pt", "optim_000050_rank0.pt"):
        assert (dest / name).stat().st_ino == (src / name).stat().st_ino
    meta = json.loads((dest / "meta_000050.json").read_text())
    assert meta["files"]["optim_000050_rank0.pt"]["sha256"] == file_digest(src / "optim_000050_rank0.pt")
    load_checkpoint(dest, 50, load_optimizer=True)  # sizes and sha256 check out
    with open(src / "model_000050.pt", "r+b") as f:  # the source changes in place: the link sees it
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    with pytest.raises(NanoctlError, match="corrupt"):
        load_checkpoint(dest, 50)


def test_link_falls_back_to_symlink(nanochat_dir: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def cross_device(*_: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # the OS refusing a hard link, as across filesystems
    summary = import_nanochat(
        nanochat_dir, ImportNanochatOptions(link=True, tag="d2", stage="sft"), home=Home(home)
    )
    assert [c["method"] for c in summary["checkpoints"]] == ["symlink"]
    assert any("symlinked" in n for n in summary["notes"])
    dest = home / "checkpoints" / "sft" / "d2" / "model_000050.pt"
    assert dest.is_symlink() and dest.resolve() == (
        nanochat_dir / "chatsft_checkpoints" / "d2" / "model_000050.pt"
    )
    load_model(stage="sft", device="cpu", home=home)


def test_unknown_model_config_key_is_named(nanochat_dir: Path, home: Path) -> None:
    meta = nanochat_dir / "chatsft_checkpoints" / "d2" / "meta_000050.json"
    data = json.loads(meta.read_text())
    data["model_config"]["use_block_attn_res"] = True  # a fork's feature
    data["model_config"]["n_experts"] = 8  # our MoE's field: no nanochat model has it
    meta.write_text(json.dumps(data))
    with pytest.raises(NanoctlError, match="model_config key 'use_block_attn_res'.*also 'n_experts'") as e:
        import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    assert "meta_000050.json" in str(e.value)
    assert not (home / "checkpoints").exists()  # checked before anything is written


def test_weights_that_do_not_fit_are_named(nanochat_dir: Path, home: Path, models: dict[str, GPT]) -> None:
    d = nanochat_dir / "chatsft_checkpoints" / "d2"
    state = torch.load(d / "model_000050.pt", weights_only=True)
    state["transformer.h.0.attn.c_q.weight"] = torch.zeros(32, 64)
    torch.save(state, d / "model_000050.pt")
    with pytest.raises(NanoctlError, match=r"c_q.weight has shape \(32, 64\)"):
        import_nanochat(d, ImportNanochatOptions(), home=Home(home))


def test_existing_destination_needs_force(nanochat_dir: Path, home: Path) -> None:
    ours = random_model(tiny_config(), seed=5)
    save_model(home, ours, stage="base", tag="d2", step=200)  # a nanoctl-trained step in the way
    with pytest.raises(NanoctlError, match="already holds step 200") as e:
        import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    assert "--force" in (e.value.hint or "")
    assert not (home / "checkpoints" / "base" / "d2" / "meta_000100.json").exists()  # nothing written
    summary = import_nanochat(nanochat_dir, ImportNanochatOptions(force=True), home=Home(home))
    assert {(c["step"], c["status"]) for c in summary["checkpoints"] if c["stage"] == "base"} == {
        (100, "imported"),
        (200, "replaced"),
    }
    meta = json.loads((home / "checkpoints" / "base" / "d2" / "meta_000200.json").read_text())
    assert meta["imported_from"]["step"] == 200


def test_single_checkpoint_directory(nanochat_dir: Path, home: Path, tmp_path: Path) -> None:
    # inside nanochat's layout: the stage comes from the parent's name, the tokenizer from ../../tokenizer
    s = import_nanochat(nanochat_dir / "chatsft_checkpoints" / "d2", ImportNanochatOptions(), home=Home(home))
    assert [(c["stage"], c["tag"], c["step"]) for c in s["checkpoints"]] == [("sft", "d2", 50)]
    assert s["tokenizer"]["source"] == str(nanochat_dir / "tokenizer")
    # copied elsewhere: the stage and tokenizer must be given
    loose = tmp_path / "somewhere" / "my_model"
    loose.mkdir(parents=True)
    for p in (nanochat_dir / "base_checkpoints" / "d2").iterdir():
        (loose / p.name).write_bytes(p.read_bytes())
    with pytest.raises(UsageError, match="--stage"):
        import_nanochat(loose, ImportNanochatOptions(), home=Home(home))
    with pytest.raises(NanoctlError, match="--tokenizer"):
        import_nanochat(loose, ImportNanochatOptions(stage="mid"), home=Home(home))
    s = import_nanochat(
        loose,
        ImportNanochatOptions(
            stage="mid", step=100, tokenizer=str(nanochat_dir / "tokenizer" / "tokenizer.pkl")
        ),
        home=Home(home),
    )
    assert [(c["stage"], c["tag"], c["step"]) for c in s["checkpoints"]] == [("mid", "my_model", 100)]
    assert find_checkpoint("mid", home=Home(home)).step == 100


def tiny_sft(home: Path, steps: int) -> Any:
    """A few sft steps from the imported base on CONVERSATIONS, into sft/tuned."""
    from nanoctl.tasks.common import Task
    from nanoctl.train.sft import SFTOptions, sft

    class Fixed(Task):
        def num_examples(self) -> int:
            return len(CONVERSATIONS)

        def get_example(self, index: int) -> dict[str, Any]:
            return CONVERSATIONS[index]

    opts = SFTOptions(
        source="base", device="cpu", num_iterations=steps, device_batch_size=3, target_examples_per_step=3,
        eval_every=-1, eval_steps=1, eval_metrics_every=-1, metric_tasks=[], output_tag="tuned",
        train_task=Fixed(), val_task=Fixed(), threads=1,
    )  # fmt: skip
    with single_thread():
        return sft(opts, home=Home(home))


def test_sft_starts_from_imported_base(nanochat_dir: Path, home: Path) -> None:
    import_nanochat(nanochat_dir, ImportNanochatOptions(stage="base"), home=Home(home))
    result = tiny_sft(home, 2)
    assert result.final_step == 2 and result.parent == {"stage": "base", "tag": "d2", "step": 200}
    model, tok, meta = load_model(stage="sft", tag="tuned", device="cpu", home=home)
    assert meta["parent"] == {"stage": "base", "tag": "d2", "step": 200} and model.config.arch == "current"
    assert tok.get_vocab_size() == tiny_tokenizer().get_vocab_size()


def test_export_hf_on_imported_classic(
    nanochat_dir: Path, home: Path, tmp_path: Path, models: dict[str, GPT]
) -> None:
    transformers = pytest.importorskip("transformers")
    from nanoctl.export.hf_export import ExportHFOptions, export_hf

    import_nanochat(nanochat_dir, ImportNanochatOptions(stage="sft"), home=Home(home))
    out = tmp_path / "hf"
    export_hf(out, ExportHFOptions(stage="sft"), home=Home(home))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.arange(20).view(1, 20) % 300
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=idx).logits.float(), logits(models["classic"]), atol=1e-4, rtol=0
        )


def test_cli(nanochat_dir: Path, home: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app, ["import", "nanochat", str(nanochat_dir), "--tag", "d2", "--stage", "sft", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert [c["status"] for c in json.loads(r.stdout)["checkpoints"]] == ["imported"]
    r = runner.invoke(app, ["import", "nanochat", str(nanochat_dir), "--stage", "sft"])
    assert r.exit_code == 0 and "unchanged sft/d2 step 50 [classic]" in r.output, r.output
    r = runner.invoke(
        app, ["chat", "-p", "hi", "--max-tokens", "4", "-t", "0", "--json"]
    )  # talks to the import
    assert r.exit_code == 0 and json.loads(r.stdout)["model"] == "sft/d2@50", r.output
    r = runner.invoke(app, ["import", "nanochat", str(nanochat_dir / "nope")])
    assert r.exit_code == 2 and "is not a directory" in r.output
    r = runner.invoke(app, ["import", "nanochat", str(nanochat_dir), "--tag", "d99"])
    assert (
        r.exit_code == 1
        and "no nanochat checkpoint with tag 'd99'" in r.output
        and "Traceback" not in r.output
    )


def test_tokenizer_of_another_vocab_is_refused(nanochat_dir: Path, home: Path, tmp_path: Path) -> None:
    from nanoctl.tokenizer import Tokenizer

    other = tmp_path / "other_tok"
    other.mkdir()
    with open(other / "tokenizer.pkl", "wb") as f:
        pickle.dump(Tokenizer.train_from_iterator(iter(["abc abd abe " * 50]), 300).enc, f)
    with pytest.raises(NanoctlError, match=r"has \d+ tokens, base/d2@100 was trained with 320"):
        import_nanochat(nanochat_dir, ImportNanochatOptions(tokenizer=str(other)), home=Home(home))


def test_posttraining_keeps_the_imported_tokenizer(nanochat_dir: Path, home: Path) -> None:
    """The home trains with another tokenizer (same vocab size): an sft from the import must still carry the
    import's tokenizer, or the tuned model decodes into the wrong text."""
    from nanoctl.tokenizer import Tokenizer

    Tokenizer.train_from_iterator(iter(["zq xv zq xv qqq " * 80, "other words entirely " * 80]), 320).save(
        home / "tokenizer"
    )
    summary = import_nanochat(nanochat_dir, ImportNanochatOptions(stage="base"), home=Home(home))
    assert summary["tokenizer"]["home"] == "kept"
    tiny_sft(home, 1)
    _, tok, _ = load_model(stage="sft", tag="tuned", device="cpu", home=home)
    text = "hello there, see you soon"
    assert tok.encode(text) == tiny_tokenizer().encode(text)


def test_unpadded_vocab_of_old_nanochat(home: Path, tmp_path: Path) -> None:
    """nanochat before Dec 2025 kept wte/lm_head at exactly vocab_size rows; we pad them when loading."""
    from nanoctl.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(iter(["abc abd abe hello there " * 50]), 300)
    assert tok.get_vocab_size() % 64
    base = tmp_path / "nanochat"
    (base / "tokenizer").mkdir(parents=True)
    with open(base / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(tok.enc, f)
    config = dataclasses.replace(tiny_config(), arch="classic", vocab_size=tok.get_vocab_size())
    model = random_model(config, seed=3)
    d = base / "base_checkpoints" / "d2"
    nanochat_save(d, model, 10, compiled=False)
    state = torch.load(d / "model_000010.pt", weights_only=True)
    for k in ("transformer.wte.weight", "lm_head.weight"):
        state[k] = state[k][: config.vocab_size]
    torch.save(state, d / "model_000010.pt")
    import_nanochat(base, ImportNanochatOptions(), home=Home(home))
    loaded, _, _ = load_model(stage="base", device="cpu", home=home)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(model.transformer.wte.weight.to(torch.bfloat16))  # as saved
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_not_beside_a_running_stage(nanochat_dir: Path, home: Path) -> None:
    from nanoctl.checkpoint import lock_run_dir

    with lock_run_dir(home / "checkpoints" / "sft" / "d2", "nanoctl sft"):  # a training run writing there
        with pytest.raises(NanoctlError, match="in use by another training run"):
            import_nanochat(nanochat_dir, ImportNanochatOptions(stage="sft"), home=Home(home))
    assert not list((home / "checkpoints" / "sft" / "d2").glob("model_*"))


class Boom:
    """Unpickling this would run code (os.system here): the import must refuse before it does."""

    def __reduce__(self) -> Any:
        return (os.system, ("true",))


def test_a_tokenizer_pickle_that_runs_code_is_refused(nanochat_dir: Path, home: Path) -> None:
    with open(nanochat_dir / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump({"enc": Boom()}, f)
    with pytest.raises(NanoctlError, match=r"references posix\.system: it is not a plain pickled tiktoken"):
        import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    assert not (home / "checkpoints").exists()


def test_a_moved_nanochat_dir_imports_as_unchanged(nanochat_dir: Path, home: Path, tmp_path: Path) -> None:
    import_nanochat(nanochat_dir, ImportNanochatOptions(), home=Home(home))
    moved = tmp_path / "moved"
    nanochat_dir.rename(moved)
    again = import_nanochat(moved, ImportNanochatOptions(), home=Home(home))
    assert {c["status"] for c in again["checkpoints"]} == {"unchanged"}
    with open(moved / "base_checkpoints" / "d2" / "model_000200.pt", "r+b") as f:  # other bytes: not the same
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(NanoctlError, match="already holds step 200"):
        import_nanochat(moved, ImportNanochatOptions(), home=Home(home))


def test_another_tokenizer_at_the_destination_needs_force(nanochat_dir: Path, home: Path) -> None:
    from nanoctl.tokenizer import Tokenizer

    dest = home / "checkpoints" / "sft" / "d2"
    Tokenizer.train_from_iterator(iter(["zq xv zq xv qqq " * 80]), 320).save(dest)  # beside a run of ours
    with pytest.raises(NanoctlError, match="holds another tokenizer"):
        import_nanochat(nanochat_dir, ImportNanochatOptions(stage="sft"), home=Home(home))
    import_nanochat(nanochat_dir, ImportNanochatOptions(stage="sft", force=True), home=Home(home))
    _, tok, _ = load_model(stage="sft", device="cpu", home=home)
    assert tok.encode("hello there") == tiny_tokenizer().encode("hello there")
    assert (dest / "tokenizer.json").is_file() and (dest / "token_bytes.pt").is_file()
