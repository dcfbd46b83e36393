"""A tiny chat model trained in-process (seconds on CPU), shared by the engine and chat tests.

It memorizes three conversations, one of which calls the calculator, so tests can check replies,
stop tokens and forced tool output against a real trained model instead of scripted logits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nanoctl.checkpoint import save_checkpoint
from nanoctl.model.gpt import GPT, GPTConfig, build_model
from nanoctl.tokenizer import Tokenizer

VOCAB = 320  # 256 bytes + 9 specials + 55 merges; a multiple of 64 so no padding

CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you soon"}]},
    {
        "messages": [
            {"role": "user", "content": "what is 2+3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "let me see "},
                    {"type": "python", "text": "2+3"},
                    {"type": "python_output", "text": "5"},
                    {"type": "text", "text": " so 5"},
                ],
            },
        ]
    },
]

TEXTS = [
    "hello there, see you soon. let me see what is 2+3 so 5.",
    "the quick brown fox jumps over the lazy dog. hi bye hello there",
] * 20


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box threads spin: use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter(TEXTS), VOCAB)


def tiny_config(sequence_len: int = 128, n_embd: int = 64, n_layer: int = 2) -> GPTConfig:
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=VOCAB,
        n_layer=n_layer,
        n_head=2,
        n_kv_head=2,
        n_embd=n_embd,
        window_pattern="SL",
    )


def random_model(config: GPTConfig, seed: int = 0, scale: float = 0.3) -> GPT:
    """A model with every weight random (nanochat's init zeroes c_proj, which would hide attention)."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.eval()


def conversation_batch(conversations: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) to memorize `conversations` at every position (targets -1 past each row's end)."""
    tok = tiny_tokenizer()
    rows = [tok.render_conversation(c)[0] for c in conversations]
    T = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, : len(r) - 1] = torch.tensor(r[1:])
    return x, y


@functools.cache
def trained_chat_model(steps: int = 100, seed: int = 0) -> GPT:
    """Memorize CONVERSATIONS (all positions, AdamW): greedy decoding then reproduces them."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(), "cpu", torch.float32)
    x, y = conversation_batch(CONVERSATIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    with single_thread():
        for _ in range(steps):
            loss = model(x, targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    model.final_loss = loss.item()  # type: ignore[attr-defined]
    return model


def prompt_for(text: str) -> list[int]:
    """The tokens the chat session sends for a single user message."""
    tok = tiny_tokenizer()
    conv = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    return tok.render_for_completion(conv)


def save_model(
    home: Path, model: GPT, stage: str = "sft", tag: str = "d2", step: int = 100, with_tokenizer: bool = True
) -> Path:
    """Write `model` as a checkpoint (and the tokenizer into the home) the way training stages do."""
    if with_tokenizer:
        tiny_tokenizer().save(home / "tokenizer")
    directory = home / "checkpoints" / stage / tag
    meta = {"model_config": model.config.to_dict(), "stage": stage, "step": step}
    save_checkpoint(directory, step, model.state_dict(), None, meta)
    return directory


def hf_logits_without_nanoctl(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the HF export in `hf_dir` for `ids` (1, T), computed in a fresh interpreter
    where `import nanoctl` fails: the shipped remote code must be self-contained."""
    script = (
        "import sys, json, torch\n"
        "sys.modules['nanoctl'] = None  # any import of nanoctl now raises ImportError\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(input_ids=ids).logits[0, -1].tolist()))\n"
        "assert not [k for k in sys.modules if k.startswith('nanoctl.')]\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=hf_dir.parent
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.tensor(json.loads(r.stdout.strip().splitlines()[-1]))
