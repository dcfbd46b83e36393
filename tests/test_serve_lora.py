"""`nanoctl serve --lora NAME=DIR --lora DIR`: several LoRA adapters beside the base, chosen per request.

Two real adapters are trained (seconds) on tiny_chat's memorizing chat model so that each answers "hi"
and "bye" differently from the base and from each other ("x": hi -> "see you soon"; "y": hi -> "let me see").
The reference for every reply is `nanoctl chat --lora DIR -p ... --json`'s own code path
(`load_chat_model` + `run_once`: the adapter merged into the weights), so the served, unmerged bank must
give what the merged model gives. In-process tests drive the FastAPI app over a real Scheduler with the
official SDK (ASGITransport); the live test runs `python -m nanoctl serve` and talks to it over TCP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from typer.testing import CliRunner

from nanoctl.chat import ChatOptions, load_chat_model, run_once
from nanoctl.cli import app as cli_app
from nanoctl.engine import SamplingParams
from nanoctl.model.gpt import GPT
from nanoctl.model.lora import add_lora, lora_parameters, make_config, read_adapter, save_adapter
from nanoctl.model.lora_bank import BankEntry, mount_bank
from nanoctl.serve.api import AppConfig, ServedModel, ServerState, create_app
from nanoctl.serve.scheduler import Scheduler
from test_serve import LiveServer
from tiny_chat import conversation_batch, save_model, single_thread, tiny_tokenizer, trained_chat_model

BASE = "sft/d2@100"
PARENT = {"stage": "sft", "tag": "d2", "step": 100}
# what each adapter learns to answer (the base says "hello there" and "see you soon")
REPLIES = {"x": {"hi": "see you soon", "bye": "hello there"}, "y": {"hi": "let me see", "bye": "hello hello"}}
Y_ID = "lora:sft/y@7"  # y is served without a name: its id comes from its nanoctl_adapter.json
PROMPTS = ("hi", "bye")
runner = CliRunner()


@functools.cache
def lora_model(which: str) -> GPT:
    """The chat model plus a rank-4 adapter (every target) trained to give REPLIES[which]."""
    model = copy.deepcopy(trained_chat_model())
    add_lora(model, make_config(4, None, 0.0, "all"))
    x, y = conversation_batch([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                               for q, a in REPLIES[which].items()])  # fmt: skip
    torch.manual_seed(3)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.0)
    model.train()
    with single_thread():
        for _ in range(80):
            loss = model(x, targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def lora_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("serve_lora") / "home"
    home.mkdir()
    save_model(home, trained_chat_model(), stage="sft", tag="d2", step=100)
    for which in REPLIES:
        save_adapter(home / "adapters" / "sft" / which, lora_model(which),
                     {"stage": "sft", "tag": which, "step": 7, "parent": PARENT})  # fmt: skip
    return home


def adapter_dir(home: Path, which: str) -> Path:
    return home / "adapters" / "sft" / which


@pytest.fixture(scope="module")
def reference(lora_home: Path) -> dict[tuple[str, str], str]:
    """(model id, prompt) -> the greedy reply `nanoctl chat [--lora DIR] -p PROMPT --json` gives."""
    out = {}
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    with single_thread():
        for model_id, lora in ((BASE, None), ("x", "x"), (Y_ID, "y")):
            opts = ChatOptions(stage="sft", tag="d2", device="cpu", sampling=greedy,
                               lora=None if lora is None else str(adapter_dir(lora_home, lora)))  # fmt: skip
            loaded = load_chat_model(opts, home=lora_home)
            for prompt in PROMPTS:
                out[model_id, prompt] = run_once(loaded, prompt, greedy).reply
    return out


def test_adapters_really_differ(reference: dict[tuple[str, str], str]) -> None:
    assert reference[BASE, "hi"] == "hello there"
    assert reference["x", "hi"] == REPLIES["x"]["hi"] and reference[Y_ID, "hi"] == REPLIES["y"]["hi"]
    assert len({reference[m, "bye"] for m in (BASE, "x", Y_ID)}) == 3


# ----------------------------------------------------------------------------------------------------------
# In-process: the app over a real scheduler whose model carries the bank


@pytest.fixture(scope="module")
def bank_sched(lora_home: Path) -> Iterator[Scheduler]:
    loaded = load_chat_model(ChatOptions(stage="sft", tag="d2", device="cpu"), home=lora_home)
    entries = [BankEntry(i, *read_adapter(adapter_dir(lora_home, w))[:2]) for i, w in (("x", "x"), (Y_ID, "y"))]
    bank = mount_bank(loaded.model, entries)
    s = Scheduler(loaded.model, loaded.tokenizer, max_batch=8, max_queue=16, bank=bank)
    s.start()
    yield s
    s.close()


@contextlib.asynccontextmanager
async def sdk_for(sched: Scheduler) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    state = ServerState()
    state.set_ready(ServedModel(BASE, tiny_tokenizer(), sched, False, sched.context_len,
                                rows_per_engine=sched.max_batch, adapters={"x": 0, Y_ID: 1}))  # fmt: skip
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(AppConfig(), state)),
                             base_url="http://testserver", timeout=60)  # fmt: skip
    async with http:
        yield openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), http


async def chat_text(sdk: Any, model: str, prompt: str, stream: bool = False, n: int = 1, **kw: Any) -> list[str]:
    args: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                            "max_tokens": 24, "n": n, **kw}  # fmt: skip
    if not stream:
        r = await sdk.chat.completions.create(**args)
        assert r.model == model  # the reply names the adapter that answered
        return [c.message.content for c in r.choices]
    texts = [""] * n
    async for chunk in await sdk.chat.completions.create(stream=True, **args):
        assert chunk.model == model
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    return texts


@pytest.mark.asyncio
async def test_models_list_the_base_and_every_adapter(bank_sched: Scheduler) -> None:
    async with sdk_for(bank_sched) as (sdk, _):
        models = (await sdk.models.list()).data
        assert [m.id for m in models] == [BASE, "x", Y_ID]
        assert [getattr(m, "parent", None) for m in models] == [None, BASE, BASE]
        assert (await sdk.models.retrieve("x")).id == "x" and (await sdk.models.retrieve(Y_ID)).id == Y_ID
        with pytest.raises(openai.NotFoundError, match=f"serves '{BASE}', 'x', '{Y_ID}'"):
            await sdk.models.retrieve("z")


@pytest.mark.asyncio
async def test_each_model_id_answers_as_its_merged_adapter(
    bank_sched: Scheduler, reference: dict[tuple[str, str], str]
) -> None:
    async with sdk_for(bank_sched) as (sdk, http):
        for model_id in (BASE, "x", Y_ID):
            for prompt in PROMPTS:
                want = reference[model_id, prompt]
                assert await chat_text(sdk, model_id, prompt) == [want], (model_id, prompt)
                assert await chat_text(sdk, model_id, prompt, stream=True, n=2) == [want, want]
        res = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "temperature": 0})  # fmt: skip
        assert res.json()["model"] == BASE and res.json()["choices"][0]["message"]["content"] == reference[BASE, "hi"]
        # /v1/completions picks the adapter too: the raw rendered prompt continues as the chat reply does
        prompt = tiny_tokenizer().render_for_completion(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
        )
        r = await sdk.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=24)
        assert r.model == "x" and r.choices[0].text.startswith(reference["x", "hi"])
        with pytest.raises(openai.NotFoundError, match=f"'nope' does not exist; this server serves '{BASE}'"):
            await chat_text(sdk, "nope", "hi")


@pytest.mark.asyncio
async def test_mixed_adapters_in_one_batch_equal_their_solo_runs(bank_sched: Scheduler) -> None:
    """Seeded samples (n=2) through x, y and the base: the same text alone or all at once."""
    jobs = [(m, p, seed) for m in ("x", Y_ID, BASE) for p in PROMPTS for seed in (1, 2)]
    sampled = {"temperature": 2.0, "seed": 0, "extra_body": {"top_k": 0}}
    async with sdk_for(bank_sched) as (sdk, _):

        async def one(job: tuple[str, str, int]) -> list[str]:
            m, p, seed = job
            return await chat_text(sdk, m, p, n=2, stream=seed == 2, **{**sampled, "seed": seed})

        solo = [await one(j) for j in jobs]
        together = await asyncio.wait_for(asyncio.gather(*(one(j) for j in jobs)), 120)
    assert list(together) == solo
    assert len({t for texts in solo for t in texts}) > 6  # real, varied samples


# ----------------------------------------------------------------------------------------------------------
# The CLI and a live server


def test_duplicate_or_foreign_adapters_are_one_line_exit_2(lora_home: Path, tmp_path: Path) -> None:
    x, y = adapter_dir(lora_home, "x"), adapter_dir(lora_home, "y")
    other = tmp_path / "other"  # an adapter trained on another base
    save_adapter(other, lora_model("x"), {"stage": "sft", "tag": "o", "step": 1,
                                          "parent": {"stage": "mid", "tag": "d2", "step": 3}})  # fmt: skip
    cases = [
        (["--lora", f"a={x}", "--lora", f"a={y}"], "--lora a=", "model id 'a' is already another adapter's id"),
        (["--lora", str(y), "--lora", f"{Y_ID}={x}"], f"--lora {Y_ID}=", "already another adapter's id"),
        (["--lora", f"{BASE}={x}"], f"--lora {BASE}=", "already the base model's id"),
        (["--lora", str(x), "--lora", str(other)], f"--lora {other} was trained on mid/d2@3", ""),
        (["--lora", f"a={tmp_path}"], f"--lora {tmp_path}: no adapter_config.json", ""),
        (["--lora", f"my adapter={x}"], "the name before '=' must be a non-empty word", ""),
    ]
    for args, needle, more in cases:
        res = runner.invoke(cli_app, ["--home", str(lora_home), "serve", "--device", "cpu", "--port", "0", *args])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2, (args, res.output)
        assert lines[0].startswith("error:") and needle in lines[0] and more in lines[0], res.output
        assert len(lines) <= 2 and "Traceback" not in res.output, res.output  # the error and its hint


def test_lora_flag_values_and_default_ids(lora_home: Path, tmp_path: Path) -> None:
    from nanoctl.serve.adapter_specs import adapter_ids, banked, parse_lora

    x, y = adapter_dir(lora_home, "x"), adapter_dir(lora_home, "y")
    odd = tmp_path / "a=b"  # a directory whose name holds a '=' is a path, not NAME=PATH
    save_adapter(odd, lora_model("x"))  # no nanoctl record (as PEFT writes it): the id is the directory's
    specs = parse_lora([f"org/math={x}", str(y), str(odd)])
    assert [(s.name, s.path) for s in specs] == [("org/math", x), (None, y), (None, odd)]
    assert adapter_ids(specs, BASE) == ["org/math", Y_ID, "lora:a=b"]
    assert not banked(parse_lora([str(y)])) and banked(parse_lora([f"y={y}"]))  # one named: banked too


def test_live_server_serves_three_models(
    lora_home: Path, reference: dict[tuple[str, str], str], tmp_path: Path
) -> None:
    x, y = adapter_dir(lora_home, "x"), adapter_dir(lora_home, "y")
    s = LiveServer(lora_home, tmp_path / "serve.log", "--lora", f"x={x}", "--lora", str(y), "--max-batch", "8")
    try:
        s.wait_ready()
        ready = next(e for e in s.events if e["event"] == "ready")
        assert ready["model"] == BASE and ready["adapters"] == ["x", Y_ID]
        sdk = s.client()
        assert [m.id for m in sdk.models.list()] == [BASE, "x", Y_ID]
        assert httpx.get(s.url + "/health", timeout=10).json()["adapters"] == ["x", Y_ID]

        def ask(model: str, prompt: str) -> str:
            r = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=24)  # fmt: skip
            assert r.model == model
            return str(r.choices[0].message.content)

        jobs = [(m, p) for m in (BASE, "x", Y_ID) for p in PROMPTS]
        solo = [ask(*j) for j in jobs]
        assert solo == [reference[j] for j in jobs]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # all at once: one mixed batch
            assert list(pool.map(lambda j: ask(*j), jobs * 2)) == solo * 2
        with pytest.raises(openai.NotFoundError):
            ask("lora:sft/z@7", "hi")
    finally:
        s.kill()
