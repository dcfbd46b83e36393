"""`nanoctl tok`: train the BPE tokenizer and measure its compression."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from nanoctl.cli.common import App, JsonOption, err, field_default, home_of, out
from nanoctl.tok_eval import TokEvalOptions
from nanoctl.tok_train import TokTrainOptions

_train = partial(field_default, TokTrainOptions)  # CLI defaults are the library's
_eval = partial(field_default, TokEvalOptions)

tok_app = App(help="The BPE tokenizer: train it on the pretraining text (Rust), measure its compression.")


def parse_count(value: str | int) -> int:
    """Accept 2000000000, 2e9, 2_000_000_000, 2G, 500M, 10k."""
    if isinstance(value, int):
        return value
    s = str(value).strip().replace("_", "").replace(",", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(s[-1:].lower(), 1)
    if mult != 1:
        s = s[:-1]
    try:
        n = float(s) * mult
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a count (examples: 2000000000, 2e9, 2G, 500M)") from None
    if n != int(n):
        raise typer.BadParameter(f"{value!r} is not a whole number")
    return int(n)


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


@tok_app.command("train")
def tok_train(
    ctx: typer.Context,
    vocab_size: Annotated[
        int,
        typer.Option("--vocab-size", help="Tokens including the 9 special ones (nanochat: 2^15)."),
    ] = _train("vocab_size"),
    max_chars: Annotated[
        int,
        typer.Option(
            "--max-chars",
            parser=parse_count,
            metavar="N",
            help="Stop reading after this many characters (accepts 2e9, 2G, 500M).",
        ),
    ] = _train("max_chars"),
    doc_cap: Annotated[
        int,
        typer.Option(
            "--doc-cap",
            help="Crop each document to this many characters (nanochat's rule; reported when it drops text).",
        ),
    ] = _train("doc_cap"),
    inputs: Annotated[
        list[Path] | None,
        typer.Option(
            "--input",
            "-i",
            help="Train on these files/directories (.txt .md .jsonl .parquet, .gz too) instead of the home's "
            "shards. Repeatable.",
            show_default=False,
        ),
    ] = None,
    text_field: Annotated[
        str,
        typer.Option("--text-field", help="JSONL field / parquet column holding the text (with --input)."),
    ] = _train("text_field"),
    encoding: Annotated[
        str, typer.Option("--encoding", help="Encoding of text and JSONL files (with --input).")
    ] = _train("encoding"),
    force: Annotated[
        bool, typer.Option("--force", help="Retrain even if the home already has a tokenizer.")
    ] = _train("force"),
    json_output: JsonOption = False,
) -> None:
    """Train the BPE tokenizer on the train shards (the embedded sample if the home has none).

    Writes <home>/tokenizer/tokenizer.pkl and token_bytes.pt (nanochat's format) all at once:
    an interrupted run leaves no partial tokenizer.

    Example: [cyan]nanoctl tok train --vocab-size 32768 --max-chars 2e9[/]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nanoctl.tok_train import train_tokenizer

    tty = err.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not tty,
    )
    tasks: dict[str, int] = {}
    last_pct: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if not tty:  # plain lines every 10% (logs, CI)
            pct = int(100 * done / total) if total else 0
            if pct // 10 != last_pct.get(stage, -1) // 10:
                last_pct[stage] = pct
                what = f"{_fmt(done)} / {_fmt(total)} chars" if stage == "read" else f"{done}/{total} merges"
                err.print(f"{stage}: {pct}% ({what})", highlight=False)
            return
        if stage == "merge" and "read" in tasks:
            t = progress.tasks[tasks["read"]]
            progress.update(tasks["read"], total=t.completed)  # reading is over: show it complete
        if stage not in tasks:
            label = "reading + counting (chars)" if stage == "read" else "merging"
            tasks[stage] = progress.add_task(label, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    opts = TokTrainOptions(
        vocab_size=vocab_size,
        max_chars=max_chars,
        doc_cap=doc_cap,
        inputs=list(inputs or []),
        text_field=text_field,
        encoding=encoding,
        force=force,
        progress=on_progress,
    )
    with progress:
        result = train_tokenizer(opts, home=home_of(ctx))
    for note in result.notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    for warning in result.warnings:
        err.print(f"warning: {warning}", highlight=False, soft_wrap=True, markup=False)
    if json_output:
        out.print_json(json.dumps(dict(result.to_dict(), capped_fraction=result.capped_fraction)))
        return
    if result.skipped:
        out.print(
            f"tokenizer already trained (vocab {result.vocab_size:,}) in {result.directory}", soft_wrap=True
        )
        return
    vocab = f"vocab {result.vocab_size:,}"
    if result.vocab_size < result.requested_vocab_size:
        vocab += f" of {result.requested_vocab_size:,} asked"
    stop = ", stopped at --max-chars" if result.stopped_at_max_chars else ""
    out.print(
        f"Trained tokenizer: {vocab} on {result.characters:,} chars ({result.documents:,} docs, {result.source}) "
        f"in {result.seconds:.1f}s (read+count {result.read_seconds:.1f}s, merges {result.merge_seconds:.1f}s), "
        f"{_fmt(result.chars_per_second)} chars/s",
        soft_wrap=True,
    )
    out.print(
        f"text: read {result.characters_read:,} chars, used {result.characters:,} after --doc-cap "
        f"{result.doc_cap:,} ({1 - result.capped_fraction:.1%} kept; {result.documents_capped:,} docs cropped{stop})",
        soft_wrap=True,
    )
    out.print(
        f"token bytes: min {result.token_bytes_min}, max {result.token_bytes_max}, "
        f"mean {result.token_bytes_mean:.2f}, std {result.token_bytes_std:.2f}; saved to {result.directory}",
        soft_wrap=True,
    )


@tok_app.command("eval")
def tok_eval(
    ctx: typer.Context,
    shards: Annotated[
        bool,
        typer.Option(
            "--shards/--no-shards", help="Also measure the first row group of the train/val shards."
        ),
    ] = _eval("shards"),
    json_output: JsonOption = False,
) -> None:
    """Compression (bytes per token) on sample texts and shard rows, vs GPT-2/GPT-4 when cached offline.

    Example: [cyan]nanoctl tok eval --json[/]
    """
    from rich.table import Table

    from nanoctl.tok_eval import evaluate_tokenizer

    result = evaluate_tokenizer(TokEvalOptions(shards=shards), home=home_of(ctx))
    for note in result.notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if json_output:
        out.print_json(json.dumps(result.to_dict()))
        return
    peers = [e for e in result.encoders if e != "ours"]
    table = Table(
        title=f"Bytes per token, higher is better (ours: vocab {result.vocab_size:,})", title_justify="left"
    )
    table.add_column("text")
    table.add_column("bytes", justify="right")
    table.add_column("ours tokens", justify="right")
    table.add_column("ours ratio", justify="right")
    for p in peers:
        table.add_column(f"{p} ratio", justify="right")
        table.add_column(f"vs {p}", justify="right")
    for row in result.rows:
        cells = [row.name, f"{row.bytes:,}", f"{row.tokens['ours']:,}", f"{row.ratio['ours']:.2f}"]
        for p in peers:
            diff = 100 * (row.tokens[p] - row.tokens["ours"]) / row.tokens[p] if row.tokens[p] else 0.0
            color = "green" if diff > 0 else "red"
            cells += [f"{row.ratio[p]:.2f}", f"[{color}]{diff:+.1f}%[/]"]
        table.add_row(*cells)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(tok_app, name="tok", rich_help_panel="Data")
