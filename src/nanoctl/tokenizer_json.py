"""Our tiktoken tokenizer as a Hugging Face fast tokenizer (tokenizer.json) and back, plus the chat template.

Byte-level BPE: the vocab is each rank's bytes in GPT-2's byte-to-unicode alphabet; the merges are every
(left, right) split of a token whose halves are both tokens, ordered by the merged token's rank, so HF's
"lowest merge first" equals tiktoken's "lowest rank first". The GPT-4 style split pattern is a Split
pre-tokenizer; the 9 special tokens are added tokens. No torch here.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError

HF_TOKENIZER_NAME = "tokenizer.json"

# Renders exactly Tokenizer.render_conversation's ids: a leading system message is merged into the first
# user message with a blank line; roles must alternate user/assistant; assistant content is a string or a
# list of parts (text, python -> <|python_start|>..<|python_end|>, python_output ->
# <|output_start|>..<|output_end|>); add_generation_prompt appends <|assistant_start|>. One difference:
# HF tokenizes the rendered string, so two adjacent text parts are encoded together (we encode each).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys_prefix = '' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant (after an optional system message)') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}{%- if loop.first -%}{{- sys_prefix -}}{%- endif -%}"
    "{{- m['content'] -}}{{- '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part.get('text', '') -}}"
    "{%- elif part['type'] == 'python' -%}"
    "{{- '<|python_start|>' -}}{{- part.get('text', '') -}}{{- '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' -}}{{- part.get('text', '') -}}{{- '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown assistant part type: ' + part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (what ByteLevel uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _unicode(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def tokenizer_json(tok: Any) -> str:
    """tokenizer.json text for nanoctl Tokenizer `tok` (a `tokenizers` fast tokenizer)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    ranks: dict[bytes, int] = tok.get_mergeable_ranks()
    vocab = {_unicode(b): r for b, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for b, r in ranks.items():
        if len(b) < 2:
            continue
        for i in range(1, len(b)):
            left, right = b[:i], b[i:]
            if left in ranks and right in ranks:
                merges.append((r, ranks[left], ranks[right], _unicode(left), _unicode(right)))
    merges.sort()
    model = models.BPE(
        vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False, byte_fallback=False
    )
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok.get_pattern()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1])
    for name, i in specials:
        assert i == hf.get_vocab_size(), f"special token {name} id {i} is not after the ranks"
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return hf.to_str()


def tokenizer_config(tok: Any, model_max_length: int | None = None) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer class, bos/eos/pad and the chat template."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    return cfg


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>"}


def write_hf_tokenizer(
    tok: Any, directory: str | os.PathLike[str], model_max_length: int | None = None
) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory` (not atomic)."""
    d = Path(directory)
    (d / HF_TOKENIZER_NAME).write_text(tokenizer_json(tok), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok, model_max_length), indent=2) + "\n", encoding="utf-8"
    )
    (d / "special_tokens_map.json").write_text(
        json.dumps(special_tokens_map(), indent=2) + "\n", encoding="utf-8"
    )


def encoding_from_tokenizer_json(path: str | os.PathLike[str]) -> Any:
    """A tiktoken Encoding rebuilt from a tokenizer.json written by `tokenizer_json`."""
    import tiktoken

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        ranks = {bytes(inverse[c] for c in s): r for s, r in data["model"]["vocab"].items()}
        specials = {t["content"]: t["id"] for t in data["added_tokens"]}
        pattern = next(
            p["pattern"]["Regex"] for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"
        )
    except OSError as e:
        raise NanoctlError(f"cannot read {path} ({e.strerror})", "check the file's permissions") from None
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise NanoctlError(
            f"{path} is not a nanoctl tokenizer.json ({type(e).__name__}: {e})", "run `nanoctl tok train`"
        ) from None
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
