"""nanoctl._rustbpe: the Rust BPE trainer, splitter and encoder against independent references.

References: the `regex` module (split), a pure-Python BPE (merges) and tiktoken (encoding).
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoctl import _rustbpe

GPT4_N2 = _rustbpe.GPT4_PATTERN
GPT4_N3 = _rustbpe.GPT4_PATTERN_N3

TRICKY = [
    "",
    "Hello world",
    "I'm you're he'll we've they'd it's I'M YOU'RE HE'LL 'S 'ſ 'Ll 'x ''s",
    "'sup 'llama 're'",
    "1 12 123 1234 12345 3.14159 1,000,000 ¹²³ ½ ١٢٣٤ ⅫⅠ",
    "  leading and trailing   ",
    "a  b   c    d",
    "tabs\tand\t\tmore\t",
    "line\nbreaks\n\nand\r\nwindows\r\n\r\n   \n  indent",
    "trailing newline\n",
    "\n\n\n",
    "   ",
    " \u00a0\u3000\u2028\u2029\u0085\x0b\x0c mixed spaces",
    "punct!!! ?? ... --- ___ (x) [y] {z} <a> 'q' \"w\"",
    " !\n",
    "emoji 😀😃👍🏽 👨‍👩‍👧 🇫🇷 flags",
    "CJK 中文字符测试 日本語のテキスト 한국어 텍스트",
    "Ünïcödé façade naïve Ελληνικά Русский עברית العربية हिन्दी",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: pass",
    "math: $\\int_0^1 x^2\\,dx = \\frac{1}{3}$ and e^{i\\pi}+1=0",
    "mixed123abc456 x1y2z3 ab12cd",
    "\x1c\x1d\x1e\x1f control \x00 nul \x7f del",
    "ſtraße ＡＢＣ ｆｕｌｌ",
    "'\n'\r's\n",
]


def _chars() -> st.SearchStrategy[str]:
    # Weighted towards the classes the pattern distinguishes, plus any code point.
    return st.one_of(
        st.sampled_from(list(" \t\n\r'sStTdDmMlLvVeErR0123456789.,!?-_ ")),
        st.sampled_from(list("\u00a0\u3000\u2028\u0085\x0b\x0c\x1cſé中😀١①½")),
        st.characters(codec="utf-8"),
    )


texts = st.lists(_chars(), max_size=40).map("".join)


def _stable_char(c: str) -> bool:
    # tiktoken's regex engine may use an older Unicode version than the `regex` module our tables
    # come from; code points assigned in Python's (older) unicodedata are classified alike by both.
    return unicodedata.category(c) not in ("Cn", "Cs")


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("pattern", [GPT4_N2, GPT4_N3])
def test_split_matches_regex_module_tricky(text: str, pattern: str) -> None:
    assert _rustbpe.split_text(text, pattern) == regex.findall(pattern, text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_split_matches_regex_module_random(text: str) -> None:
    assert _rustbpe.split_text(text) == regex.findall(GPT4_N2, text)
    assert _rustbpe.split_text(text, GPT4_N3) == regex.findall(GPT4_N3, text)


@settings(max_examples=200, deadline=None)
@given(text=st.lists(_chars().filter(lambda c: _stable_char(c)), max_size=40).map("".join))
def test_custom_pattern_uses_regex_engine(text: str) -> None:
    # Custom patterns run on fancy-regex, whose Unicode tables may predate the `regex` module's.
    pat = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"
    assert not _rustbpe.is_fast_pattern(pat)
    assert _rustbpe.split_text(text, pat) == regex.findall(pat, text)


def test_fast_path_detection_and_pattern_errors() -> None:
    assert _rustbpe.is_fast_pattern(GPT4_N2) and _rustbpe.is_fast_pattern(GPT4_N3)
    with pytest.raises(ValueError, match="invalid split pattern"):
        _rustbpe.split_text("x", "(unclosed")


def test_split_on_real_text(shared_data: Path) -> None:
    with gzip.open(shared_data / "public_domain" / "books.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:300_000]
    assert _rustbpe.split_text(text) == regex.findall(GPT4_N2, text)


def reference_bpe(texts: list[str], vocab_size: int, pattern: str = GPT4_N2) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair each step; highest count wins, ties go to the smallest pair."""
    counts = Counter(p for t in texts for p in regex.findall(pattern, t))
    words = [(list(p.encode("utf-8")), c) for p, c in counts.items()]
    merges: list[tuple[int, int]] = []
    for i in range(vocab_size - 256):
        stats: Counter[tuple[int, int]] = Counter()
        for w, c in words:
            for pair in zip(w, w[1:], strict=False):
                stats[pair] += c
        if not stats:
            break
        best = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new_id = 256 + i
        for w, _ in words:
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            w[:] = out
        merges.append(best)
    return merges


def train(texts: list[str], vocab_size: int, **kw) -> _rustbpe.Tokenizer:
    tok = _rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kw)
    return tok


@pytest.fixture(scope="module")
def small_corpus(shared_data: Path) -> list[str]:
    import pyarrow.parquet as pq

    docs = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet", columns=["text"]).column("text")
    return [d[:2000] for d in docs.to_pylist()[:40]] + TRICKY


