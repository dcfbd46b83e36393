"""`nanoctl export onnx`: onnxruntime runs the graph like our model (both archs, past the sliding window),
docs/onnx_generate.py generates our Engine's greedy text without torch, and --int8 keeps bpb close."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from nanoctl.checkpoint import save_checkpoint
from nanoctl.cli.main import app
from nanoctl.engine import Engine, SamplingParams
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.export.onnx_export import ExportOnnxOptions, export_onnx, require_onnx
from nanoctl.home import Home
from nanoctl.model.gpt import GPT, GPTConfig, build_model, window_sizes
from tiny_chat import VOCAB, single_thread, tiny_tokenizer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
np = pytest.importorskip("numpy")

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "docs" / "onnx_generate.py"
SAMPLE = REPO / "src/nanoctl/sample_data/sample.jsonl.gz"
PROMPT_TOKENS = 160  # past layer 0's 128-token window (sequence_len 512: S = 128, L = 512)
DECODE_STEPS = 16
LOGIT_TOL = 1e-4
# int8 (per-channel weights, dynamic activations) vs fp32 onnxruntime on held-out text, same tiny model
# (measured: 3.9675 vs 3.9677 bpb).
INT8_BPB_TOL = 0.01


def _sample_text(skip: int, n: int) -> str:
    out, size, seen = [], 0, 0
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            t = json.loads(line)["text"]
            seen += len(t)
            if seen <= skip:
                continue
            out.append(t)
            size += len(t)
            if size > n:
                break
    return "\n".join(out)[:n]


def _config(arch: str) -> GPTConfig:
    return GPTConfig(
        sequence_len=512,
        vocab_size=VOCAB,
        n_layer=3,
        n_head=4,
        n_kv_head=2,  # GQA
        n_embd=64,
        window_pattern="SL",
        arch=arch,
    )


def _trained(arch: str, steps: int = 20) -> GPT:
    """A few AdamW steps on sample text: real (non-uniform) predictions for bpb, weights all non-zero."""
    tok = tiny_tokenizer()
    ids = tok.encode(_sample_text(0, 20_000))
    torch.manual_seed(0)
    model = build_model(_config(arch), "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # nanochat's init zeroes c_proj (and classic lm_head): wake them up
            p.add_(torch.randn_like(p) * 0.02)
    rows = torch.tensor(ids[: 8 * 257]).view(8, 257)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    with single_thread():
        for _ in range(steps):
            loss = model(rows[:, :-1], targets=rows[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _save(home: Path, model: GPT, arch: str | None = None) -> None:
    tiny_tokenizer().save(home / "tokenizer")
    config = model.config.to_dict()
    if arch is not None:
        config["arch"] = arch
    meta = {"model_config": config, "stage": "sft", "step": 10}
    save_checkpoint(home / "checkpoints" / "sft" / "d3", 10, model.state_dict(), None, meta)


_EXPORTS: dict[str, dict[str, Any]] = {}  # one trained model and export per arch for the whole module


def _export(arch: str, factory: pytest.TempPathFactory) -> dict[str, Any]:
    if arch not in _EXPORTS:
        root = factory.mktemp(f"onnx-{arch}")
        home = root / "home"
        model = _trained(arch)
        _save(home, model)
        with single_thread():
            result = export_onnx(root / "out" / "model.onnx", ExportOnnxOptions(), home=Home(home))
        _EXPORTS[arch] = {
            "arch": arch,
            "model": model,
            "home": home,
            "result": result,
            "path": Path(result["out"]),
        }
    return _EXPORTS[arch]


@pytest.fixture(scope="module", params=["current", "classic"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _export(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def current(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _export("current", tmp_path_factory)


def _session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the box is shared; tiny graphs gain nothing from threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _empty_state(session: Any) -> dict[str, Any]:
    return {
        i.name: np.zeros([1 if d == "batch" else 0 if isinstance(d, str) else d for d in i.shape], np.float32)
        for i in session.get_inputs()[1:]
    }


def _run(session: Any, chunks: list[list[int]]) -> Any:
    """Logits (1, sum(len), V) for the chunks fed one after another through the KV-cache state."""
    state, out = _empty_state(session), []
    for chunk in chunks:
        logits, *present = session.run(None, {"input_ids": np.array([chunk], np.int64), **state})
        state = dict(zip(state, present, strict=True))
        out.append(logits)
    return np.concatenate(out, axis=1)


def _prompt(n: int) -> list[int]:
    tok = tiny_tokenizer()
    return [tok.get_bos_token_id(), *tok.encode(_sample_text(100_000, 4 * n))][:n]


def test_graph_has_the_windowed_architecture(exported: dict[str, Any]) -> None:
    model, session = exported["model"], _session(exported["path"])
    names = [i.name for i in session.get_inputs()]
    assert names[0] == "input_ids"
    assert len(names) == 1 + 2 * model.config.n_layer + (exported["arch"] == "current")
    assert ("past_smear" in names) == (exported["arch"] == "current")
    windows = window_sizes(model.config)
    assert exported["arch"] == "classic" or min(windows) == 128 < PROMPT_TOKENS  # the window really cuts
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["nanoctl.arch"] == exported["arch"]
    assert (exported["path"].parent / "tokenizer.json").is_file()
    assert exported["result"]["verify_max_abs_diff"] < LOGIT_TOL


def test_logits_match_over_prefill_and_decode(exported: dict[str, Any]) -> None:
    model, session = exported["model"], _session(exported["path"])
    ids = _prompt(PROMPT_TOKENS)
    with torch.no_grad(), single_thread():  # greedy continuation by our model, then one full forward
        for _ in range(DECODE_STEPS):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        expected = model(torch.tensor([ids])).numpy()
    chunks = [ids[:PROMPT_TOKENS]] + [[t] for t in ids[PROMPT_TOKENS:]]
    got = _run(session, chunks)
    assert got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    assert diff <= LOGIT_TOL, (
        f"onnxruntime logits differ by {diff:.2e} over prefill + {DECODE_STEPS} decode steps"
    )


def test_runner_generates_the_engines_greedy_text_without_torch(exported: dict[str, Any]) -> None:
    tok = tiny_tokenizer()
    prompt = tok.decode(_prompt(PROMPT_TOKENS)[1:])
    tokens = [tok.get_bos_token_id(), *tok.encode(prompt)]
    assert len(tokens) > 128
    engine = Engine(exported["model"], tok)
    new: list[int] = []
    with single_thread():
        for column, masks in engine.generate(tokens, SamplingParams(temperature=0.0, max_tokens=24)):
            assert masks == [1]  # sampled, not forced by the calculator (the runner has no tools)
            if column[0] in engine.stop_tokens:
                break
            new.append(column[0])
    # The runner must not need torch or nanoctl: block both before running it.
    code = (
        "import runpy, sys; sys.modules['torch'] = sys.modules['nanoctl'] = None; "
        f"sys.argv = [{str(RUNNER)!r}] + sys.argv[1:]; runpy.run_path({str(RUNNER)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(exported["path"]), prompt, "24"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert len(RUNNER.read_text().splitlines()) <= 25
    assert proc.stdout.removesuffix("\n") == tok.decode(new)


def _bpb(session: Any, text: str, chunk: int = 256) -> float:
    """Bits per byte of `text` (each chunk one prefill from a BOS; every token scored)."""
    tok = tiny_tokenizer()
    ids = tok.encode(text)
    nats, n_bytes = 0.0, 0
    for start in range(0, len(ids) - chunk, chunk):
        piece = [tok.get_bos_token_id(), *ids[start : start + chunk]]
        logits = _run(session, [piece[:-1]])[0].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nats -= float(logp[np.arange(chunk), piece[1:]].sum())
        n_bytes += len(tok.decode(piece[1:]).encode("utf-8"))
    return nats / math.log(2) / n_bytes


def test_int8_keeps_bpb_within_tolerance(current: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "q" / "model-int8.onnx"
    res = CliRunner().invoke(
        app, ["--home", str(current["home"]), "export", "onnx", str(out), "--int8", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["int8"] is True
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    text = _sample_text(200_000, 12_000)
    fp32 = _bpb(_session(current["path"]), text)
    int8 = _bpb(_session(out), text)
    assert fp32 < 5.0  # the model learned something (uniform over the 320 tokens is ~6.7 bpb here)
    assert abs(int8 - fp32) <= INT8_BPB_TOL, f"int8 bpb {int8:.4f} vs fp32 {fp32:.4f}"


def test_unknown_arch_is_named(home: Path, tmp_path: Path) -> None:
    model = build_model(_config("classic"), "cpu", torch.float32)
    _save(home, model, arch="deepseek")
    with pytest.raises(UsageError, match="'deepseek'"):
        export_onnx(tmp_path / "m.onnx", ExportOnnxOptions(), home=Home(home))
    res = CliRunner().invoke(app, ["--home", str(home), "export", "onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
    assert "export onnx does not know model arch 'deepseek'" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_existing_out_and_old_opset(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    with pytest.raises(UsageError, match="--force"):
        export_onnx(out, ExportOnnxOptions(), home=Home(home))
    for opset in (17, 26):
        with pytest.raises(UsageError, match=f"--opset {opset} is out of range"):
            export_onnx(tmp_path / "other.onnx", ExportOnnxOptions(opset=opset), home=Home(home))
    assert out.read_text() == "keep me"


def test_missing_onnxruntime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled package looks like
    with pytest.raises(NanoctlError, match=r"onnxruntime .*not installed") as info:
        require_onnx()
    assert 'pip install "nanoctl[export]"' in str(info.value)
    assert "pipx inject nanoctl onnx onnxruntime onnxscript" in str(info.value)
