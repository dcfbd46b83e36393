"""SpellingBee ("how many r in strawberry") and SimpleSpelling, generated from an English word list.

Examples are built on the fly from dwyl's words_alpha.txt (370K words): example i is seeded by i (train) or
10,000,000 + i (test), so a split is a fixed, reproducible set. SpellingBee's answer spells the word, counts
by hand, double-checks with a python `'word'.count('x')` call, and ends with `#### N` (scored like GSM8K).
The word list comes from `--words FILE`, a data dir (`words/words_alpha.txt`), `<home>/data/tasks/`, or
`<home>/words_alpha.txt` (where nanochat downloads it).
"""

from __future__ import annotations

import os
import random
import string
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.tasks.common import Conversation, Task, extract_answer, find_local

LETTERS = string.ascii_lowercase
TEST_SEED_OFFSET = 10_000_000  # above the word count, so train and test seeds never collide
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORDS_CANDIDATES = ("words/words_alpha.txt", "words_alpha.txt")

# nanochat's user-message templates (data augmentation across phrasings and languages).
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    # Chinese (Simplified)
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]

_WORDS_CACHE: dict[Path, list[str]] = {}


def load_words(
    words: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    home: Home | None = None,
) -> list[str]:
    """The word list, one word a line (CRLF tolerated); cached per path."""
    path = Path(words).expanduser() if words else find_local(WORDS_CANDIDATES, data_dir, home)
    if path is None and home is not None:
        legacy = home.root / "words_alpha.txt"
        path = legacy if legacy.exists() else None
    if path is None or not path.is_file():
        raise NanoctlError(
            f"word list for SpellingBee not found{f' at {path}' if words else ''} (words_alpha.txt)",
            f"pass --data-dir DIR holding words/words_alpha.txt (download it from {WORD_LIST_URL})",
        )
    if path not in _WORDS_CACHE:
        with open(path, encoding="utf-8") as f:
            _WORDS_CACHE[path] = [w for w in (line.strip() for line in f) if w]
    return _WORDS_CACHE[path]


class _WordTask(Task):
    eval_type = "generative"

    def __init__(
        self,
        size: int = 1000,
        split: str = "train",
        *,
        words: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: Home | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise UsageError(f"{self.name} split must be train|test, got {split!r}")
        if size < 0:
            raise UsageError(f"{self.name} size must be >= 0, got {size}")
        self.size, self.split = size, split
        self.words = load_words(words, data_dir, home)
        self.source = f"generated from {len(self.words):,} words"

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


class SpellingBee(_WordTask):
    name = "SpellingBee"

    def get_example(self, index: int) -> Conversation:
        rng = self._rng(index)
        word = rng.choice(self.words)
        # a letter from the word 90% of the time, else any letter (so 0 is a possible answer)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:  # lazy typists
            template = template.lower()
        quotes = ["", "'", '"']
        lq = rng.choice(quotes)
        wq = rng.choice(quotes)
        user_msg = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            user_msg += "?"
        manual = (
            f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{word}:{','.join(word)}\n\n"
            f"Then count the occurrences of '{letter}':\n"
        )
        running = 0
        for i, ch in enumerate(word, 1):
            if ch == letter:
                running += 1
                manual += (
                    f"{i}:{ch} hit! count={running}\n"  # no space before ch: " a" and "a" differ as tokens
                )
            else:
                manual += f"{i}:{ch}\n"
        manual += f"\nThis gives us {running}."
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": user_msg}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        ref = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return ref is not None and extract_answer(response) == ref


class SimpleSpelling(_WordTask):
    """Just spell a word: the condensed hard part of SpellingBee."""

    name = "SimpleSpelling"

    def __init__(self, size: int = 1000, split: str = "train", **kwargs: Any) -> None:
        super().__init__(size, split, **kwargs)
        words = list(self.words)
        random.Random(42).shuffle(words)  # a different word order than SpellingBee
        self.words = words

    def get_example(self, index: int) -> Conversation:
        word = self._rng(index).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ]
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]
