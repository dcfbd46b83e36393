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
            help="Files (.txt .md .jsonl .parquet, also .txt.gz/.jsonl.gz) or directories (read recursively).",
            show_default=False,
        ),
    ],
    split: Annotated[
        str,
        typer.Option(
            "--split", help="Text files: one document per 'file', or per blank-line-separated 'paragraph'."
        ),
    ] = _ingest("split"),
    min_chars: Annotated[
        int, typer.Option("--min-chars", help="Skip documents shorter than this many characters.")
    ] = _ingest("min_chars"),
    text_field: Annotated[
        str, typer.Option("--text-field", help="JSONL field / parquet column that holds the text.")
    ] = _ingest("text_field"),
    shard_chars: Annotated[
        int, typer.Option("--shard-chars", help="Target characters per train shard (nanochat: 250M).")
    ] = _ingest("shard_chars"),
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction", help="Share of documents in the validation shard (the last; >= 1 document)."
        ),
    ] = _ingest("val_fraction"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the document shuffle.")] = _ingest("seed"),
    row_group_size: Annotated[
        int | None,
        typer.Option(
            "--row-group-size", help="Documents per parquet row group (default: ~16 groups, <= 1024)."
        ),
    ] = _ingest("row_group_size"),
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Directory for the shards (default: <home>/data/base).")
    ] = _ingest("out"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace shards already in the output directory.")
    ] = _ingest("force"),
    json_output: JsonOption = False,
) -> None:
    """Turn local text into pretraining shards (shuffled; the last shard is validation).

    No append mode: to add text, rerun with every input and --force (the output is deterministic).
    Bytes that are not UTF-8 are replaced (U+FFFD) and counted in the summary.

    Example: [cyan]nanoctl data ingest ./books/ notes.md --split paragraph --min-chars 200[/]
    """
    from nanoctl.data.ingest import ingest

    opts = IngestOptions(
        paths=list(paths),
        out=out_dir,
        split=split,
        min_chars=min_chars,
        text_field=text_field,
        shard_chars=shard_chars,
        val_fraction=val_fraction,
        seed=seed,
        row_group_size=row_group_size,
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
    out.print(
        f"Ingested {result.files} file(s): {result.documents:,} documents, {result.characters:,} characters "
        f"-> {result.shards} shards in {result.directory} (last = validation: {result.val_documents:,} documents, "
        f"{result.val_characters:,} characters)",
        soft_wrap=True,
    )
    notes = []
    if result.skipped_short:
        notes.append(f"{result.skipped_short:,} documents under --min-chars skipped")
    if result.skipped_files:
        notes.append(f"{len(result.skipped_files)} file(s) of other types skipped")
    if result.replaced_chars:
        notes.append(
            f"{result.replaced_chars:,} undecodable bytes replaced in {result.files_with_replacements} file(s)"
        )
    if notes:
        out.print("note: " + "; ".join(notes), soft_wrap=True)


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
