"""`nanoctl tok train` / `tok eval`: end to end on real shards, plus every bad-input path."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.errors import NanoctlError
from nanoctl.tok_train import TokTrainOptions, train_tokenizer

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(res, *needles: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture
def shard_home(home: Path, shared_data: Path) -> Path:
    """A home with two real shards (train + val) in <home>/data/base."""
    base = home / "data" / "base"
    base.mkdir(parents=True)
    shutil.copy(shared_data / "pretrain" / "shard_00000.parquet", base / "shard_00000.parquet")
    shutil.copy(shared_data / "pretrain" / "shard_00008.parquet", base / "shard_00001.parquet")
    return home


def test_train_then_eval(shard_home: Path) -> None:
    res = invoke("tok", "train", "--vocab-size", "1000", "--max-chars", "400k", "--json")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["vocab_size"] == 1000 and r["source"] == "shards" and not r["skipped"]
    # nanochat's reading rule: docs cropped to --doc-cap, stop after passing --max-chars.
    assert 400_000 < r["characters"] <= 400_000 + 10_000
    assert r["chars_per_second"] > 0 and r["token_bytes_max"] > r["token_bytes_min"] >= 1
    tok_dir = shard_home / "tokenizer"
    assert sorted(p.name for p in tok_dir.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.pkl"]

    again = invoke("tok", "train", "--vocab-size", "1000")
    assert again.exit_code == 0 and "already trained" in again.stdout and "--force" in again.stderr

    res = invoke("tok", "eval", "--json")
    assert res.exit_code == 0, res.stderr
    ev = json.loads(res.stdout)
    names = [row["name"] for row in ev["rows"]]
    assert names == ["news", "non-english", "code", "math", "science", "data-train", "data-val"]
    for row in ev["rows"]:
        assert row["ratio"]["ours"] == pytest.approx(row["bytes"] / row["tokens"]["ours"])
    # English prose compresses better than the mixed-script text.
    ratio = {row["name"]: row["ratio"]["ours"] for row in ev["rows"]}
    assert ratio["data-val"] > 2.0 > ratio["non-english"]

    table = invoke("tok", "eval", "--no-shards")
    assert table.exit_code == 0 and "news" in table.stdout and "data-train" not in table.stdout


def test_force_retrains_with_new_vocab(shard_home: Path) -> None:
    assert invoke("tok", "train", "--vocab-size", "600", "--max-chars", "100k").exit_code == 0
    res = invoke("tok", "train", "--vocab-size", "700", "--max-chars", "100k", "--force")
    assert res.exit_code == 0, res.stderr
    assert "Trained tokenizer: vocab 700" in res.stdout


def test_embedded_sample_is_announced(home: Path) -> None:
    res = invoke("tok", "train", "--vocab-size", "300", "--max-chars", "50000")
    assert res.exit_code == 0, res.stderr
    assert "embedded public-domain sample" in res.stderr
    assert "(sample)" in res.stdout.replace("\n", " ") or "sample" in res.stdout


def test_eval_peers_offline_note(shard_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from nanoctl import tok_eval

    assert invoke("tok", "train", "--vocab-size", "300", "--max-chars", "20k").exit_code == 0
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert tok_eval.offline_status("gpt2") == "missing"
    res = invoke("tok", "eval", "--json", "--no-shards")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["encoders"] == ["ours"]
    assert "not in the tiktoken cache" in res.stderr
    # A corrupt cached file is reported and skipped: tiktoken would try to download it again.
    cache = tmp_path / "bad-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for url, _ in tok_eval._TIKTOKEN_FILES["cl100k_base"]:
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"garbage")
    assert tok_eval.offline_status("cl100k_base") == "corrupt"
    monkeypatch.setattr("tiktoken.get_encoding", _no_network)
    res = invoke("tok", "eval", "--json", "--no-shards")
    assert res.exit_code == 0, res.stderr
    assert "cache copy is corrupt" in res.stderr


def _no_network(name: str) -> None:
    raise AssertionError(f"tiktoken.get_encoding({name!r}) called: it could reach the network")


def test_train_from_input_files(home: Path, tmp_path: Path, shared_data: Path) -> None:
    books = tmp_path / "books.jsonl.gz"
    shutil.copy(shared_data / "public_domain" / "books.jsonl.gz", books)
    note = tmp_path / "note.txt"
    note.write_text("A short note in plain text.\n", encoding="utf-8")
    res = invoke(
        "tok",
        "train",
        "--input",
        str(books),
        "-i",
        str(note),
        "--vocab-size",
        "500",
        "--max-chars",
        "300k",
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["source"] == "input" and r["vocab_size"] == 500


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["--vocab-size", "264"], 2, ["--vocab-size 264 is too small", "265"]),
        (["--max-chars", "lots"], 2, ["lots"]),
        (["--doc-cap", "0"], 2, ["--doc-cap"]),
        (["--input", "/nonexistent/dir"], 1, ["/nonexistent/dir does not exist"]),
    ],
)
def test_bad_options(home: Path, args: list[str], code: int, needles: list[str]) -> None:
    res = invoke("tok", "train", *args)
    assert res.exit_code == code, res.stderr
    if code == 1 or "too small" in needles[0] or "--doc-cap" in needles:
        _one_line_error(res, *needles)
    else:
        assert all(n in res.stderr for n in needles)
    assert not (home / "tokenizer").exists()


def test_undecodable_input_file(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    res = invoke("tok", "train", "--input", str(bad), "--vocab-size", "300")
    assert res.exit_code == 1
    _one_line_error(res, str(bad), "not valid UTF-8 at byte offset 3", "--encoding", "iconv")
    assert not (home / "tokenizer").exists()
    res = invoke(
        "tok", "train", "--input", str(bad), "--vocab-size", "300", "--encoding", "latin-1", "--json"
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["characters"] == len("caf\xe9 cr\xe8me br\xfbl\xe9e")


def test_corrupt_and_missing_shards(shard_home: Path) -> None:
    shard = shard_home / "data" / "base" / "shard_00000.parquet"
    shard.write_bytes(b"PAR1 this is not parquet")
    res = invoke("tok", "train", "--vocab-size", "300")
    assert res.exit_code == 1
    _one_line_error(res, str(shard), "not a readable parquet file")
    assert not (shard_home / "tokenizer").exists()


def test_empty_corpus(shard_home: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = shard_home / "data" / "base"
    for p in base.iterdir():
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    res = invoke("tok", "train", "--vocab-size", "300")
    assert res.exit_code == 1
    _one_line_error(res, "no text to train on", str(base))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    res = invoke("tok", "train", "--input", str(empty))
    assert res.exit_code == 1
    _one_line_error(res, f"{empty} is empty")


def test_eval_without_tokenizer(home: Path) -> None:
    res = invoke("tok", "eval")
    assert res.exit_code == 1
    _one_line_error(res, "no tokenizer", "nanoctl tok train")


def test_interrupted_train_leaves_no_tokenizer(shard_home: Path) -> None:
    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "merge" and done > 50:
            raise KeyboardInterrupt

    opts = TokTrainOptions(vocab_size=2000, max_chars=200_000, progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(opts)
    assert not (shard_home / "tokenizer").exists()
    assert [p.name for p in shard_home.iterdir() if p.name.startswith(".")] == []
    # With an existing tokenizer, an interrupted --force run keeps the old one intact.
    train_tokenizer(TokTrainOptions(vocab_size=400, max_chars=100_000))
    before = (shard_home / "tokenizer" / "tokenizer.pkl").read_bytes()
    opts.force = True
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(opts)
    assert (shard_home / "tokenizer" / "tokenizer.pkl").read_bytes() == before


def test_library_errors_are_nanoctl_errors(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"title": "no text field"}\n')
    with pytest.raises(NanoctlError, match="no 'text' field"):
        train_tokenizer(TokTrainOptions(vocab_size=300, inputs=[bad]))


def test_cli_module_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, nanoctl.cli.tok; "
        "print([m for m in ('torch', 'numpy', 'pyarrow', 'tiktoken', 'nanoctl._rustbpe') if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- what tok train used


@pytest.fixture(scope="module")
def megabyte(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1 MB of public-domain prose (../shared/data/public_domain, books 2-4) as one .txt file."""
    with gzip.open(shared_data / "public_domain" / "books.jsonl.gz", "rt", encoding="utf-8") as f:
        books = [json.loads(line)["text"] for line in f]
    text = "\n\n".join(books[1:4])
    text = text[: text.index("\n\n", 1_000_000)]
    path = tmp_path_factory.mktemp("mb") / "megabyte.txt"
    path.write_text(text, encoding="utf-8")
    assert 1_000_000 <= path.stat().st_size < 1_010_000
    return path


