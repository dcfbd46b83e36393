"""The inference engine: cached decode == full recompute, batching == separate runs, seeds, limits,
stop tokens and calculator tool use (forced tokens with mask 0), against real (tiny) models."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from nanoctl.engine import Engine, SamplingParams, sample_next_token
from nanoctl.errors import UsageError
from tiny_chat import prompt_for, random_model, single_thread, tiny_config, tiny_tokenizer, trained_chat_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def greedy(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_sampling_params_defaults_and_validation() -> None:
    """One set of defaults, nanochat's chat ones (chat_cli T 0.6, top-k 50; 512 tokens as its web UI)."""
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens, p.seed) == (
        0.6,
        50,
        None,
        1.0,
        512,
        42,
    )
    assert SamplingParams(top_p=1.0).top_p is None  # 1 = off, stored as None
    assert SamplingParams(temperature=0.0).greedy and not p.greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.0  # type: ignore[misc]
    for kwargs in (
        dict(temperature=-1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0),
        dict(max_tokens=0),
    ):
        with pytest.raises(UsageError):
            SamplingParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        dataclasses.replace(p, temperature=-1.0)  # replace validates again


@pytest.fixture(scope="module")
def windowed_engine() -> Engine:
    """Random weights everywhere (attention, value embeddings, smear, backout all active) and sliding
    windows far shorter than the sequences generated below, so the cache must respect them."""
    model = random_model(tiny_config(sequence_len=96, n_layer=4))
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
        model.backout_lambda.fill_(0.2)
    # nanochat's short window (ceil(seq/4) to a multiple of 128) exceeds these tiny contexts: use
    # short windows directly so they bind (last layer stays full, as in the model).
    model.window_sizes = [3, 7, 5, model.config.sequence_len]
    return Engine(model, tiny_tokenizer())


def _full_logits(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([seq]))[0, -1]


def test_cached_decode_matches_full_recompute_with_windows(windowed_engine: Engine) -> None:
    engine, model = windowed_engine, windowed_engine.model
    prompt = prompt_for("hi there, how are you")
    seq = list(prompt)
    steps = 0
    for column, _ in engine.generate(prompt, greedy(40)):
        assert engine.last_logits is not None
        torch.testing.assert_close(engine.last_logits[0], _full_logits(model, seq), atol=2e-4, rtol=1e-4)
        seq.append(column[0])
        steps += 1
    assert steps > 10  # long enough to slide past every short window


def test_batched_rows_match_full_recompute(windowed_engine: Engine) -> None:
    """Prefill copied into 3 rows (smear state included), rows diverging at temperature 1."""
    engine, model = windowed_engine, windowed_engine.model
    prompt = prompt_for("abc")
    seqs = [list(prompt) for _ in range(3)]
    params = SamplingParams(temperature=1.0, top_k=None, max_tokens=15, seed=3)
    for column, _ in engine.generate(prompt, params, num_samples=3):
        assert engine.last_logits is not None
        for i in range(3):
            torch.testing.assert_close(
                engine.last_logits[i], _full_logits(model, seqs[i]), atol=2e-4, rtol=1e-4
            )
            seqs[i].append(column[i])
    assert len({tuple(s) for s in seqs}) > 1  # the rows really sampled independently


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1.0, top_k=None),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.2, top_k=None, top_p=0.9),
        dict(temperature=0.9, top_k=50, top_p=0.8, repetition_penalty=1.3),
    ],
)
def test_num_samples_rows_equal_separate_runs(windowed_engine: Engine, kwargs: dict) -> None:
    """Row i of a batched run == a one-row run with seed + i (the per-row seeding contract)."""
    engine = windowed_engine
    prompt = prompt_for("row test")
    params = SamplingParams(max_tokens=20, seed=100, **kwargs)
    batched, batched_masks = engine.generate_batch(prompt, params, num_samples=4)
    for i in range(4):
        single, single_masks = engine.generate_batch(prompt, dataclasses.replace(params, seed=100 + i))
        assert batched[i] == single[0]
        assert batched_masks[i] == single_masks[0]
    assert len({tuple(r) for r in batched}) > 1  # first tokens are sampled per row, not broadcast


def test_seed_determinism(windowed_engine: Engine) -> None:
    prompt = prompt_for("seed")

    def run(temperature: float, seed: int) -> list[list[int]]:
        params = SamplingParams(temperature=temperature, top_k=None, max_tokens=25, seed=seed)
        return windowed_engine.generate_batch(prompt, params)[0]

    assert run(1.0, 7) == run(1.0, 7)
    assert run(1.0, 7) != run(1.0, 8)
    assert run(0.0, 1) == run(0.0, 2)  # temperature 0 ignores the seed


def test_max_tokens_and_context_limit(windowed_engine: Engine) -> None:
    engine = windowed_engine
    prompt = prompt_for("limits")
    params = SamplingParams(temperature=1.0, max_tokens=7, seed=0)
    columns = list(engine.generate(prompt, params, num_samples=2))
    # a row may stop early, but never more than max_tokens columns
    assert 1 <= len(columns) <= 7
    # The cache holds the context: a prompt 3 short of it yields at most 4 tokens (the last is never fed).
    ctx = engine.context_len
    long_prompt = (prompt * ctx)[: ctx - 3]
    for limit in (100, None):  # None: up to the context
        columns = list(engine.generate(long_prompt, greedy(limit)))
        assert 1 <= len(columns) <= 4
    with pytest.raises(UsageError, match="context"):
        engine.generate((prompt * ctx)[: ctx + 1], greedy(5))  # checked at the call, not the first step


