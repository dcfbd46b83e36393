"""The tokenizer: BPE trained by our Rust crate (`nanoctl._rustbpe`), encoding by tiktoken.

Same API and files as nanochat's `RustBPETokenizer`: the 9 special tokens sit after the mergeable
ranks (ids vocab-9 .. vocab-1), `tokenizer/tokenizer.pkl` is a pickled `tiktoken.Encoding` and
`tokenizer/token_bytes.pt` holds each id's byte length (0 for specials), so tokenizers move both ways
between nanoctl and nanochat homes. Chat rendering follows nanochat's masking rules exactly.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl.errors import NanoctlError
from nanoctl.home import Home

if TYPE_CHECKING:
    import tiktoken  # imported where used: `nanoctl tok --help` (which reads TokTrainOptions) stays light
    import torch

SPECIAL_TOKENS: list[str] = [
    # every document begins with the Beginning of Sequence (BOS) token that delimits documents
    "<|bos|>",
    # tokens below are only used during finetuning to render Conversations into token ids
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant invokes python REPL tool
    "<|python_end|>",
    "<|output_start|>",  # python REPL outputs back to assistant
    "<|output_end|>",
]

# GPT-4's split pattern with numbers grouped by at most 2 digits (nanochat: better than 3 at 32K vocab).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

PICKLE_NAME = "tokenizer.pkl"
TOKEN_BYTES_NAME = "token_bytes.pt"
RENDER_ALL = 1 << 30  # "no limit" for render_conversation: callers crop to their own context
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

ProgressFn = Callable[[str, int, int], None]


class ConversationError(NanoctlError, ValueError):
    """A conversation that cannot be rendered (bad roles, order or content). Also a ValueError."""


class Tokenizer:
    """A tiktoken `Encoding` plus nanochat's special tokens and chat rendering."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>") -> None:
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)
        # Counters and timings from training (empty for a loaded tokenizer).
        self.train_stats: dict[str, Any] = {}

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = SPLIT_PATTERN,
        progress: ProgressFn | None = None,
        buffer_size: int = 8192,
    ) -> Tokenizer:
        """Train BPE on `texts`: `vocab_size - 9` mergeable ranks, then the 9 special tokens.

        `progress(stage, done, total)` gets ("read", docs, chars) and ("merge", merges, total).
        """
        from nanoctl import _rustbpe

        if vocab_size < MIN_VOCAB_SIZE:
            raise NanoctlError(
                f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)",
                f"pass --vocab-size {MIN_VOCAB_SIZE} or more (nanochat uses 32768)",
            )
        rust = _rustbpe.Tokenizer()
        rust.train_from_iterator(
            iter(texts),
            vocab_size - len(SPECIAL_TOKENS),
            buffer_size=buffer_size,
            pattern=pattern,
            progress=progress,
        )
        ranks = {bytes(b): r for b, r in rust.get_mergeable_ranks()}
        # Distinct merges always give distinct byte strings; a collision would shift every id after it.
        assert len(ranks) == rust.vocab_size, "duplicate token bytes in trained ranks"
        offset = len(ranks)
        special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        import tiktoken

        enc = tiktoken.Encoding(
            name="rustbpe", pat_str=rust.get_pattern(), mergeable_ranks=ranks, special_tokens=special
        )
        tok = cls(enc, "<|bos|>")
        tok.train_stats = dict(rust.train_stats())
        return tok

    @classmethod
    def from_directory(cls, tokenizer_dir: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.pkl` from a nanoctl or nanochat tokenizer directory."""
        import tiktoken

        path = Path(tokenizer_dir) / PICKLE_NAME
        hf_path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.exists() and hf_path.is_file():  # no pickle needed: rebuild from the HF tokenizer.json
            from nanoctl.tokenizer_json import encoding_from_tokenizer_json

            return cls(encoding_from_tokenizer_json(hf_path), "<|bos|>")
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except FileNotFoundError:
            raise NanoctlError(f"no tokenizer at {path}", "run `nanoctl tok train` first") from None
        except OSError as e:
            raise NanoctlError(f"cannot read {path} ({e.strerror})", "check the file's permissions") from None
        except Exception as e:  # truncated / not a pickle / wrong classes
            raise NanoctlError(
                f"{path} is not a valid tokenizer pickle ({type(e).__name__}: {e})",
                "delete it and run `nanoctl tok train`",
            ) from None
        if not isinstance(enc, tiktoken.Encoding):
            raise NanoctlError(
                f"{path} holds a {type(enc).__name__}, expected a pickled tiktoken.Encoding",
                "delete it and run `nanoctl tok train`",
            )
        if "<|bos|>" not in enc._special_tokens:
            raise NanoctlError(f"{path} has no <|bos|> special token", "retrain it with `nanoctl tok train`")
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> Tokenizer:
        """A tiktoken named encoding (gpt2, cl100k_base) with <|endoftext|> as BOS, for comparisons."""
        import tiktoken

        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    # -- vocabulary ---------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return self.enc.special_tokens_set

    def get_pattern(self) -> str:
        return self.enc._pat_str

    def get_mergeable_ranks(self) -> dict[bytes, int]:
        return self.enc._mergeable_ranks

    def id_to_token(self, id: int) -> str:
        return self.enc.decode([id])

    @lru_cache(maxsize=32)  # noqa: B019 (few tokenizers live per process; nanochat does the same)
    def encode_special(self, text: str) -> int:
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def token_bytes(self) -> list[int]:
        """Byte length of each id (0 for special tokens), from the raw bytes of each token.

        `decode_single_token_bytes`, not `decode`: tokens that are not valid UTF-8 alone would
        otherwise count replacement characters (nanochat issue #693).
        """
        special = set(self.enc._special_tokens.values())
        return [
            0 if i in special else len(self.enc.decode_single_token_bytes(i))
            for i in range(self.get_vocab_size())
        ]

    # -- encode / decode ----------------------------------------------------------------------------

    def _special_id(self, tok: int | str) -> int:
        return tok if isinstance(tok, int) else self.encode_special(tok)

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode a string (-> ids) or a list of strings (-> list of ids), special tokens as text.

        `prepend`/`append` add a token id or special-token name to each sequence.
        """
        pre = self._special_id(prepend) if prepend is not None else None
        post = self._special_id(append) if append is not None else None
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            for row in rows:
                if pre is not None:
                    row.insert(0, pre)
                if post is not None:
                    row.append(post)
            return rows
        raise TypeError(f"encode() takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    # -- chat rendering -----------------------------------------------------------------------------

    def render_conversation(
        self, conversation: dict[str, Any], max_tokens: int = 2048
    ) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = the assistant's tokens to train on) for one conversation.

        nanochat's rules: a leading system message is merged into the first user message; roles
        alternate user/assistant; BOS, user turns, <|assistant_start|> and python outputs are mask 0;
        assistant text, tool calls and <|assistant_end|> are mask 1. Truncated to `max_tokens`.
        """
        ids: list[int] = []
        mask: list[int] = []

        def add(token_ids: int | list[int], mask_val: int) -> None:
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([mask_val] * len(token_ids))

        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ConversationError(
                "conversation has no messages (expected {'messages': [...]} with at least one)"
            )
        if messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ConversationError("a system message must be followed by a user message")
            merged = copy.deepcopy(messages[1])
            merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [merged, *messages[2:]]

        user_start, user_end = self.encode_special("<|user_start|>"), self.encode_special("<|user_end|>")
        assistant_start = self.encode_special("<|assistant_start|>")
        assistant_end = self.encode_special("<|assistant_end|>")
        python_start, python_end = (
            self.encode_special("<|python_start|>"),
            self.encode_special("<|python_end|>"),
        )
        output_start, output_end = (
            self.encode_special("<|output_start|>"),
            self.encode_special("<|output_end|>"),
        )

        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            role = message.get("role")
            if role != expected:
                raise ConversationError(f"message {i} is from {role!r} but should be from {expected!r}")
            content = message.get("content")
            if role == "user":
                if not isinstance(content, str):
                    raise ConversationError(f"message {i}: user content must be a string")
                add(user_start, 0)
                add(self.encode(content), 0)
                add(user_end, 0)
                continue
            add(assistant_start, 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind = part.get("type")
                    value = self.encode(part.get("text", ""))
                    if kind == "text":
                        add(value, 1)
                    elif kind == "python":
                        add(python_start, 1)
                        add(value, 1)
                        add(python_end, 1)
                    elif kind == "python_output":
                        add(output_start, 0)
                        add(value, 0)
                        add(output_end, 0)
                    else:
                        raise ConversationError(f"message {i}: unknown part type {kind!r}")
            else:
                raise ConversationError(f"message {i}: content must be a string or a list of parts")
            add(assistant_end, 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict[str, Any]) -> list[int]:
        """The conversation minus its last (assistant) message, ending in <|assistant_start|>."""
        messages = list(conversation.get("messages") or [])
        if not messages or messages[-1].get("role") != "assistant":
            raise ConversationError("the last message must be from the assistant")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    # -- persistence --------------------------------------------------------------------------------

    def save(self, tokenizer_dir: str | os.PathLike[str]) -> None:
        """Write tokenizer.pkl, token_bytes.pt and tokenizer.json (HF fast tokenizer); all or nothing.

        Both files go to a temp directory beside the target, which then replaces the target, so an
        interrupted save leaves the previous tokenizer (or none), never a mix.
        """
        import torch

        target = Path(tokenizer_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the tokenizer dir is not secret
            with open(staging / PICKLE_NAME, "wb") as f:
                pickle.dump(self.enc, f)
                f.flush()
                os.fsync(f.fileno())
            with open(staging / TOKEN_BYTES_NAME, "wb") as f:
                torch.save(torch.tensor(self.token_bytes(), dtype=torch.int32), f)
                f.flush()
                os.fsync(f.fileno())
            from nanoctl.tokenizer_json import HF_TOKENIZER_NAME, tokenizer_json

            with open(staging / HF_TOKENIZER_NAME, "w", encoding="utf-8") as f:  # loadable without pickle
                f.write(tokenizer_json(self))
                f.flush()
                os.fsync(f.fileno())
            _swap_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _swap_dir(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, replacing a previous directory there."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    try:
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_tokenizer(home: Home | str | os.PathLike[str] | None = None) -> Tokenizer:
    """The home's tokenizer (`<home>/tokenizer/tokenizer.pkl`). An entry point: `home` is resolved here."""
    d = Home.resolve(home).tokenizer_dir
    if not (d / PICKLE_NAME).is_file() and not (d / "tokenizer.json").is_file():
        raise NanoctlError(f"no tokenizer in {d}", "run `nanoctl tok train` first")
    return Tokenizer.from_directory(d)


def load_token_bytes(
    home: Home | str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """int32 byte length per token id (0 for specials), for bits-per-byte.

    Computed from the tokenizer when `token_bytes.pt` is missing (e.g. a copied nanochat pickle).
    An entry point: `home` is resolved here.
    """
    import torch

    home = Home.resolve(home)
    d = home.tokenizer_dir
    path = d / TOKEN_BYTES_NAME
    if path.is_file():
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise NanoctlError(
                f"{path} is unreadable ({type(e).__name__})",
                f"delete it; it is rebuilt from {d / PICKLE_NAME}",
            ) from None
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise NanoctlError(
                f"{path} is not a 1-D tensor", f"delete it; it is rebuilt from {d / PICKLE_NAME}"
            )
        return t.to(device=device, dtype=torch.int32)
    tok = load_tokenizer(home)
    return torch.tensor(tok.token_bytes(), dtype=torch.int32, device=device)
