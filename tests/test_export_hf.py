"""`nanoctl export hf`: transformers loads the directory; logits, greedy decode, tokenizer and chat template agree."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.export.hf_export import ExportHFOptions, export_hf
from nanoctl.home import Home
from nanoctl.model.gpt import GPTConfig, build_model
from nanoctl.tokenizer import Tokenizer
from tiny_chat import save_model, tiny_tokenizer

transformers = pytest.importorskip("transformers")
SAMPLE = Path(__file__).parent.parent / "src/nanoctl/sample_data/sample.jsonl.gz"


def _text(n: int = 300_000) -> str:
    out, size = [], 0
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            t = json.loads(line)["text"]
            out.append(t)
            size += len(t)
            if size > n:
                break
    return "\n".join(out)


def _classic(arch: str = "classic") -> torch.nn.Module:
    tok = tiny_tokenizer()
    cfg = GPTConfig(
        sequence_len=64,
        vocab_size=tok.get_vocab_size(),
        n_layer=2,
        n_head=2,
        n_kv_head=2,
        n_embd=64,
        arch=arch,
    )
    torch.manual_seed(0)
    m = build_model(cfg, "cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


@pytest.fixture
def exported(home: Path, tmp_path: Path):
    m = _classic()
    save_model(home, m)
    out = tmp_path / "hf"
    export_hf(out, ExportHFOptions(), home=Home(home))
    return m, out


def test_model_loads_and_matches(exported) -> None:
    m, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits.float(), m(idx), atol=1e-4, rtol=0)
        got = hf.generate(
            idx[:1, :8],
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=32,
        )
    assert got[0, 8:].tolist() == list(m.generate(idx[0, :8].tolist(), 32, temperature=0.0))


def test_tokenizer_and_chat_template(exported) -> None:
    _, out = exported
    tok = tiny_tokenizer()
    hft = transformers.AutoTokenizer.from_pretrained(out)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there, 12345!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    ids = hft.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ours = tok.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    assert list(ids) == ours


def test_real_text_encodes_identically(tmp_path: Path) -> None:
    text = _text()
    tok = Tokenizer.train_from_iterator(iter([text[:100_000]]), 1024)
    tok.save(tmp_path / "tok")
    hft = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert hft(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    # No pickle needed: from_directory rebuilds the same tokenizer from tokenizer.json.
    (tmp_path / "tok" / "tokenizer.pkl").unlink()
    back = Tokenizer.from_directory(tmp_path / "tok")
    assert back.encode(text[:20_000]) == tok.encode(text[:20_000])
    assert back.get_bos_token_id() == tok.get_bos_token_id()


def test_cli(home: Path, tmp_path: Path) -> None:
    save_model(home, _classic())
    r = CliRunner().invoke(app, ["--home", str(home), "export", "hf", str(tmp_path / "o"), "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_current_arch_is_refused(home: Path, tmp_path: Path) -> None:
    save_model(home, _classic("current"))
    r = CliRunner().invoke(app, ["--home", str(home), "export", "hf", str(tmp_path / "o")])
    assert r.exit_code in (1, 2), r.output
    assert "classic" in r.output and not (tmp_path / "o").exists()
