"""Pretraining shards: format, the embedded sample, download over loopback HTTP (ingest: test_ingest.py)."""

from __future__ import annotations

import gzip
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.data.download import DownloadOptions, download, shard_indices
from nanoctl.data.ingest import IngestOptions, ingest
from nanoctl.data.shards import (
    SAMPLE_CORPUS,
    iter_row_group_texts,
    iter_texts,
    list_data,
    list_shards,
    plan_shards,
    resolve_pretrain_shards,
    shard_info,
    write_shard,
)
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home

runner = CliRunner()


def _books(shared_data: Path) -> list[dict]:
    with gzip.open(shared_data / "public_domain" / "books.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _all_texts(paths: list[Path]) -> list[str]:
    return [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- format, sample


def test_shard_format_round_trip(tmp_path: Path) -> None:
    texts = [f"document {i} " + "x" * i for i in range(100)]
    info = write_shard(tmp_path / "shard_00000.parquet", texts, row_group_size=16)
    pf = pq.ParquetFile(tmp_path / "shard_00000.parquet")
    assert pf.schema_arrow.names == ["text"]
    assert str(pf.schema_arrow.field("text").type) == "string"
    assert pf.metadata.num_row_groups == 7 and pf.metadata.row_group(0).num_rows == 16
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert info.documents == 100 and info.characters == sum(len(t) for t in texts)
    groups = list(iter_row_group_texts(tmp_path / "shard_00000.parquet"))
    assert [g for g, _ in groups] == list(range(7))
    assert [t for _, ts in groups for t in ts] == texts
    # nanochat's DDP pattern: rank 1 of 3 reads row groups 1, 4
    assert [g for g, _ in iter_row_group_texts(tmp_path / "shard_00000.parquet", start=1, step=3)] == [1, 4]


def test_plan_shards_val_is_last_and_train_is_balanced() -> None:
    docs = [f"{i:04d}" + "a" * 96 for i in range(200)]  # 100 chars each
    planned = plan_shards(docs, shard_chars=4500, val_fraction=0.1)
    assert planned[-1] == docs[-20:]  # val = the last 10% of docs, in the last shard
    train = planned[:-1]
    assert len(train) == 4 and sorted(len(s) for s in train) == [45, 45, 45, 45]
    assert [d for s in planned for d in s] == docs
    with pytest.raises(NanoctlError, match="at least 2 documents"):
        plan_shards(["only one"], 100, 0.1)
    with pytest.raises(UsageError):
        plan_shards(docs, 100, 1.0)


def test_sample_materialized_once_and_valid(home: Path) -> None:
    shards = resolve_pretrain_shards(Home(home))
    assert shards.is_sample and shards.directory == home / "data" / "sample"
    assert len(shards.paths) >= 3 and shards.val_path == shards.paths[-1] == list_shards(shards.directory)[-1]
    assert shards.train_paths == list(shards.paths[:-1])
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f]
    texts = _all_texts(list(shards.paths))
    assert sorted(texts) == sorted(corpus)  # every doc exactly once, across train and val
    assert 5_000_000 < sum(len(t) for t in corpus) < 9_000_000
    val_docs = shard_info(shards.val_path).documents
    assert 0.02 * len(corpus) < val_docs < 0.1 * len(corpus)
    assert all(shard_info(p).row_groups >= 4 for p in shards.paths)

    mtimes = [p.stat().st_mtime_ns for p in shards.paths]
    again = resolve_pretrain_shards(Home(home))
    assert again.paths == shards.paths and [p.stat().st_mtime_ns for p in again.paths] == mtimes

    shards.paths[2].unlink()  # a damaged copy is rebuilt whole
    rebuilt = resolve_pretrain_shards(Home(home))
    assert [p.name for p in rebuilt.paths] == [p.name for p in shards.paths]
    assert _all_texts(list(rebuilt.paths)) == texts
    assert not [p for p in (home / "data").iterdir() if p.name.startswith(".")]  # no staging dirs left


def test_sample_materialization_is_safe_under_concurrency(home: Path) -> None:
    # DDP ranks (and parallel stages) may resolve the shards at the same moment: all see one full set.
    code = "from nanoctl.data import resolve_pretrain_shards as r; from nanoctl.home import Home; print(*[p.name for p in r(Home.resolve()).paths])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1
    assert outs[0][0].split() == [p.name for p in resolve_pretrain_shards(Home(home)).paths]
    assert [p.name for p in (home / "data").iterdir()] == ["sample"]
    bad = home / "data" / "sample" / "shard_00001.parquet"
    bad.write_bytes(b"garbage")  # bit rot in our own copy: the hint says how to rebuild it
    with pytest.raises(NanoctlError) as e:
        list(iter_texts("train", Home(home)))
    assert "shard_00001.parquet" in e.value.message and "remove" in (e.value.hint or "")


def test_sample_is_public_domain_only(shared_data: Path) -> None:
    # Every sample doc comes from books.jsonl.gz (public domain), never from the GPL pretrain shards.
    books = re.sub(r"[ \t]+\n", "\n", "\n".join(b["text"] for b in _books(shared_data)))  # as built
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    for doc in docs[::50]:
        for para in doc.split("\n\n")[:2]:
            assert para.strip() in books
    assert SAMPLE_CORPUS.stat().st_size < 3_200_000
    assert (SAMPLE_CORPUS.parent / "SOURCES.md").exists() and (SAMPLE_CORPUS.parent / "LICENSE").exists()


def test_iter_texts_caps(home: Path) -> None:
    val = list(iter_texts("val", Home(home)))
    assert len(val) == shard_info(resolve_pretrain_shards(Home(home)).val_path).documents
    capped = list(iter_texts("train", Home(home), doc_cap=100, max_chars=1000))
    assert all(len(t) <= 100 for t in capped)
    assert (
        sum(len(t) for t in capped) > 1000 and sum(len(t) for t in capped[:-1]) <= 1000
    )  # stops right after
    with pytest.raises(UsageError):
        next(iter_texts("test", Home(home)))


def test_base_shards_preferred_over_sample(home: Path, shared_data: Path) -> None:
    base = home / "data" / "base"
    base.mkdir(parents=True)
    (base / "shard_00000.parquet").write_bytes(
        (shared_data / "pretrain" / "shard_00000.parquet").read_bytes()
    )
    assert resolve_pretrain_shards(Home(home)).is_sample  # one shard is not a train/val pair
    (base / "shard_00008.parquet").write_bytes(
        (shared_data / "pretrain" / "shard_00008.parquet").read_bytes()
    )
    shards = resolve_pretrain_shards(Home(home))
    assert not shards.is_sample and shards.val_path.name == "shard_00008.parquet"
    assert (
        next(iter_texts("val", Home(home)))
        == pq.read_table(base / "shard_00008.parquet").column("text")[0].as_py()
    )


def test_corrupt_shard_is_one_clear_error(home: Path) -> None:
    base = home / "data" / "base"
    write_shard(base / "shard_00000.parquet", ["a", "b"])
    (base / "shard_00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(NanoctlError) as e:
        list(iter_texts("val", Home(home)))
    assert "shard_00001.parquet" in e.value.message and "nanoctl data download" in (e.value.hint or "")
    summary = {s.name: s for s in list_data()}["base"]
    assert summary.problems and "shard_00001.parquet" in summary.problems[0]


# ingest: tests/test_ingest.py


# --------------------------------------------------------------------------------------------- download


class _ShardServer:
    """A loopback HTTP server for shard files, with Range support and scripted failures."""

    def __init__(self, files: dict[str, bytes], support_range: bool = True) -> None:
        self.files = files
        self.support_range = support_range
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.failures: dict[str, list[str]] = {}  # name -> queue of "500" | "truncate" | "garbage"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                queue = server.failures.get(name) or []
                action = queue.pop(0) if queue else ""
                if action == "500":
                    self.send_error(500)
                    return
                if action == "garbage":
                    body = b"<html>not a parquet file</html>" * 10
                start = 0
                if rng and server.support_range and action != "garbage":
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if action == "truncate":  # promise the whole body, send half, hang up
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(shared_data: Path) -> Iterator[tuple[_ShardServer, dict[str, bytes]]]:
    # Real shards renamed as climbmix indices: 0, 1, 2 and the validation shard 6542.
    pre = shared_data / "pretrain"
    files = {
        f"shard_{i:05d}.parquet": (pre / f"shard_0000{j}.parquet").read_bytes()
        for i, j in [(0, 0), (1, 1), (2, 2), (6542, 8)]
    }
    with _ShardServer(files) as srv:
        yield srv, files


def _opts(srv: _ShardServer, **kw) -> DownloadOptions:
    return DownloadOptions(base_url=srv.url, retry_wait=0.01, timeout=5, **kw)


def test_shard_indices_as_nanochat() -> None:
    assert shard_indices(3, 6542) == [0, 1, 2, 6542]
    assert shard_indices(-1, 4) == [0, 1, 2, 3, 4]
    assert shard_indices(10_000, 1822)[-2:] == [1821, 1822]


def test_download_parallel_then_skip(home: Path, served) -> None:
    srv, files = served
    r = download(_opts(srv, shards=3, workers=3))
    base = home / "data" / "base"
    assert sorted(r.downloaded) == sorted(files) and r.skipped == [] and r.retries == 0
    assert {p.name: p.read_bytes() for p in list_shards(base)} == files
    assert not list(base.glob("*.part"))
    shards = resolve_pretrain_shards(Home(home))
    assert not shards.is_sample and shards.val_path.name == "shard_06542.parquet"
    n = len(srv.requests)
    r = download(_opts(srv, shards=3))
    assert sorted(r.skipped) == sorted(files) and r.downloaded == [] and len(srv.requests) == n  # no network


def test_download_resumes_part_file_with_range(home: Path, served) -> None:
    srv, files = served
    base = home / "data" / "base"
    base.mkdir(parents=True)
    name = "shard_00001.parquet"
    (base / f"{name}.part").write_bytes(files[name][:300_000])
    r = download(_opts(srv, shards=2, workers=1))
    assert r.resumed == [name] and (base / name).read_bytes() == files[name]
    assert (name, "bytes=300000-") in srv.requests


def test_download_retries_truncated_and_corrupt(home: Path, served) -> None:
    srv, files = served
    srv.failures = {"shard_00000.parquet": ["truncate"], "shard_06542.parquet": ["garbage", "500"]}
    r = download(_opts(srv, shards=1, workers=2))
    base = home / "data" / "base"
    assert {p.name: p.read_bytes() for p in list_shards(base)} == {
        k: files[k] for k in ("shard_00000.parquet", "shard_06542.parquet")
    }
    assert r.retries == 3
    ranges = [rng for name, rng in srv.requests if name == "shard_00000.parquet"]
    assert ranges[-1] and ranges[-1].startswith("bytes=")  # the truncated body was resumed, not refetched


def test_download_gives_up_after_attempts(home: Path, served) -> None:
    srv, _ = served
    srv.failures = {"shard_00000.parquet": ["500"] * 10}
    with pytest.raises(NanoctlError, match=r"shard_00000.parquet after 3 attempts \(HTTP 500"):
        download(_opts(srv, shards=1, workers=1, attempts=3))


def test_download_404_and_server_without_range(home: Path, served, shared_data: Path) -> None:
    srv, files = served
    with pytest.raises(NanoctlError, match=r"shard_01822.parquet not found \(HTTP 404\)"):
        download(_opts(srv, shards=1, dataset="fineweb-edu", out=home / "fineweb"))
    srv.support_range = False
    base = home / "data" / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "shard_00000.parquet.part").write_bytes(b"stale partial bytes")
    r = download(_opts(srv, shards=1))
    assert (base / "shard_00000.parquet").read_bytes() == files["shard_00000.parquet"]
    assert r.resumed == []


def test_download_offline_is_one_line(home: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = runner.invoke(
        app,
        [
            "data",
            "download",
            "--shards",
            "2",
            "--base-url",
            f"http://127.0.0.1:{port}/x",
            "--retry-wait",
            "0",
        ],
    )
    assert res.exit_code == 1
    lines = _error_lines(res)
    assert re.match(
        rf"error: cannot reach http://127\.0\.0\.1:{port}/x/shard_\d{{5}}\.parquet \(.*refused", lines[0]
    )
    assert lines[1].startswith("hint: ") and "nanoctl data ingest" in lines[1] and len(lines) == 2
    assert not list_shards(home / "data" / "base")


def test_download_refuses_to_mix_with_ingested(home: Path, served, tmp_path: Path) -> None:
    srv, _ = served
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.txt").write_text("another document")
    ingest(IngestOptions(paths=[tmp_path]))
    res = runner.invoke(app, ["data", "download", "--shards", "1", "--base-url", srv.url])
    assert res.exit_code == 1 and "ingested from local files" in _error_lines(res)[0]
    res = runner.invoke(
        app,
        ["data", "download", "--shards", "1", "--base-url", srv.url, "--out", str(tmp_path / "dl"), "--json"],
    )
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(res.stdout)["downloaded"]) == ["shard_00000.parquet", "shard_06542.parquet"]


def test_data_cli_registered() -> None:
    res = runner.invoke(app, ["data", "--help"])
    assert res.exit_code == 0 and all(c in res.stdout for c in ("download", "ingest", "ls"))


def test_cache_ls_shard_detail_from_footers(home: Path) -> None:
    from nanoctl.cache import list_artifacts

    resolve_pretrain_shards(Home(home))
    (entry,) = [a for a in list_artifacts() if a.kind == "shards"]
    summary = {s.name: s for s in list_data()}["sample"]
    assert entry.name == "sample" and f"{summary.documents:,} docs" in entry.detail
    assert f"{summary.characters / 1e6:.1f}M chars" in entry.detail