def test_bad_arguments_are_usage_errors(windowed_engine: Engine) -> None:
    with pytest.raises(UsageError):
        windowed_engine.generate([], greedy(2))
    with pytest.raises(UsageError):
        windowed_engine.generate([1, 2, 3], greedy(2), num_samples=0)
    with pytest.raises(UsageError):  # the transitional keyword overrides validate like SamplingParams
        windowed_engine.generate([1, 2, 3], max_tokens=2, temperature=-1)


def test_keyword_overrides_replace_params_fields(windowed_engine: Engine) -> None:
    """Transitional (train/rl.py): `max_tokens=`, `temperature=`, ... override fields of `params`."""
    prompt = prompt_for("overrides")
    want = windowed_engine.generate_batch(prompt, SamplingParams(temperature=1.0, max_tokens=9, seed=3))
    assert windowed_engine.generate_batch(prompt, max_tokens=9, temperature=1.0, seed=3) == want
    assert windowed_engine.generate_batch(prompt, greedy(9), temperature=1.0, seed=3) == want


def test_top_k_and_top_p_restrict_the_support() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    for _ in range(200):
        tok = sample_next_token(logits, gens, SamplingParams(temperature=1.0, top_k=5))
        assert int(tok[0]) in top5
    # top_p tiny: only the most likely token survives (sampling becomes greedy)
    for _ in range(50):
        tok = sample_next_token(logits, gens, SamplingParams(temperature=1.0, top_k=None, top_p=1e-6))
        assert tok.tolist() == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution() -> None:
    """Inverse-CDF sampling reproduces softmax probabilities (chi-square-ish tolerance)."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = [torch.Generator().manual_seed(0)]
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[int(sample_next_token(logits, gen, SamplingParams(temperature=1.0, top_k=None))[0])] += 1
    torch.testing.assert_close(counts / n, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_repetition_penalty_discourages_repeats(windowed_engine: Engine) -> None:
    prompt = prompt_for("repeat")
    plain = windowed_engine.generate_batch(prompt, greedy(30))[0][0][len(prompt) :]
    penalized = windowed_engine.generate_batch(
        prompt, SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=5.0)
    )[0][0][len(prompt) :]
    assert len(set(penalized)) >= len(set(plain))
    assert len(set(penalized)) > len(penalized) // 2


@pytest.fixture(scope="module")
def chat_engine() -> Engine:
    return Engine(trained_chat_model(), tiny_tokenizer())


def test_trained_model_replies_and_stops(chat_engine: Engine) -> None:
    tok = tiny_tokenizer()
    prompt = prompt_for("hi")
    columns = list(chat_engine.generate(prompt, greedy(50)))
    tokens = [column[0] for column, _ in columns]
    assert tokens[-1] == tok.encode_special("<|assistant_end|>")  # the loop ended on the stop token
    assert len(tokens) < 50
    results, masks = chat_engine.generate_batch(prompt, greedy(50))
    reply = results[0][len(prompt) :]
    assert tok.decode(reply) == "hello there"  # terminal token excluded
    assert results[0][: len(prompt)] == prompt and masks[0][: len(prompt)] == [0] * len(prompt)


def test_stops_per_row_and_all_rows_complete(chat_engine: Engine) -> None:
    tok = tiny_tokenizer()
    prompt = prompt_for("bye")
    params = SamplingParams(temperature=0.3, max_tokens=50, seed=5)
    results, _ = chat_engine.generate_batch(prompt, params, num_samples=3)
    for r in results:
        assert tok.decode(r[len(prompt) :]) == "see you soon"


def test_tool_call_forces_calculator_output_with_mask_zero(chat_engine: Engine) -> None:
    tok = tiny_tokenizer()
    special = tok.encode_special
    prompt = prompt_for("what is 2+3?")
    results, masks = chat_engine.generate_batch(prompt, greedy(60))
    reply, reply_masks = results[0][len(prompt) :], masks[0][len(prompt) :]
    start = reply.index(special("<|output_start|>"))
    end = reply.index(special("<|output_end|>"))
    assert reply[start - 1] == special("<|python_end|>")
    assert tok.decode(reply[start + 1 : end]) == "5"  # computed by the calculator, not sampled
    assert reply_masks[start : end + 1] == [0] * (end + 1 - start)
    assert all(m == 1 for m in reply_masks[:start]) and all(m == 1 for m in reply_masks[end + 1 :])
    assert tok.decode(reply).endswith(" so 5")


def test_tool_errors_are_forced_as_text() -> None:
    tok = tiny_tokenizer()
    engine = Engine(trained_chat_model(), tok)
    forced = engine._tool_output(tok.encode("__import__('os')"))
    assert forced[0] == tok.encode_special("<|output_start|>") and forced[-1] == tok.encode_special(
        "<|output_end|>"
    )
    assert tok.decode(forced[1:-1]).startswith("error: ")


@pytest.mark.parametrize("top_k,top_p,temperature", [(50, None, 0.6), (None, None, 1.0), (None, None, 0.0), (5, 0.9, 0.8)])
def test_sampling_after_a_monotonic_softcap_equals_sampling_capped_logits(
    top_k: int | None, top_p: float | None, temperature: float
) -> None:
    """The engine caps only the kept top-k values; the draws must equal capping the whole row first."""
    from nanoctl.engine import SamplingParams, sample_next_token
    from nanoctl.model.gpt import apply_softcap

    raw = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 20
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(7 + i) for i in range(4)]

    want = sample_next_token(apply_softcap(raw.clone()), gens(), params)
    got = sample_next_token(raw.clone(), gens(), params, apply_softcap)
    assert got.tolist() == want.tolist()
