"""`nanoctl export hf`: transformers loads the directory of each arch (classic natively, current through the
shipped remote code); logits, greedy KV-cache decode, tokenizer, chat template (tool calls included) and
the text-generation pipeline agree with ours; what cannot be exported is refused by name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.export.hf import REMOTE_CODE_DIR, REMOTE_CODE_FILES, to_remote_state_dict
from nanoctl.export.hf_export import ExportHFOptions, export_hf, write_hf_directory
from nanoctl.home import Home
from nanoctl.model import gpt
from nanoctl.model.gpt import GPT, GPTConfig
from nanoctl.tokenizer import Tokenizer
from tiny_chat import (
    CONVERSATIONS,
    hf_logits_without_nanoctl,
    random_model,
    save_model,
    tiny_tokenizer,
    trained_chat_model,
)

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 200  # past the current arch's short window (128 at sequence_len 256): the window matters
CLASSES = {"classic": "NanoChatForCausalLM", "current": "NanoctlForCausalLM"}
STOPS = ("<|assistant_end|>", "<|bos|>")  # generation_config's eos ids


def _model(arch: str) -> GPT:
    """A tiny random model of `arch`: GQA, 3 layers; current has windows S,S,L, ve on 0 and 2, backout at 1."""
    cfg = GPTConfig(
        sequence_len=256,
        vocab_size=tiny_tokenizer().get_vocab_size(),
        n_layer=3 if arch == "current" else 2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        window_pattern="SSL",
        arch=arch,
    )
    return random_model(cfg, scale=0.2)


def _load(out: Path, **kwargs) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kwargs).eval()


@pytest.fixture(params=["classic", "current"])
def exported(request: pytest.FixtureRequest, home: Path, tmp_path: Path) -> tuple[GPT, Path]:
    m = _model(request.param)
    save_model(home, m)
    out = tmp_path / "hf"
    result = export_hf(out, ExportHFOptions(), home=Home(home))
    assert result["arch"] == request.param
    return m, out


def _prompt(length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(1))


def test_model_loads_and_matches(exported: tuple[GPT, Path]) -> None:
    m, out = exported
    hf = _load(out)
    assert type(hf).__name__ == CLASSES[m.config.arch]
    assert hf.dtype == torch.float32
    idx = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits.float(), m(idx), atol=1e-4, rtol=0)
        # do_sample=False: greedy through generate(), i.e. through the HF KV cache (DynamicCache).
        got = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=32, do_sample=False)
    want = list(m.generate(idx[0].tolist(), 32, temperature=0.0))
    tok = tiny_tokenizer()
    stops = {tok.encode_special(s) for s in STOPS}
    cut = next((i + 1 for i, t in enumerate(want) if t in stops), len(want))  # HF stops after an eos
    assert got[0, PROMPT_LEN:].tolist() == want[:cut]
    assert cut > 8, "the random model stopped too early for the comparison to mean much"


def test_left_padded_batch_generates_each_row_as_alone(tmp_path: Path) -> None:
    """Batched generate() with left padding (the remote code's key-padding mask and smear over pads)."""
    m = _model("current")
    write_hf_directory(tmp_path / "hf", m.state_dict(), m.config, tiny_tokenizer())
    hf = _load(tmp_path / "hf")
    long, short = _prompt(PROMPT_LEN)[0], _prompt(PROMPT_LEN - 60)[0].flip(0)
    pad = hf.generation_config.pad_token_id
    ids = torch.stack([long, torch.cat([torch.full((60,), pad), short])])
    mask = torch.stack(
        [torch.ones(PROMPT_LEN), torch.cat([torch.zeros(60), torch.ones(PROMPT_LEN - 60)])]
    ).long()
    with torch.no_grad():
        got = hf.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    for row, prompt in zip(got, (long, short), strict=True):
        want = list(m.generate(prompt.tolist(), 12, temperature=0.0))
        assert row[PROMPT_LEN:].tolist() == want


def test_beam_search_and_a_manual_cache_loop(tmp_path: Path) -> None:
    """Beams reorder the cache: the cached beam search equals the uncached one (full recompute). A
    hand-written decode loop over a DynamicCache (no generate()) gives our logits at every step."""
    from transformers.cache_utils import DynamicCache

    m = _model("current")
    write_hf_directory(tmp_path / "hf", m.state_dict(), m.config, tiny_tokenizer())
    hf = _load(tmp_path / "hf")
    idx = _prompt(PROMPT_LEN - 40)
    beams = dict(num_beams=3, do_sample=False, max_new_tokens=10, min_new_tokens=10)
    with torch.no_grad():
        cached = hf.generate(idx, attention_mask=torch.ones_like(idx), use_cache=True, **beams)
        uncached = hf.generate(idx, attention_mask=torch.ones_like(idx), use_cache=False, **beams)
        assert cached.tolist() == uncached.tolist()

        full = m(_prompt(PROMPT_LEN))
        cache = DynamicCache(config=hf.config)
        step = hf(input_ids=_prompt(PROMPT_LEN)[:, :150], cache=cache, use_cache=True).logits
        got = [step]
        for t in range(150, PROMPT_LEN):
            got.append(hf(input_ids=_prompt(PROMPT_LEN)[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-4, rtol=0)


def test_current_arch_sliding_window_is_exercised(tmp_path: Path) -> None:
    """The prompt is long enough that dropping the windows changes the logits (so the test above checks them)."""
    m = _model("current")
    assert min(m.window_sizes) < PROMPT_LEN - 1
    write_hf_directory(tmp_path / "hf", m.state_dict(), m.config, tiny_tokenizer())
    idx = _prompt()
    hf = _load(tmp_path / "hf")
    with torch.no_grad():
        windowed = hf(input_ids=idx).logits
        hf.config.window_sizes = [-1] * hf.config.num_hidden_layers
        for layer in hf.model.layers:
            layer.self_attn.window = -1
        unwindowed = hf(input_ids=idx).logits
    assert (windowed - unwindowed).abs().max().item() > 1e-3


def test_exported_files(exported: tuple[GPT, Path]) -> None:
    m, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    tok = tiny_tokenizer()
    assert config["bos_token_id"] == tok.get_bos_token_id()
    assert config["eos_token_id"] == tok.encode_special("<|assistant_end|>")
    if m.config.arch == "current":
        assert set(REMOTE_CODE_FILES) <= names
        assert config["model_type"] == "nanoctl" and config["model_type"] not in transformers.CONFIG_MAPPING
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanoctl.NanoctlForCausalLM"
        assert config["window_sizes"] == m.window_sizes
    else:
        assert not set(REMOTE_CODE_FILES) & names and "auto_map" not in config
        assert config["model_type"] == "nanochat"


def test_peft_module_names(exported: tuple[GPT, Path]) -> None:
    """LoRA targets the usual names (q_proj, v_proj, ...) on both archs, like transformers' NanoChat."""
    _, out = exported
    names = {n for n, _ in _load(out).named_modules()}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{proj}" in names
    assert {"model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2", "lm_head"} <= names


def test_remote_model_trains_with_peft_and_saves(tmp_path: Path) -> None:
    """The remote-code model takes LoRA adapters (a loss, gradients on the adapters only) and
    save_pretrained writes a directory that loads back to the same logits, remote code included."""
    peft = pytest.importorskip("peft")
    m = _model("current")
    write_hf_directory(tmp_path / "hf", m.state_dict(), m.config, tiny_tokenizer())
    hf = _load(tmp_path / "hf")
    idx = _prompt(48)
    hf.save_pretrained(tmp_path / "again")
    assert set(REMOTE_CODE_FILES) <= {p.name for p in (tmp_path / "again").iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "again")(input_ids=idx).logits, m(idx), atol=1e-4, rtol=0)
        # labels = input_ids (HF shifts them): the same mean loss as ours on the shifted targets
        theirs = hf(input_ids=idx, labels=idx).loss
        torch.testing.assert_close(theirs, m(idx[:, :-1], targets=idx[:, 1:]), atol=1e-4, rtol=0)
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"]))
    loss = lora(input_ids=idx, labels=idx).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("layers.2.self_attn.v_proj.lora_B" in n for n in grads)


def test_pipeline_replies(exported: tuple[GPT, Path]) -> None:
    _, out = exported
    pipe = transformers.pipeline("text-generation", model=str(out), trust_remote_code=True, device="cpu")
    reply = pipe([{"role": "user", "content": "hi"}], max_new_tokens=8, do_sample=False)
    messages = reply[0]["generated_text"]
    assert messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str)


def test_pipeline_reply_of_a_trained_model(home: Path, tmp_path: Path) -> None:
    """The tiny chat model (current arch) memorized "hi" -> "hello there": the pipeline says it too."""
    save_model(home, trained_chat_model())
    export_hf(tmp_path / "hf", ExportHFOptions(), home=Home(home))
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), trust_remote_code=True)
    reply = pipe([{"role": "user", "content": "hi"}], max_new_tokens=16, do_sample=False)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": "hello there"}


TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    *CONVERSATIONS[2]["messages"],  # an assistant turn with python / python_output parts
    {"role": "user", "content": "Hi there, 12345!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again?"},
]


@pytest.mark.parametrize("messages", [TOOL_CONVERSATION, TOOL_CONVERSATION[3:], TOOL_CONVERSATION[1:2]])
def test_chat_template_matches_our_renderer(home: Path, tmp_path: Path, messages: list[dict]) -> None:
    save_model(home, _model("classic"))
    export_hf(tmp_path / "hf", ExportHFOptions(), home=Home(home))
    hft = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hft.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    tok = tiny_tokenizer()
    ours = tok.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    assert list(ids) == ours
    if any(isinstance(m["content"], list) for m in messages):
        assert tok.encode_special("<|python_start|>") in ours and tok.encode_special("<|output_end|>") in ours
    # Without the generation prompt, whole conversations render as in training.
    if messages[-1]["role"] == "user":
        full = [*messages, {"role": "assistant", "content": "ok"}]
        ids = hft.apply_chat_template(full, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        assert list(ids) == tok.render_conversation({"messages": full})[0]


def test_chat_template_refuses_what_our_renderer_refuses(home: Path, tmp_path: Path) -> None:
    save_model(home, _model("classic"))
    export_hf(tmp_path / "hf", ExportHFOptions(), home=Home(home))
    hft = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    bad_part = [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image"}]}]
    with pytest.raises(Exception, match="unknown assistant part type: image"):
        hft.apply_chat_template(bad_part, tokenize=False)
    with pytest.raises(Exception, match="alternate"):
        hft.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def _real_text(shared_data: Path, size: int = 1_000_000) -> str:
    from nanoctl.data.shards import iter_shard_texts

    out, n = [], 0
    for text in iter_shard_texts(sorted((shared_data / "pretrain").glob("*.parquet"))):
        out.append(text)
        n += len(text.encode())
        if n >= size:
            break
    return "\n".join(out)


def test_real_text_encodes_identically(shared_data: Path, tmp_path: Path) -> None:
    """1 MB of the shared pretraining text: AutoTokenizer on the exported tokenizer.json == our ids."""
    from nanoctl.tokenizer_json import write_hf_tokenizer

    text = _real_text(shared_data)
    assert len(text.encode()) >= 1_000_000
    tok = Tokenizer.train_from_iterator(iter([text[:200_000]]), 2048)
    tok.save(tmp_path / "tok")
    write_hf_tokenizer(tok, tmp_path / "tok")
    hft = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hft(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    # No pickle needed: from_directory rebuilds the same tokenizer from tokenizer.json.
    (tmp_path / "tok" / "tokenizer.pkl").unlink()
    back = Tokenizer.from_directory(tmp_path / "tok")
    assert back.encode(text[:20_000]) == tok.encode(text[:20_000])
    assert back.get_bos_token_id() == tok.get_bos_token_id()


def test_remote_code_imports_only_torch_and_transformers() -> None:
    allowed = {"__future__", "math", "torch", "transformers"}
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((REMOTE_CODE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name}:{node.lineno} imports {roots - allowed}"


def test_remote_code_loads_without_nanoctl(tmp_path: Path) -> None:
    """A fresh interpreter in which `import nanoctl` fails loads and runs the current-arch export."""
    m = _model("current")
    out = tmp_path / "hf"
    write_hf_directory(out, m.state_dict(), m.config, tiny_tokenizer())
    idx = _prompt(40)
    theirs = hf_logits_without_nanoctl(out, idx)
    with torch.no_grad():
        torch.testing.assert_close(theirs, m(idx)[0, -1], atol=1e-4, rtol=0)


def test_cli(home: Path, tmp_path: Path) -> None:
    save_model(home, _model("current"))
    r = CliRunner().invoke(
        app, ["--home", str(home), "export", "hf", str(tmp_path / "o"), "--dtype", "bf16", "--json"]
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["arch"] == "current" and "modeling_nanoctl.py" in result["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _load(tmp_path / "o").dtype == torch.bfloat16
    r = CliRunner().invoke(app, ["--home", str(home), "export", "hf", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--force" in r.output


def test_unknown_arch_is_refused_by_name(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant this exporter does not know (a future arch the model layer accepts) is named, not guessed."""
    m = _model("current")
    monkeypatch.setattr(gpt, "ARCHS", (*gpt.ARCHS, "future"))
    m.config.arch = "future"
    save_model(home, m)
    r = CliRunner().invoke(app, ["--home", str(home), "export", "hf", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "'future' arch has no Hugging Face export" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_unknown_tensor_is_refused_by_name() -> None:
    """A checkpoint tensor with no place in the export (an unknown feature) is named instead of dropped."""
    from nanoctl.errors import UsageError

    m = _model("current")
    state = dict(m.state_dict())
    state["transformer.h.0.attn.rope_gate.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match="rope_gate"):
        to_remote_state_dict(state, m.config)
