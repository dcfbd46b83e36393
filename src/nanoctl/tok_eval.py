"""`nanoctl tok eval`: compression (bytes per token) of the home's tokenizer, as nanochat's tok_eval.

Texts: built-in samples (news, non-English, code, math, science) and the first row group of the train
and validation shards. Compared with GPT-2 and GPT-4 (tiktoken `gpt2`, `cl100k_base`) only when
tiktoken already has them cached: this never touches the network.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.home import Home

NEWS = """\
CITY HALL, Tuesday — The council voted 7 to 2 last night to approve a new budget for the city's \
public libraries, ending a months-long dispute over opening hours. Under the plan, the central branch \
will stay open until 9 p.m. on weekdays, and four neighborhood branches will reopen on Sundays \
starting in March. "People told us again and again that the library is where their children do \
homework," said council member Ana Ruiz, who sponsored the measure. Opponents argued that the $4.2 \
million increase should have gone to road repairs. The mayor is expected to sign the bill on Friday.
"""

NON_ENGLISH = """\
도서관은 지역 사회의 중심입니다. 어린이들은 방과 후에 책을 읽고 숙제를 합니다.
La bibliothèque municipale rouvrira ses portes le dimanche à partir du mois de mars.
图书馆是社区的中心，孩子们放学后在这里读书和做作业。
Библиотека снова будет открыта по воскресеньям начиная с марта.
Die Stadtbibliothek öffnet ab März wieder sonntags; der Eintritt bleibt frei.
"""

CODE = '''\
def merge_counts(words: dict[tuple[int, ...], int]) -> dict[tuple[int, int], int]:
    """Count adjacent pairs, weighted by word frequency."""
    counts: dict[tuple[int, int], int] = {}
    for word, freq in words.items():
        for a, b in zip(word, word[1:]):
            counts[(a, b)] = counts.get((a, b), 0) + freq
    return counts


class Cache:
    def __init__(self, size=128):
        self.size = size
        self._data = {}

    def get(self, key, default=None):
        return self._data.get(key, default)
'''

MATH = r"""\
\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space, $|\langle u, v \rangle|^2 \le \langle u, u \rangle
\cdot \langle v, v \rangle$, with equality if and only if $u$ and $v$ are linearly dependent.
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \langle u, v \rangle / \|v\|^2$; then
$0 \le \|u - \lambda v\|^2 = \|u\|^2 - |\langle u, v\rangle|^2 / \|v\|^2$, and
$\sum_{i=1}^{n} x_i y_i \le \sqrt{\sum_i x_i^2}\sqrt{\sum_i y_i^2}$ follows for $n = 3, 10, 2024$.
\end{proof}
"""

SCIENCE = """\
Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, \
chlorophyll absorbs photons at wavelengths near 430 nm and 662 nm, splitting water molecules and \
releasing O2. The Calvin cycle then fixes CO2 into three-carbon sugars using ATP and NADPH; roughly \
6 CO2 + 6 H2O -> C6H12O6 + 6 O2. Measured quantum yields are about 0.1 mol of O2 per mole of photons.
"""

SAMPLE_TEXTS: dict[str, str] = {
    "news": NEWS,
    "non-english": NON_ENGLISH,
    "code": CODE,
    "math": MATH,
    "science": SCIENCE,
}

# tiktoken's download URLs and sha256 for the comparison encodings (tiktoken_ext/openai_public.py).
# The hash is checked here because tiktoken re-downloads a cached file whose hash does not match.
_TIKTOKEN_FILES: dict[str, list[tuple[str, str]]] = {
    "gpt2": [
        (
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
        (
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
    ],
    "cl100k_base": [
        (
            "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
            "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        )
    ],
}
PEERS = {"gpt2": "GPT-2", "cl100k_base": "GPT-4"}


@dataclass
class TokEvalOptions:
    shards: bool = True  # also evaluate the first row group of the train and val shards


@dataclass
class TokEvalRow:
    name: str
    bytes: int
    tokens: dict[str, int]  # encoder label -> token count ("ours", "GPT-2", "GPT-4")
    ratio: dict[str, float]  # bytes per token (higher = better compression)


@dataclass
class TokEvalResult:
    tokenizer: str
    vocab_size: int
    encoders: list[str]
    rows: list[TokEvalRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tiktoken_cache_dir() -> Path:
    """Where tiktoken keeps downloaded encodings (same rule as tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def offline_status(name: str) -> str:
    """ "ok" when tiktoken can build `name` from its cache alone, else "missing" or "corrupt"."""
    cache = tiktoken_cache_dir()
    files = _TIKTOKEN_FILES.get(name)
    if not files or not str(cache):
        return "missing"
    for url, sha256 in files:
        path = cache / hashlib.sha1(url.encode()).hexdigest()
        if not path.is_file():
            return "missing"
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
                return "corrupt"
        except OSError:
            return "corrupt"
    return "ok"


def _peer_encoders(notes: list[str]) -> dict[str, Any]:
    import tiktoken

    encs: dict[str, Any] = {}
    missing = []
    for name, label in PEERS.items():
        status = offline_status(name)
        if status == "missing":
            missing.append(f"{label} ({name})")
        elif status == "corrupt":
            notes.append(f"{label} ({name}): the tiktoken cache copy is corrupt; comparison skipped")
        else:
            encs[label] = tiktoken.get_encoding(name)
    if missing:
        notes.append(
            f"{' and '.join(missing)} not in the tiktoken cache ({tiktoken_cache_dir()}); comparison skipped. "
            "On a machine with internet, `python -c \"import tiktoken; tiktoken.get_encoding('gpt2'); "
            "tiktoken.get_encoding('cl100k_base')\"` fills it (set TIKTOKEN_CACHE_DIR to keep it)."
        )
    return encs


def _shard_texts(home: Home, notes: list[str]) -> dict[str, str]:
    from nanoctl.data.shards import iter_row_group_texts, resolve_pretrain_shards

    shards = resolve_pretrain_shards(home)
    prefix = "sample" if shards.is_sample else "data"
    if shards.is_sample:
        notes.append("no shards in <home>/data/base: the train/val rows come from the embedded sample")
    out = {}
    for split, path in (("train", shards.train_paths[0]), ("val", shards.val_path)):
        first = next(iter_row_group_texts(path), None)
        if first is not None:
            out[f"{prefix}-{split}"] = "\n".join(first[1])
    return out


def evaluate_tokenizer(
    opts: TokEvalOptions, *, home: Home | str | os.PathLike[str] | None = None
) -> TokEvalResult:
    """Bytes per token of our tokenizer (and GPT-2/GPT-4 when cached) on each text. `home` is resolved here."""
    from nanoctl.tokenizer import load_tokenizer

    home = Home.resolve(home)
    tok = load_tokenizer(home)
    notes: list[str] = []
    peers = _peer_encoders(notes)
    texts = dict(SAMPLE_TEXTS)
    if opts.shards:
        texts.update(_shard_texts(home, notes))
    encoders: dict[str, Any] = {"ours": tok.enc, **peers}
    result = TokEvalResult(
        tokenizer=str(home.tokenizer_dir),
        vocab_size=tok.get_vocab_size(),
        encoders=list(encoders),
        notes=notes,
    )
    for name, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        counts = {label: len(enc.encode_ordinary(text)) for label, enc in encoders.items()}
        ratio = {label: (nbytes / n if n else 0.0) for label, n in counts.items()}
        result.rows.append(TokEvalRow(name=name, bytes=nbytes, tokens=counts, ratio=ratio))
    return result
