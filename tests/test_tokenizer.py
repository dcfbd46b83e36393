"""nanoctl.tokenizer: training wrapper, special tokens, chat rendering masks, save/load, token_bytes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import tiktoken

from nanoctl.errors import NanoctlError
from nanoctl.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    ConversationError,
    Tokenizer,
    load_token_bytes,
    load_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Hello there, how are you doing today? I'm fine, thanks.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Numbers: 1234 5678 and 3.14159; unicode: café naïve 中文 😀",
] * 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # nanochat's test size: 256 bytes + 9 specials + 35 merges.
    return Tokenizer.train_from_iterator(CORPUS, 256 + 9 + 35)


def test_vocab_layout(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == 300
    assert len(tok.get_mergeable_ranks()) == 291
    # Specials come after the mergeable ranks, in nanochat's order.
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(291, 300))
    assert tok.get_bos_token_id() == 291
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.get_pattern() == SPLIT_PATTERN
    assert tok.train_stats["docs"] == len(CORPUS) and tok.train_stats["merges"] == 35


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello world!",
        "unseen wörds ünïcode 中文字 😀🎉 👨‍👩‍👧",
        "  spaces\n\n\ttabs\r\n",
        "'s 'll 1234567",
    ],
)
def test_roundtrip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_not_parsed_from_text(tok: Tokenizer) -> None:
    ids = tok.encode("<|bos|>")
    assert tok.get_bos_token_id() not in ids
    assert tok.decode(ids) == "<|bos|>"
    assert tok.id_to_token(tok.encode_special("<|assistant_end|>")) == "<|assistant_end|>"


def test_prepend_append_and_batch(tok: Tokenizer) -> None:
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    plain = tok.encode("Hello world")
    assert tok.encode("Hello world", prepend="<|bos|>", append=end) == [bos, *plain, end]
    assert tok("Hello world", prepend=bos) == [bos, *plain]
    texts = ["Hello world", "the lazy dog", ""]
    batch = tok.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [[bos, *tok.encode(t)] for t in texts]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def _conv(*messages: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def test_render_conversation_masks(tok: Tokenizer) -> None:
    s = tok.encode_special
    ids, mask = tok.render_conversation(_conv(("user", "Hi there"), ("assistant", "Hello!")))
    u, a = tok.encode("Hi there"), tok.encode("Hello!")
    assert ids == [
        s("<|bos|>"),
        s("<|user_start|>"),
        *u,
        s("<|user_end|>"),
        s("<|assistant_start|>"),
        *a,
        s("<|assistant_end|>"),
    ]
    assert mask == [0, 0, *[0] * len(u), 0, 0, *[1] * len(a), 1]


def test_system_message_merged_into_first_user(tok: Tokenizer) -> None:
    conv = _conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo"))
    with_system = tok.render_conversation(conv)
    merged = tok.render_conversation(_conv(("user", "Be brief.\n\nHi"), ("assistant", "Yo")))
    assert with_system == merged
    assert conv["messages"][1]["content"] == "Hi"  # the input is not modified


def test_tool_parts_masking(tok: Tokenizer) -> None:
    s = tok.encode_special
    parts = [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "1+2"},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": "It is 3."},
    ]
    ids, mask = tok.render_conversation(_conv(("user", "1+2?"), ("assistant", parts)))
    start = ids.index(s("<|assistant_start|>")) + 1
    t1, code, out, t2 = (tok.encode(p["text"]) for p in parts)
    expect_ids = [*t1, s("<|python_start|>"), *code, s("<|python_end|>"), s("<|output_start|>"), *out,
                  s("<|output_end|>"), *t2, s("<|assistant_end|>")]  # fmt: skip
    expect_mask = [1] * len(t1) + [1] * (len(code) + 2) + [0] * (len(out) + 2) + [1] * len(t2) + [1]
    assert ids[start:] == expect_ids
    assert mask[start:] == expect_mask


def test_truncation_and_completion(tok: Tokenizer) -> None:
    conv = _conv(
        ("user", "Hello world " * 20), ("assistant", "Fine " * 20), ("user", "ok"), ("assistant", "bye")
    )
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=17)
    assert ids == full_ids[:17] and mask == full_mask[:17]
    prompt = tok.render_for_completion(conv)
    ids3, _ = tok.render_conversation(
        _conv(("user", "Hello world " * 20), ("assistant", "Fine " * 20), ("user", "ok"))
    )
    assert prompt == [*ids3, tok.encode_special("<|assistant_start|>")]
    assert conv["messages"][-1]["content"] == "bye"


@pytest.mark.parametrize(
    "conv, match",
    [
        ({"messages": []}, "no messages"),
        (_conv(("assistant", "x")), "message 0 is from 'assistant'"),
        (_conv(("user", "a"), ("user", "b")), "message 1 is from 'user'"),
        (_conv(("system", "s"), ("assistant", "a")), "system message must be followed"),
        (_conv(("user", ["x"])), "user content must be a string"),
        (_conv(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])), "unknown part type"),
    ],
)
def test_render_errors(tok: Tokenizer, conv: dict, match: str) -> None:
    with pytest.raises(ConversationError, match=match):
        tok.render_conversation(conv)
    assert issubclass(ConversationError, ValueError)


def test_render_for_completion_needs_assistant_last(tok: Tokenizer) -> None:
    with pytest.raises(ConversationError, match="last message"):
        tok.render_for_completion(_conv(("user", "hi")))


def test_vocab_too_small() -> None:
    with pytest.raises(NanoctlError, match="at least 265"):
        Tokenizer.train_from_iterator(["abc"], 264)
    assert Tokenizer.train_from_iterator(["abc"], 265).get_vocab_size() == 265


def test_save_load_roundtrip(tok: Tokenizer, home: Path) -> None:
    import torch

    tok.save(home / "tokenizer")
    assert sorted(p.name for p in (home / "tokenizer").iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.pkl"]
    # nanochat's format: the pickle is a plain tiktoken Encoding.
    with open(home / "tokenizer" / "tokenizer.pkl", "rb") as f:
        assert isinstance(pickle.load(f), tiktoken.Encoding)
    loaded = load_tokenizer(home)
    text = "Hello world, café 😀"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.get_vocab_size() == 300
    tb = load_token_bytes(home)
    assert tb.dtype == torch.int32 and tb.shape == (300,)
    assert tb[:256].tolist() == [1] * 256 and tb[291:].tolist() == [0] * 9
    for i in range(256, 291):
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i))
    # Missing token_bytes.pt (e.g. a copied nanochat pickle) is rebuilt from the tokenizer.
    (home / "tokenizer" / "token_bytes.pt").unlink()
    assert torch.equal(load_token_bytes(home), tb)


def test_token_bytes_counts_raw_bytes_not_decoded_text() -> None:
    # Train on text whose frequent pairs split multi-byte UTF-8 chars: token "\xe4\xb8" is not valid
    # UTF-8 alone; decode() would count a 3-byte replacement char, raw bytes give 2.
    tok = Tokenizer.train_from_iterator(["中丫丰串 " * 50], 256 + 9 + 5)
    partial = [i for i in range(256, 261) if not _is_utf8(tok.enc.decode_single_token_bytes(i))]
    assert partial, "expected a token that is not valid UTF-8 on its own"
    tb = tok.token_bytes()
    for i in partial:
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i)) != len(tok.decode([i]).encode("utf-8"))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_save_is_atomic(tok: Tokenizer, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    target = home / "tokenizer"
    # Interrupted first save: nothing appears.
    monkeypatch.setattr(torch, "save", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        tok.save(target)
    assert not target.exists()
    assert list(home.iterdir()) == []
    monkeypatch.undo()
    # Interrupted re-save over an existing tokenizer: the old one survives intact.
    tok.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = Tokenizer.train_from_iterator(["completely different text " * 20], 256 + 9 + 20)
    monkeypatch.setattr(torch, "save", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        other.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in home.iterdir()) == ["tokenizer"]


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def test_load_errors(home: Path) -> None:
    with pytest.raises(NanoctlError, match="no tokenizer in .*run `nanoctl tok train`"):
        load_tokenizer(home)
    d = home / "tokenizer"
    d.mkdir()
    (d / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(NanoctlError, match="not a valid tokenizer pickle") as e:
        load_tokenizer(home)
    assert "tok train" in (e.value.hint or "")
    (d / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(NanoctlError, match="expected a pickled tiktoken.Encoding"):
        load_tokenizer(home)


def test_loads_tokenizer_made_by_nanochat_rustbpe(home: Path) -> None:
    """A tokenizer.pkl written the way nanochat writes it (PyPI rustbpe -> tiktoken) loads and agrees."""
    rustbpe = pytest.importorskip("rustbpe")
    if not hasattr(rustbpe, "Tokenizer"):  # the repo's rustbpe/ folder seen as a namespace package
        pytest.skip("PyPI rustbpe is not installed")
    r = rustbpe.Tokenizer()
    r.train_from_iterator(iter(CORPUS), 256 + 35, pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in r.get_mergeable_ranks()}
    special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(
        name="rustbpe", pat_str=r.get_pattern(), mergeable_ranks=ranks, special_tokens=special
    )
    (home / "tokenizer").mkdir()
    with open(home / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    theirs = load_tokenizer(home)
    ours = Tokenizer.train_from_iterator(CORPUS, 256 + 9 + 35)
    assert theirs.get_mergeable_ranks() == ours.get_mergeable_ranks()
    assert theirs.get_bos_token_id() == ours.get_bos_token_id()