def test_merges_equal_reference_bpe(small_corpus: list[str]) -> None:
    tok = train(small_corpus, 256 + 120)
    assert tok.get_merges() == reference_bpe(small_corpus, 256 + 120)
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(256 + 120))
    assert ranks[65] == (b"A", 65)


@settings(max_examples=30, deadline=None)
@given(docs=st.lists(texts, min_size=1, max_size=6), extra=st.integers(1, 40))
def test_merges_equal_reference_bpe_random(docs: list[str], extra: int) -> None:
    assert train(docs, 256 + extra).get_merges() == reference_bpe(docs, 256 + extra)


def test_custom_pattern_training_equals_reference() -> None:
    pat = r"\p{L}+| ?\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    docs = ["aaa bbb aaa ccc 123 123 1234", "hello hello help helm 12 12"] * 3
    assert train(docs, 290, pattern=pat).get_merges() == reference_bpe(docs, 290, pat)


def test_training_is_deterministic_and_order_free(small_corpus: list[str]) -> None:
    a = train(small_corpus, 400, buffer_size=3).get_mergeable_ranks()
    b = train(list(reversed(small_corpus)), 400, buffer_size=1000).get_mergeable_ranks()
    assert a == b


def test_train_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least 256"):
        train(["abc"], 255)
    empty = train([], 300)
    assert empty.vocab_size == 256 and empty.get_merges() == []
    # Fewer pairs than requested merges: stops early rather than inventing tokens.
    assert train(["ab ab"], 1000).vocab_size < 1000
    with pytest.raises(TypeError, match="document 1 is a bytes"):
        train(["ok", b"bytes"], 300)
    with pytest.raises(ValueError, match="document 2 is not valid Unicode"):
        train(["ok", "fine", "bad \udcff surrogate"], 300)


def test_progress_callback_and_abort() -> None:
    seen: list[tuple[str, int, int]] = []
    tok = train(["hello world " * 50] * 20, 300, buffer_size=5, progress=lambda *a: seen.append(a))
    assert tok.vocab_size > 256
    assert [s for s in seen if s[0] == "read"][-1][1:] == (20, 20 * 600)
    # Only 10 merges exist in this corpus; the last report says so against the 44 asked for.
    assert seen[-1] == ("merge", len(tok.get_merges()), 44) and len(tok.get_merges()) == 10

    def boom(stage: str, done: int, total: int) -> None:
        if stage == "merge":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(["hello world " * 50] * 20, 300, progress=boom)


def test_iterator_exception_propagates() -> None:
    def gen():
        yield "some text"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        train(gen(), 300)


@pytest.fixture(scope="module")
def trained(small_corpus: list[str]) -> _rustbpe.Tokenizer:
    return train(small_corpus, 256 + 600)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_roundtrip_random_unicode(trained: _rustbpe.Tokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.decode_bytes(ids) == text.encode("utf-8")


def _tiktoken(tok: _rustbpe.Tokenizer) -> tiktoken.Encoding:
    ranks = {bytes(b): r for b, r in tok.get_mergeable_ranks()}
    return tiktoken.Encoding(name="t", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})


@settings(max_examples=300, deadline=None)
@given(text=st.lists(_chars().filter(_stable_char), max_size=60).map("".join))
def test_encode_identical_to_tiktoken_random(trained: _rustbpe.Tokenizer, text: str) -> None:
    enc = _tiktoken(trained)
    assert trained.encode(text) == enc.encode_ordinary(text)


def test_encode_identical_to_tiktoken_real_text(trained: _rustbpe.Tokenizer, shared_data: Path) -> None:
    import pyarrow.parquet as pq

    enc = _tiktoken(trained)
    docs = pq.read_table(shared_data / "pretrain" / "shard_00008.parquet", columns=["text"]).column("text")
    docs = docs.to_pylist()[:50] + TRICKY
    assert trained.batch_encode(docs) == enc.encode_ordinary_batch(docs)
    assert trained.batch_encode(docs, num_threads=1) == [trained.encode(d) for d in docs]


def test_from_ranks_matches_tiktoken_and_validates(trained: _rustbpe.Tokenizer) -> None:
    ranks = trained.get_mergeable_ranks()
    re_built = _rustbpe.Tokenizer.from_ranks(dict(ranks), trained.get_pattern())
    text = "The quick brown fox, 1234 times! 中文 😀"
    assert re_built.encode(text) == trained.encode(text)
    assert re_built.vocab_size == trained.vocab_size
    with pytest.raises(ValueError, match="out of range"):
        _rustbpe.Tokenizer.from_ranks([(b"a", 5)])
    with pytest.raises(ValueError, match="appears twice"):
        _rustbpe.Tokenizer.from_ranks([(b"a", 0), (b"b", 0)])
    with pytest.raises(ValueError, match="unknown token id"):
        trained.decode([10**6])
    with pytest.raises(ValueError, match="empty"):
        _rustbpe.Tokenizer().encode("x")
