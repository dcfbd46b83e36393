"""`nanoctl data ingest` on real files: plain text grouped into documents, the hashed validation split,
nanochat-format shards taken as they are, and every bad input as one line with nothing half-written."""

from __future__ import annotations

import filecmp
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.data.ingest import IngestOptions, ingest, split_paragraphs, val_key
from nanoctl.data.shards import list_shards, resolve_pretrain_shards
from nanoctl.errors import NanoctlError
from nanoctl.home import Home

runner = CliRunner()


def _books(shared_data: Path) -> list[dict]:
    with gzip.open(shared_data / "public_domain" / "books.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _texts(paths: list[Path]) -> list[str]:
    return [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _nonspace(text: str) -> int:
    return len(re.sub(r"\s+", "", text))


def _no_leftovers(home: Path) -> None:
    """Nothing half-written: no shards in data/base and no staging directories next to it."""
    data = home / "data"
    assert not list_shards(data / "base")
    assert not [p.name for p in data.iterdir() if p.name.startswith(".")] if data.exists() else True


@pytest.fixture(scope="module")
def book_files(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four public-domain books as .txt/.md files (about 2 MB), one in a subdirectory."""
    src = tmp_path_factory.mktemp("books")
    (src / "sub").mkdir()
    books = _books(shared_data)
    for i, b in enumerate(books[1:5]):
        (src / ("sub" if i == 1 else "") / f"book{i}.{'md' if i == 3 else 'txt'}").write_text(b["text"])
    (src / "cover.png").write_bytes(b"\x89PNG")  # other suffixes and hidden files are skipped
    (src / ".hidden.txt").write_text("ignored")
    return src


def _book_paths(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".md") and not p.name.startswith("."))


# ------------------------------------------------------------------------------------- plain text documents


def test_plain_text_is_grouped_into_documents_of_whole_paragraphs(home: Path, book_files: Path) -> None:
    r = ingest(IngestOptions(paths=[book_files]))
    texts = _texts(list_shards(home / "data" / "base"))
    sources = [p.read_text() for p in _book_paths(book_files)]
    assert r.files == r.text_files == 4 and r.documents == len(texts) > 200
    assert r.skipped_files == [str(book_files / "cover.png")]
    assert all(len(t) <= 8000 for t in texts)
    assert sum(len(t) for t in texts) / len(texts) > 6000  # documents are filled up to the cap
    # Every paragraph under the cap is in exactly one document, whole; nothing else is lost.
    paragraphs = Counter(p for s in sources for p in split_paragraphs(s) if len(p) <= 8000)
    in_docs = Counter(p for t in texts for p in split_paragraphs(t))
    assert not paragraphs - in_docs
    assert sum(_nonspace(t) for t in texts) == sum(_nonspace(s) for s in sources)
    assert r.characters == sum(len(t) for t in texts)
    assert not resolve_pretrain_shards(Home(home)).is_sample


def test_doc_chars_and_long_paragraphs(home: Path, tmp_path: Path) -> None:
    lines = [f"line {i:03d} of a long paragraph with no blank line in it." for i in range(100)]
    long_para = "\n".join(lines)  # 5,599 chars
    words = " ".join(f"w{i:04d}" for i in range(600))  # 3,599 chars, no line breaks
    solid = "x" * 2500  # no whitespace at all
    small = [f"Short paragraph {i}." for i in range(30)]
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(small[:10] + [long_para] + small[10:20] + [words, solid] + small[20:]) + "\n")
    r = ingest(IngestOptions(paths=[f], doc_chars=1000, out=tmp_path / "o"))
    texts = _texts(list_shards(tmp_path / "o"))
    assert r.cut_paragraphs == 3 and all(len(t) <= 1000 for t in texts)
    assert sum(_nonspace(t) for t in texts) == _nonspace(f.read_text())
    joined = "\n".join(texts)
    # cut at line breaks: every line of the long paragraph survives whole
    assert all(line in joined for line in lines)
    # cut at spaces: every word survives whole; no whitespace: cut hard at the cap
    assert all(w in joined.split() for w in words.split()[:50])
    assert sorted(len(t) for t in texts if set(t) == {"x"}) == [1000, 1000]
    # ... and the last piece of a cut paragraph starts the next document
    assert sum(1 for t in texts if t.startswith("x" * 500 + "\n\nShort paragraph 20.")) == 1
    assert all(s in joined for s in small)

    # the old behaviour: one document per file
    (tmp_path / "b.txt").write_text("another file\n\nwith two paragraphs")
    r = ingest(IngestOptions(paths=[f, tmp_path / "b.txt"], one_doc_per_file=True, out=tmp_path / "one"))
    assert r.documents == 2 and sorted(_texts(list_shards(tmp_path / "one"))) == sorted(
        [f.read_text().strip(), "another file\n\nwith two paragraphs"]
    )


def test_stdin_and_cli_summary(home: Path, book_files: Path) -> None:
    text = (book_files / "book0.txt").read_text()
    res = runner.invoke(app, ["data", "ingest", "-", "--doc-chars", "4000"], input=text)
    assert res.exit_code == 0, res.output
    out = res.stdout.splitlines()
    texts = _texts(list_shards(home / "data" / "base"))
    val = _texts(list_shards(home / "data" / "base")[-1:])
    assert all(len(t) <= 4000 for t in texts)
    train_chars = sum(len(t) for t in texts) - sum(len(t) for t in val)
    assert out[0].startswith(f"Ingested into {home / 'data' / 'base'}: read 1 file(s)")
    assert f"train: {len(texts) - len(val):,} documents, {train_chars:,} characters (1 shard)" in out[1]
    assert f"val:   {len(val):,} documents, {sum(len(t) for t in val):,} characters" in out[2]

    res = runner.invoke(app, ["data", "ingest", "-", "--force", "--json"], input=text)
    r = json.loads(res.stdout)
    texts = _texts(list_shards(home / "data" / "base"))
    assert r["train_documents"] + r["val_documents"] == r["documents"] == len(texts)
    assert r["train_characters"] + r["val_characters"] == r["characters"] == sum(len(t) for t in texts)
    assert json.loads((home / "data" / "base" / "dataset.json").read_text())["inputs"] == ["<stdin>"]


# ------------------------------------------------------------------------------------- the validation split


def test_validation_is_a_hashed_fraction_of_documents(home: Path, book_files: Path, tmp_path: Path) -> None:
    files = _book_paths(book_files)
    r = ingest(IngestOptions(paths=files, val_fraction=0.05))
    base = home / "data" / "base"
    texts = _texts(list_shards(base))
    val = _texts(list_shards(base)[-1:])
    assert r.val_documents == len(val) == round(len(texts) * 0.05) and r.train_documents == len(texts) - len(
        val
    )
    # the documents with the smallest seeded hash, not "the last file"
    assert sorted(val) == sorted(sorted(texts, key=lambda t: val_key(t, 42))[: len(val)])
    last_file = files[-1].read_text()
    assert any(v not in last_file for v in val)

    # re-ingesting the same files, in another order, gives the same split
    ingest(IngestOptions(paths=files[::-1], val_fraction=0.05, out=tmp_path / "again"))
    assert sorted(_texts(list_shards(tmp_path / "again")[-1:])) == sorted(val)
    # the seed changes it
    ingest(IngestOptions(paths=files, val_fraction=0.05, seed=7, out=tmp_path / "seed7"))
    assert sorted(_texts(list_shards(tmp_path / "seed7")[-1:])) != sorted(val)
    # at most one shard's worth (the train shards here are ~200k chars); at least one document
    r = ingest(IngestOptions(paths=files, val_fraction=0.5, shard_chars=200_000, out=tmp_path / "cap"))
    assert 0 < r.val_characters <= 200_000 and r.val_documents < r.documents * 0.5
    (tmp_path / "two.txt").write_text("first document\n\nsecond document")
    r = ingest(IngestOptions(paths=[tmp_path / "two.txt"], doc_chars=16, out=tmp_path / "two"))
    assert (r.train_documents, r.val_documents) == (1, 1)


def test_output_inside_inputs_is_not_read_back_and_force_replaces(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "notes"
    src.mkdir()
    for i in range(3):
        (src / f"n{i}.txt").write_text(f"note {i}\n\nsecond paragraph of note {i}")
    with pytest.raises(NanoctlError, match="already holds"):
        for _ in range(2):
            ingest(IngestOptions(paths=[src], doc_chars=30, out=src / "shards"))
    r = ingest(IngestOptions(paths=[src], doc_chars=30, out=src / "shards", force=True))
    assert r.files == 3 and r.documents == 6
    # an --out directory holding other files keeps them; old shards beyond the new set go
    keep = tmp_path / "mixed"
    keep.mkdir()
    (keep / "README.txt").write_text("mine")
    (keep / "shard_00007.parquet").write_bytes((list_shards(src / "shards")[0]).read_bytes())
    r = ingest(IngestOptions(paths=[src], doc_chars=30, out=keep, force=True))
    assert (keep / "README.txt").read_text() == "mine"
    assert [p.name for p in list_shards(keep)] == ["shard_00000.parquet", "shard_00001.parquet"]


# ------------------------------------------------------------------------------------- jsonl, parquet, shards


def test_jsonl_text_field_and_parquet_column(home: Path, shared_data: Path, tmp_path: Path) -> None:
    gsm = shared_data / "gsm8k" / "train.jsonl"
    r = ingest(IngestOptions(paths=[gsm], text_field="question", out=tmp_path / "gsm"))
    questions = [json.loads(line)["question"].strip() for line in gsm.open()]
    assert r.documents == len(questions) == 7473 and sorted(_texts(list_shards(tmp_path / "gsm"))) == sorted(
        questions
    )
    assert r.val_documents == 75 and r.text_files == 0

    res = runner.invoke(app, ["data", "ingest", str(gsm)])
    assert res.exit_code == 1
    assert _error_lines(res)[0] == f"error: {gsm}:1: no 'text' field (found: question, answer)"
    assert "--text-field" in _error_lines(res)[1]

    table = pa.table({"id": list(range(40)), "body": [f"document number {i} " * 5 for i in range(40)]})
    pq.write_table(table, tmp_path / "docs.parquet")
    r = ingest(IngestOptions(paths=[tmp_path / "docs.parquet"], column="body", out=tmp_path / "pq"))
    assert r.documents == 40 and r.mode == "documents"
    res = runner.invoke(app, ["data", "ingest", str(tmp_path / "docs.parquet")])
    assert res.exit_code == 1 and "no 'text' column (columns: id, body)" in _error_lines(res)[0]
    assert "--column" in _error_lines(res)[1]

    gz = tmp_path / "books.jsonl.gz"
    gz.write_bytes((shared_data / "public_domain" / "books.jsonl.gz").read_bytes())
    assert ingest(IngestOptions(paths=[gz], out=tmp_path / "gz")).documents == 58


def test_nanochat_shards_are_taken_as_they_are(home: Path, shared_data: Path, tmp_path: Path) -> None:
    pre = shared_data / "pretrain"
    res = runner.invoke(app, ["data", "ingest", str(pre)])
    assert res.exit_code == 0, res.output
    assert "took 9 nanochat-format shard(s) as they are" in res.stdout
    base = home / "data" / "base"
    got, src = list_shards(base), list_shards(pre)
    assert [p.name for p in got] == [p.name for p in src]
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(got, src, strict=True))
    val = pq.read_metadata(src[-1]).num_rows
    assert f"val:   {val:,} documents, {sum(len(t) for t in _texts(src[-1:])):,} characters" in res.stdout
    assert f"train: {3428 - val:,} documents" in res.stdout and "(8 shards)" in res.stdout
    listing = {e["name"]: e for e in json.loads(runner.invoke(app, ["data", "ls", "--json"]).stdout)}
    assert listing["base"]["active"] and listing["base"]["documents"] == 3428

    # --reshard re-splits them: 1% validation by hash, documents kept as they are
    r = ingest(IngestOptions(paths=[pre], reshard=True, shard_chars=5_000_000, force=True))
    assert r.mode == "documents" and r.documents == 3428 and r.shards == 5 and r.val_documents == 34
    assert sorted(_texts(list_shards(base))) == sorted(t.strip() for t in _texts(src))
    # one shard alone cannot hold both splits; shards mixed with text are re-sharded too (both said)
    r = ingest(IngestOptions(paths=[src[0]], out=tmp_path / "one"))
    assert r.mode == "documents" and r.shards == 2 and "re-sharded" in r.notes[0]
    (tmp_path / "extra.txt").write_text("one more document\n\nand another")
    r = ingest(IngestOptions(paths=[src[0], src[1], tmp_path / "extra.txt"], out=tmp_path / "mix"))
    rows = sum(pq.read_metadata(p).num_rows for p in src[:2])
    assert r.mode == "documents" and "mixed" in r.notes[0] and r.documents == rows + 1


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["/nonexistent/books"], 1, "/nonexistent/books does not exist"),
        (["{tmp}/x.csv"], 2, "x.csv: unsupported file type"),
        (["{tmp}/empty.txt"], 1, "empty.txt is empty (no text)"),
        (["{tmp}/blank.md"], 1, "blank.md is empty (no text)"),
        (["{tmp}/empty.jsonl"], 1, "empty.jsonl is empty (no text)"),
        (["{tmp}/cover.txt"], 1, "cover.txt looks like a binary file (a NUL byte at byte offset 8)"),
        (["{tmp}/latin1.txt"], 1, "latin1.txt is not valid UTF-8 at byte offset 3 (bytes e9)"),
        (["{tmp}/latin1.txt.gz"], 1, "latin1.txt.gz (decompressed) is not valid UTF-8 at byte offset 3"),
        (["{tmp}/utf16.txt"], 1, "utf16.txt is UTF-16 text"),
        (["{tmp}/bad.jsonl"], 1, "bad.jsonl:3: no 'text' field (found: title, year)"),
        (["{tmp}/broken.jsonl"], 1, "broken.jsonl:2: invalid JSON"),
        (["{tmp}/surrogate.jsonl"], 1, "surrogate.jsonl:1: field 'text' holds a lone surrogate"),
        (["{tmp}/one.txt"], 1, "found 1 document(s)"),
        (["{tmp}/nothing"], 1, "no .txt/.md/.jsonl/.parquet files found"),
        (["{tmp}/one.txt", "--val-fraction", "0"], 2, "--val-fraction must be in (0, 0.5], got 0.0"),
        (["{tmp}/one.txt", "--val-fraction", "0.6"], 2, "--val-fraction must be in (0, 0.5], got 0.6"),
        (["{tmp}/one.txt", "--val-fraction", "-0.1"], 2, "--val-fraction must be in (0, 0.5]"),
        (["{tmp}/one.txt", "--encoding", "klingon"], 2, "--encoding 'klingon' is not a known text encoding"),
        (
            ["{tmp}/one.txt", "--encoding-errors", "ignore"],
            2,
            "--encoding-errors must be one of strict, replace",
        ),
        (["{tmp}/one.txt", "--doc-chars", "0"], 2, "--doc-chars must be positive"),
        (["-", "-"], 2, "`-` (stdin) given twice"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    home: Path, tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.md").write_text("\n  \n\t\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "cover.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("café crème\n\nbrûlée".encode("latin-1"))
    with gzip.open(tmp_path / "latin1.txt.gz", "wb") as f:
        f.write("café".encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("hello\n\nworld".encode("utf-16"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"title": "no text", "year": 1900}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "surrogate.jsonl").write_text('{"text": "half a pair \\ud800 here"}\n{"text": "ok"}\n')
    (tmp_path / "one.txt").write_text("just one document")
    (tmp_path / "nothing").mkdir()
    res = runner.invoke(
        app, ["data", "ingest", *[a.replace("{tmp}", str(tmp_path)) for a in args]], input="from stdin"
    )
    assert res.exit_code == code, res.output
    lines = _error_lines(res)
    assert lines[0].startswith("error: ") and needle in lines[0], lines
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines)
    assert "Traceback" not in res.output
    _no_leftovers(home)


def test_encoding_options(home: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("caf\xe9 au lait\n\nd\xe9j\xe0 vu".encode("latin-1"))
    (tmp_path / "b.txt").write_bytes("cr\xe8me\n\nbr\xfbl\xe9e".encode("cp1252"))
    ingest(IngestOptions(paths=[tmp_path], encoding="latin-1", doc_chars=12, out=tmp_path / "l1"))
    assert sorted(_texts(list_shards(tmp_path / "l1"))) == ["brûlée", "café au lait", "crème", "déjà vu"]
    (tmp_path / "u16.txt").write_bytes("hello\n\nworld".encode("utf-16"))
    ingest(IngestOptions(paths=[tmp_path / "u16.txt"], encoding="utf-16", doc_chars=5, out=tmp_path / "u16"))
    assert sorted(_texts(list_shards(tmp_path / "u16"))) == ["hello", "world"]
    # replace: undecodable bytes become U+FFFD and are counted (U+FFFD already in a file is not)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.txt").write_bytes(b"caf\xe9 au lait \xff\xfe and more")
    (tmp_path / "r" / "b.txt").write_text("plain text \ufffd already here")
    (tmp_path / "r" / "c.jsonl").write_text('{"text": "half a pair \\ud800 here"}\n')
    r = ingest(IngestOptions(paths=[tmp_path / "r"], encoding_errors="replace", out=tmp_path / "rep"))
    assert r.replaced_chars == 4 and r.files_with_replacements == 2
    texts = _texts(list_shards(tmp_path / "rep"))
    assert "caf\ufffd au lait \ufffd\ufffd and more" in texts and "half a pair \ufffd here" in texts


def test_empty_files_inside_a_directory_are_skipped_and_counted(home: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    r = ingest(IngestOptions(paths=[tmp_path], doc_chars=3))
    assert r.documents == 2 and sorted(Path(p).name for p in r.empty_files) == ["empty.jsonl", "empty.txt"]
    res = runner.invoke(app, ["data", "ingest", str(tmp_path), "--doc-chars", "3", "--force"])
    assert res.exit_code == 0 and "2 empty file(s) skipped" in res.stdout
    (tmp_path / "b.txt").write_text("long paragraph one\n\nlong paragraph two")
    res = runner.invoke(
        app, ["data", "ingest", str(tmp_path), "--doc-chars", "20", "--min-chars", "10", "--force"]
    )
    assert res.exit_code == 0 and "1 documents under --min-chars skipped" in res.stdout
    assert sorted(_texts(list_shards(home / "data" / "base"))) == ["long paragraph one", "long paragraph two"]


def test_failed_or_interrupted_ingest_keeps_the_old_shards(
    home: Path, book_files: Path, tmp_path: Path
) -> None:
    ingest(IngestOptions(paths=[book_files / "book0.txt"]))
    base = home / "data" / "base"
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")

    def contents() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in base.iterdir()}

    # a bad file after good ones: nothing is written
    with pytest.raises(NanoctlError, match="byte offset 3"):
        ingest(IngestOptions(paths=[book_files, tmp_path / "latin1.txt"], force=True))
    assert contents() == before

    # interrupted while writing shards: the old shards stay, the staging directory goes
    def interrupt(info) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(IngestOptions(paths=[book_files], shard_chars=300_000, force=True), on_shard=interrupt)
    assert contents() == before
    assert [p.name for p in (home / "data").iterdir()] == ["base"]
