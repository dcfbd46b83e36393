"""`--quantize int8`: int8 linear layers and embeddings on the CPU (nanoctl.model.quantize).

Tolerances, on the tiny memorizing chat model (n_embd 64, where int8 is at its coarsest): logits within
5% of the largest fp32 logit (measured: 1.7%), greedy replies token-identical, bpb within 2% relative.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from eval_helpers import populate_home
from nanoctl.cli.main import app
from nanoctl.engine import Engine, SamplingParams
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.model.gpt import GPT, Linear
from nanoctl.model.quantize import Int8GPT, Int8MLP, quantize_model, weight_bytes
from nanoctl.serve.scheduler import FinishEvent, GenerationRequest, Scheduler, TokenEvent
from tiny_chat import (
    CONVERSATIONS,
    prompt_for,
    random_model,
    save_model,
    single_thread,
    tiny_config,
    tiny_tokenizer,
    trained_chat_model,
)

runner = CliRunner()
PROMPTS = [c["messages"][0]["content"] for c in CONVERSATIONS]  # "hi", "bye", "what is 2+3?"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def int8_copy(model: GPT) -> GPT:
    return quantize_model(copy.deepcopy(model), "int8")


def greedy_reply(engine: Engine, prompt: list[int]) -> list[int]:
    out: list[int] = []
    for column, _ in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40)):
        if column[0] in engine.stop_tokens:
            break
        out.append(column[0])
    return out


def int8_engine_matching_fp32(model: Any, tok: Any) -> Engine:
    """An Engine on the int8 copy of `model`, after checking its greedy replies equal fp32's on PROMPTS."""
    fp32, int8 = Engine(model, tok), Engine(int8_copy(model), tok)
    for text in PROMPTS:  # the calculator call included
        want = greedy_reply(fp32, prompt_for(text))
        assert want and greedy_reply(int8, prompt_for(text)) == want, text
    return int8


# -- library -----------------------------------------------------------------------------------------------


def test_int8_logits_are_close_to_fp32_and_every_matrix_is_int8() -> None:
    model = trained_chat_model()
    q = int8_copy(model)
    assert isinstance(q, Int8GPT) and all(isinstance(b.mlp, Int8MLP) for b in q.transformer.h)
    plain = [n for n, m in q.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert all(n.endswith(("ve_gate", "smear_gate")) for n in plain), plain  # only the tiny gates stay fp32
    assert not isinstance(model, Int8GPT) and isinstance(model.lm_head, Linear)  # the original is untouched
    tok = tiny_tokenizer()
    ids = torch.tensor([tok.render_conversation(c)[0] for c in CONVERSATIONS[:1]])
    with torch.inference_mode():
        want, got = model(ids), q(ids)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert 0 < err < 0.05, err  # really quantized (not identical), and close
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_weights_are_at_least_3x_smaller() -> None:
    # n_embd 128: the per-row scales (8-16 bytes a row) are small next to 128 int8 values
    model = random_model(tiny_config(n_embd=128), scale=0.02)
    fp32 = weight_bytes(model)
    assert fp32 == sum(p.numel() * 4 for p in model.state_dict().values())
    ratio = fp32 / weight_bytes(int8_copy(model))
    assert ratio >= 3.0, ratio


def test_engine_replies_match_fp32_and_kv_cached_rows_sample() -> None:
    int8 = int8_engine_matching_fp32(trained_chat_model(), tiny_tokenizer())
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=3)
    runs = [[c for c, _ in int8.generate(prompt_for("hi"), params, num_samples=4)] for _ in range(2)]
    assert runs[0] == runs[1] and all(len(c) == 4 for c in runs[0])  # seeded batch of 4: reproducible


def test_continuous_batching_scheduler_serves_the_int8_model() -> None:
    model, tok = trained_chat_model(), tiny_tokenizer()
    want = [greedy_reply(Engine(model, tok), prompt_for(t)) for t in PROMPTS]
    got = scheduler_replies(int8_copy(model), PROMPTS * 2)  # 6 requests on 4 rows
    assert [g[: len(w)] for g, w in zip(got, want * 2, strict=True)] == want * 2


def scheduler_replies(model: GPT, texts: list[str]) -> list[list[int]]:
    """Greedy replies to `texts`, submitted together to a continuous-batching scheduler of 4 rows."""
    sched = Scheduler(model, tiny_tokenizer(), max_batch=4, prefill_chunk=8)
    sched.start()

    async def one(text: str) -> list[int]:
        handle = sched.submit(
            GenerationRequest(prompt_for(text), SamplingParams(temperature=0.0, max_tokens=40)),
            asyncio.get_running_loop(),
        )
        out: list[int] = []
        while True:
            ev = await asyncio.wait_for(handle.events.get(), 60)
            if isinstance(ev, FinishEvent):
                return out
            assert isinstance(ev, TokenEvent), ev
            out.append(ev.token)

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(one(t) for t in texts)))

    try:
        return asyncio.run(together())
    finally:
        sched.close()