def test_one_megabyte_of_text_trains_the_full_vocabulary(home: Path, megabyte: Path) -> None:
    res = invoke("data", "ingest", str(megabyte), "--json")
    assert res.exit_code == 0, res.stderr
    ingested = json.loads(res.stdout)
    res = invoke("tok", "train", "--vocab-size", "8192", "--json")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["vocab_size"] == 8192 and r["warnings"] == [] and "warning" not in res.stderr
    assert r["characters_read"] == r["characters"] == ingested["train_characters"] > 980_000
    assert r["documents"] == ingested["train_documents"] and r["documents_capped"] == 0
    res = invoke("tok", "train", "--vocab-size", "8192", "--force")
    assert res.exit_code == 0, res.stderr
    c = f"{r['characters']:,}"
    assert (
        f"text: read {c} chars, used {c} after --doc-cap 10,000 (100.0% kept; 0 docs cropped)" in res.stdout
    )

    # --input reads a text file the same way (paragraphs grouped into documents under the cap)
    res = invoke("tok", "train", "--input", str(megabyte), "--vocab-size", "8192", "--force", "--json")
    r = json.loads(res.stdout)
    assert r["vocab_size"] == 8192 and r["documents_capped"] == 0 and r["characters"] > 990_000


def test_a_cap_that_drops_text_says_why_and_which_flag(
    home: Path, megabyte: Path, shared_data: Path, tmp_path: Path
) -> None:
    # The case: two ~1 MB books, one document per file, so the cap keeps 10,000 characters.
    with gzip.open(shared_data / "public_domain" / "books.jsonl.gz", "rt", encoding="utf-8") as f:
        other_text = json.loads(f.readline())["text"]  # the first book, 970k characters
    other = tmp_path / "other.txt"
    other.write_text(other_text, encoding="utf-8")
    res = invoke("data", "ingest", str(megabyte), str(other), "--one-doc-per-file", "--val-fraction", "0.5")
    assert res.exit_code == 0, res.stderr
    res = invoke("tok", "train", "--vocab-size", "8192", "--json")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["documents"] == 1 and r["characters"] == 10_000 and r["documents_capped"] == 1
    assert r["characters_read"] == r["longest_document"] > 960_000 and r["capped_fraction"] > 0.98
    assert r["vocab_size"] < 8192
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, res.stderr
    assert "--doc-cap 10,000 dropped 99% of the text" in warnings[0] and "Raise --doc-cap" in warnings[0]
    assert "nanoctl data ingest" in warnings[0]
    assert (
        f"vocabulary {r['vocab_size']:,} of the 8,192 asked" in warnings[1]
        and "raise --doc-cap" in warnings[1]
    )

    # the flag it names fixes it
    res = invoke("tok", "train", "--vocab-size", "8192", "--doc-cap", "2000000", "--force", "--json")
    r = json.loads(res.stdout)
    assert r["vocab_size"] == 8192 and r["warnings"] == [] and r["characters"] == r["characters_read"]


def test_too_little_text_says_more_text_or_max_chars(shard_home: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("A few short lines of text.\n\nNot enough for a large vocabulary.\n", encoding="utf-8")
    res = invoke("tok", "train", "--input", str(small), "--vocab-size", "4096", "--json")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["vocab_size"] < 4096 and len(r["warnings"]) == 1
    assert "train on more text" in r["warnings"][0] and "--doc-cap" not in r["warnings"][0]

    res = invoke("tok", "train", "--vocab-size", "8192", "--max-chars", "20k", "--force", "--json")
    r = json.loads(res.stdout)
    assert r["stopped_at_max_chars"] and r["vocab_size"] < 8192
    assert "raise --max-chars" in r["warnings"][-1]
