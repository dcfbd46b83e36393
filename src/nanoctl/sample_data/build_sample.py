"""Rebuild sample.jsonl.gz, the embedded public-domain corpus (a maintainer script, not used at runtime).

    python src/nanoctl/sample_data/build_sample.py ../shared/data/public_domain/books.jsonl.gz

Input: one JSON object per line with "title", "source", "text" (Project Gutenberg texts, markers
stripped; see SOURCES.md). Output: one JSON object per line, {"title", "text"}, in book order; each
text is a group of whole paragraphs of ~2-6k chars. Deterministic (fixed seed, gzip mtime 0), so a
rebuild from the same input gives the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import sys
from pathlib import Path

# Left out to keep the committed file under ~3 MB gzipped: Latin verse (poemata), music notation
# (How to Listen to Music), Milton's longer poems, and the Shakespeare plays most like others kept.
EXCLUDE = {
    "poemata",
    "How to Listen to Music 7th ed.Hints and Suggestions to Untaught Lovers of the Art",
    "paradise lost (no introduction)",
    "poetical works",
    "comus",
    "henry vi part 1",
    "henry vi part 2",
    "henry vi part 3",
    "henry viii",
    "tragedy of titus andronicus",
    "timon of athens",
    "pericles",
    "troilus and cressida",
    "cymbeline",
    "merry wives of windsor",
    "two gentlemen of verona",
}
MIN_CHARS, MAX_CHARS = 2000, 6000
SEED = 42


def clean(text: str) -> str:
    text = text.replace("\ufeff", "").replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)  # trailing spaces
    # The "Produced by ... Distributed Proofreading" credit line is Gutenberg boilerplate, not the book.
    text = re.sub(r"\A\s*Produced by.*?\n\s*\n", "", text, flags=re.S)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_paragraphs(text: str) -> list[str]:
    paras: list[str] = []
    for p in text.split("\n\n"):
        while len(p) > MAX_CHARS:  # a huge block: cut at the last line break before the cap
            cut = p.rfind("\n", 0, MAX_CHARS)
            cut = cut if cut > 0 else MAX_CHARS
            paras.append(p[:cut])
            p = p[cut:].lstrip("\n")
        if p.strip():
            paras.append(p)
    return paras


def group(paras: list[str], rng: random.Random) -> list[str]:
    docs: list[str] = []
    cur: list[str] = []
    size, target = 0, rng.randint(MIN_CHARS, MAX_CHARS)
    for p in paras:
        if cur and size + len(p) > MAX_CHARS:
            docs.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(MIN_CHARS, MAX_CHARS)
        cur.append(p)
        size += len(p) + 2
        if size >= target:
            docs.append("\n\n".join(cur))
            cur, size, target = [], 0, rng.randint(MIN_CHARS, MAX_CHARS)
    if cur:
        tail = "\n\n".join(cur)
        if docs and len(tail) < MIN_CHARS // 2 and len(docs[-1]) + len(tail) <= MAX_CHARS + MIN_CHARS // 2:
            docs[-1] = docs[-1] + "\n\n" + tail  # a short tail joins the previous doc of the same book
        else:
            docs.append(tail)
    return docs


def main(src: str, dst: str) -> None:
    rng = random.Random(SEED)
    buf = io.BytesIO()
    ndocs = nchars = 0
    with gzip.open(src, "rt", encoding="utf-8") as f:
        books = [json.loads(line) for line in f]
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        for book in books:
            if book["title"] in EXCLUDE:
                continue
            for doc in group(split_paragraphs(clean(book["text"])), rng):
                line = json.dumps({"title": book["title"], "text": doc}, ensure_ascii=False) + "\n"
                gz.write(line.encode("utf-8"))
                ndocs += 1
                nchars += len(doc)
    Path(dst).write_bytes(buf.getvalue())
    print(f"{dst}: {ndocs} docs, {nchars:,} chars, {len(buf.getvalue()):,} bytes")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(here / "sample.jsonl.gz"))