def test_refusals() -> None:
    q = int8_copy(trained_chat_model())
    with pytest.raises(NanoctlError, match="inference only"):
        q.train()
    with pytest.raises(NanoctlError, match="already quantized"):
        quantize_model(q, "int8")
    with pytest.raises(UsageError, match="--quantize 'int4' is not a mode"):
        quantize_model(trained_chat_model(), "int4")
    assert quantize_model(q, "none") is q


# -- commands ----------------------------------------------------------------------------------------------


def test_cli_chat_int8_one_shot_matches_fp32(home: Path) -> None:
    save_model(home, trained_chat_model())
    replies = []
    for mode in ("none", "int8"):
        res = runner.invoke(app, ["chat", "-p", "what is 2+3?", "--json", "-t", "0", "--device", "cpu",
                                  "--quantize", mode])  # fmt: skip
        assert res.exit_code == 0, res.output
        replies.append(json.loads(res.stdout)["reply"])
    assert replies[0] == "let me see `2+3` → `5` so 5" and replies[1] == replies[0]


def test_cli_eval_base_and_chat_int8(home: Path, shared_data: Path, tmp_path: Path) -> None:
    populate_home(home, tag="d2", step=5, model=trained_chat_model())
    bpb = {}
    for mode in ("none", "int8"):
        res = runner.invoke(app, ["eval", "base", "--eval", "bpb", "--device", "cpu", "--split-tokens", "1024",
                                  "--json", "--quantize", mode])  # fmt: skip
        assert res.exit_code == 0, res.output
        bpb[mode] = json.loads(res.stdout)["bpb"]["val"]
    assert abs(bpb["int8"] / bpb["none"] - 1) < 0.02, bpb
    reports = home / "reports" / "d2"
    assert (reports / "eval_base_base_000005.json").exists()  # fp32's record is kept beside int8's
    record = json.loads((reports / "eval_base_base-int8_000005.json").read_text())
    assert record["settings"]["quantize"] == "int8"

    save_model(home, trained_chat_model(), stage="sft", tag="d2", step=100, with_tokenizer=False)
    data_dir = tmp_path / "tasks"
    data_dir.mkdir()
    (data_dir / "mmlu").symlink_to(shared_data / "mmlu")
    res = runner.invoke(app, ["eval", "chat", "-t", "mmlu", "-x", "2", "--data-dir", str(data_dir), "--json",
                              "--device", "cpu", "--quantize", "int8"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert [(t["name"], t["problems"]) for t in json.loads(res.stdout)["tasks"]] == [("MMLU", 2)]
    assert (reports / "eval_chat_sft-int8_000100.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "-p", "hi"],
        ["serve"],
        ["eval", "base"],
        ["eval", "chat", "-t", "mmlu"],
    ],
)
def test_bad_values_are_usage_errors_naming_the_flag(home: Path, args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--quantize", "int4"])
    assert res.exit_code == 2 and "--quantize 'int4' is not a mode" in res.output and "none, int8" in res.output
    res = runner.invoke(app, [*args, "--quantize", "int8", "--device", "cuda"])
    assert res.exit_code == 2 and "--quantize int8 runs on the CPU only" in res.output, res.output
    res = runner.invoke(app, [*args, "--quantize", "int8", "--dtype", "bfloat16"])
    assert res.exit_code == 2 and "--quantize int8 computes in float32" in res.output, res.output


def test_cli_help_lists_quantize() -> None:
    for args in (["chat"], ["serve"], ["eval", "base"], ["eval", "chat"]):
        res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "--quantize" in res.output and "int8" in res.output, args


def test_live_serve_int8_answers_over_http(home: Path, tmp_path: Path) -> None:
    """`nanoctl serve --quantize int8` in its own process: ready, then the memorized reply over HTTP."""
    save_model(home, trained_chat_model())
    env = {k: v for k, v in os.environ.items() if k != "NANOCTL_API_KEY"} | {"OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoctl", "--home", str(home), "serve", "--port", "0", "--device", "cpu",
         "--json", "--quantize", "int8"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{") and json.loads(line)["event"] == "ready":
                url = json.loads(line)["url"]
        assert url, (tmp_path / "serve.log").read_text()[-2000:]
        res = httpx.post(url + "/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0})  # fmt: skip
        assert res.status_code == 200, res.text
        fp32 = greedy_reply(Engine(trained_chat_model(), tiny_tokenizer()), prompt_for("hi"))
        assert res.json()["choices"][0]["message"]["content"] == tiny_tokenizer().decode(fp32)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
