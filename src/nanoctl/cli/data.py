"""`nanoctl data`: pretraining shards — download nanochat's, ingest your own text, list what is there."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nanoctl.cli.common import App, JsonOption, err, field_default, home_of, out
from nanoctl.data.download import DownloadOptions
from nanoctl.data.ingest import IngestOptions

_download = partial(field_default, DownloadOptions)  # CLI defaults are the library's
_ingest = partial(field_default, IngestOptions)

if TYPE_CHECKING:
    from rich.progress import Progress

data_app = App(
    help="Pretraining text as parquet shards: download nanochat's, ingest your own files, or list them. "
    "Without any, stages use the embedded public-domain sample."
)


def _progress(*columns: Any) -> Progress:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # Progress goes to stderr so `--json` stdout stays clean; off when stderr is not a terminal.
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    )


def _fmt_chars(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


@data_app.command("download")
def data_download(
    ctx: typer.Context,
    shards: Annotated[
        int,
        typer.Option(
            "--shards",
            "-n",
            help="Train shards to fetch (0..N-1; -1 = all). The validation shard (the last index) is always "
            "added. ~100 MB and ~250M chars each; the tokenizer needs 8, nanochat's GPT-2 speedrun ~170.",
        ),
    ] = _download("shards"),
    workers: Annotated[int, typer.Option("--workers", "-w", help="Parallel downloads.")] = _download(
        "workers"
    ),
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="climbmix (karpathy/climbmix-400b-shuffle, nanochat's current) or fineweb-edu "
            "(karpathy/fineweb-edu-100b-shuffle, the original).",
        ),
    ] = _download("dataset"),
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url", help="Fetch <URL>/shard_NNNNN.parquet instead of the Hugging Face hub (a mirror)."
        ),
    ] = _download("base_url"),
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Directory for the shards (default: <home>/data/base).")
    ] = _download("out"),
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait on a connection or read.")
    ] = _download("timeout"),
    attempts: Annotated[
        int, typer.Option("--attempts", help="Tries per shard before giving up.")
    ] = _download("attempts"),
    retry_wait: Annotated[
        float,
        typer.Option("--retry-wait", help="Seconds before the first retry; doubles after each failure."),
    ] = _download("retry_wait"),
    json_output: JsonOption = False,
) -> None:
    """Download nanochat's pretraining shards (parallel, resumable, verified).

    Files already present and valid are skipped; interrupted downloads resume from their .part file.
    Offline? Use `nanoctl data ingest PATH` for your own text, or nothing at all for the embedded sample.

    Example: [cyan]nanoctl data download --shards 8 --workers 4[/]
    """
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from nanoctl.data.download import download

    opts = DownloadOptions(
        shards=shards,
        workers=workers,
        dataset=dataset,
        base_url=base_url,
        out=out_dir,
        timeout=timeout,
        attempts=attempts,
        retry_wait=retry_wait,
    )
    with _progress(DownloadColumn(), TransferSpeedColumn()) as progress:
        files = progress.add_task("shards", total=None)
        data = progress.add_task("bytes", total=None)

        def on_start(total: int, present: int) -> None:
            progress.update(files, total=total, completed=present, description=f"shards ({present} present)")

        def on_file(name: str, status: str) -> None:
            progress.advance(files)
            if not err.is_terminal:
                err.print(f"{status} {name}")

        result = download(
            opts,
            on_start=on_start,
            on_bytes=lambda n: progress.advance(data, n),
            on_file=on_file,
            home=home_of(ctx),
        )
    if json_output:
        out.print_json(json.dumps(result.to_dict()))
        return
    fetched = len(result.downloaded) + len(result.resumed)
    out.print(
        f"Done! Downloaded: {fetched}/{result.requested} shards ({len(result.skipped)} already present, "
        f"{len(result.resumed)} resumed, {result.retries} retries, {result.bytes / 1e6:.1f} MB) into {result.directory}",
        soft_wrap=True,
    )


@data_app.command("ingest")
def data_ingest(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Files (.txt .md .jsonl .parquet, also .txt.gz/.jsonl.gz), directories (read recursively), "
            "or - for plain text on stdin.",
            show_default=False,
        ),
    ],
    doc_chars: Annotated[
        int,
        typer.Option(
            "--doc-chars",
            help="Plain text: paragraphs (blank-line separated) grouped into documents of up to this many "
            "characters; only a longer paragraph is cut.",
        ),
    ] = _ingest("doc_chars"),
    one_doc_per_file: Annotated[
        bool, typer.Option("--one-doc-per-file", help="Plain text: one document per file (no grouping).")
    ] = _ingest("one_doc_per_file"),
    min_chars: Annotated[
        int, typer.Option("--min-chars", help="Skip documents shorter than this many characters.")
    ] = _ingest("min_chars"),
    text_field: Annotated[
        str, typer.Option("--text-field", help="JSONL field that holds the text.")
    ] = _ingest("text_field"),
    column: Annotated[str, typer.Option("--column", help="Parquet column that holds the text.")] = _ingest(
        "column"
    ),
    encoding: Annotated[
        str,
        typer.Option("--encoding", help="Encoding of text and JSONL files (e.g. latin-1, cp1252, utf-16)."),
    ] = _ingest("encoding"),
    encoding_errors: Annotated[
        str,
        typer.Option(
            "--encoding-errors",
            help="strict: a byte that does not decode is an error; replace: replace it with U+FFFD (counted).",
        ),
    ] = _ingest("encoding_errors"),
    shard_chars: Annotated[
        int, typer.Option("--shard-chars", help="Target characters per train shard (nanochat: 250M).")
    ] = _ingest("shard_chars"),
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Share of documents in the validation shard, in (0, 0.5]: at least one document, at most one "
            "shard; picked by a seeded hash of each document, so the same inputs give the same split.",
        ),
    ] = _ingest("val_fraction"),
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the validation hash and the train shuffle.")
    ] = _ingest("seed"),
    row_group_size: Annotated[
        int | None,
        typer.Option(
            "--row-group-size", help="Documents per parquet row group (default: ~16 groups, <= 1024)."
        ),
    ] = _ingest("row_group_size"),
    reshard: Annotated[
        bool,
        typer.Option(
            "--reshard",
            help="Re-shard parquet files already in nanochat's shard format (a text column) instead of "
            "taking them as they are (in order, the last as validation).",
        ),
    ] = _ingest("reshard"),
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Directory for the shards (default: <home>/data/base).")
    ] = _ingest("out"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace shards already in the output directory.")
    ] = _ingest("force"),
    json_output: JsonOption = False,
) -> None:
    """Turn local text into pretraining shards: train shards plus a validation shard (the last).

    Plain text is split at blank lines and grouped into documents of up to --doc-chars characters. The
    validation shard holds --val-fraction of the documents, chosen by a seeded hash (the same inputs give
    the same split). Parquet files in nanochat's shard format are taken as they are unless --reshard.
    No append mode: to add text, rerun with every input and --force. Nothing is written on an error.

    Example: [cyan]nanoctl data ingest ./books/ notes.md --doc-chars 8000 --val-fraction 0.01[/]
    """
    from nanoctl.data.ingest import ingest

    opts = IngestOptions(
        paths=list(paths),
        out=out_dir,
        doc_chars=doc_chars,
        one_doc_per_file=one_doc_per_file,
        min_chars=min_chars,
        text_field=text_field,
        column=column,
        encoding=encoding,
        encoding_errors=encoding_errors,
        shard_chars=shard_chars,
        val_fraction=val_fraction,
        seed=seed,
        row_group_size=row_group_size,
        reshard=reshard,
        force=force,
    )
    from rich.progress import MofNCompleteColumn

    with _progress(MofNCompleteColumn()) as progress:
        task = progress.add_task("reading", total=None)
        result = ingest(
            opts,
            on_start=lambda n: progress.update(task, total=n),
            on_file=lambda path, n: progress.update(task, advance=1, description=f"reading {path.name[:40]}"),
            on_shard=lambda info: progress.update(task, description=f"wrote {Path(info.path).name}"),
            home=home_of(ctx),
        )
    if json_output:
        out.print_json(json.dumps(result.to_dict()))
        return
    for line in ingest_summary(result, opts):
        out.print(line, soft_wrap=True)


def _chars(n: int | None) -> str:
    return "characters not counted" if n is None else f"{n:,} characters"


def ingest_summary(result: Any, opts: IngestOptions) -> list[str]:
    """The lines `data ingest` prints: what went where, then notes."""
    if result.mode == "shards":
        how = (
            f"took {result.files} nanochat-format shard(s) as they are "
            f"({result.linked} linked, {result.copied} copied; --reshard to re-split them)"
        )
    else:
        how = f"read {result.files} file(s)"
        if result.text_files and opts.one_doc_per_file:
            how += f"; {result.text_files} plain-text file(s) as one document each"
        elif result.text_files:
            how += f"; plain text grouped into documents of up to {opts.doc_chars:,} characters"
    val_share = f"{result.val_documents / result.documents:.1%}" if result.documents else "0%"
    lines = [
        f"Ingested into {result.directory}: {how}",
        f"  train: {result.train_documents:,} documents, {_chars(result.train_characters)} "
        f"({result.shards - 1} shard{'s' if result.shards != 2 else ''})",
        f"  val:   {result.val_documents:,} documents, {_chars(result.val_characters)} "
        f"(the last shard; {val_share} of the documents)",
    ]
    notes = list(result.notes)
    if result.cut_paragraphs:
        notes.append(f"{result.cut_paragraphs:,} paragraph(s) longer than --doc-chars were cut")
    if result.skipped_short:
        notes.append(f"{result.skipped_short:,} documents under --min-chars skipped")
    if result.skipped_files:
        notes.append(f"{len(result.skipped_files)} file(s) of other types skipped")
    if result.empty_files:
        notes.append(f"{len(result.empty_files)} empty file(s) skipped")
    if result.replaced_chars:
        notes.append(
            f"{result.replaced_chars:,} undecodable bytes replaced in {result.files_with_replacements} file(s)"
        )
    if notes:
        lines.append("note: " + "; ".join(notes))
    return lines


@data_app.command("ls")
def data_ls(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List the shard directories (base, sample): shards, documents and characters per split.

    The `active` one is what `tok train` and `pretrain` read: base when it holds >= 2 shards, else the
    embedded sample (materialized on first use).

    Example: [cyan]nanoctl data ls --json[/]
    """
    from rich.table import Table

    from nanoctl.data.shards import list_data

    entries = list_data(home_of(ctx))
    if json_output:
        out.print_json(
            json.dumps([dict(e.to_dict(), documents=e.documents, characters=e.characters) for e in entries])
        )
        return
    table = Table(title_justify="left")
    for col in ("name", "source", "shards", "docs train/val", "chars train/val", "size"):
        table.add_column(col, justify="left" if col in ("name", "source") else "right")
    for e in entries:
        name = f"{e.name} *" if e.active else e.name
        if e.shards:
            docs = f"{e.train_documents:,} / {e.val_documents:,}"
            chars = f"{_fmt_chars(e.train_characters)} / {_fmt_chars(e.val_characters)}"
            table.add_row(name, e.source, str(e.shards), docs, chars, f"{e.size_bytes / 1e6:.1f} MB")
        else:
            table.add_row(name, "embedded" if e.name == "sample" else "-", "0", "", "", "")
    out.print(table)
    out.print("* = read by `tok train` and `pretrain` (the sample is written on first use)")
    for e in entries:
        out.print(f"{e.name}: {e.directory}", soft_wrap=True)
    if entries[0].shards == 1:
        err.print(
            "note: base holds 1 shard; it needs >= 2 (train + the last as validation), so the sample is used"
        )
    for e in entries:
        for problem in e.problems or []:
            err.print(f"warning: {problem}", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data", rich_help_panel="Data")
