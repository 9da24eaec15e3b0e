"""
Synthetic spelling tasks: SpellingBee counts a letter in a word (manual spelling, then a
python `.count` check, answer after '#### '), SimpleSpelling spells a word letter by letter.
Example i is generated from random.Random(i) (train) or random.Random(10_000_000 + i) (test).
"""

import os
import functools
import random

from nanochat.common import get_base_dir, get_data_dir, download_file_with_lock
from nanochat.files import InputFileError, open_regular
from tasks.common import Task
from tasks.gsm8k import GSM8K

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEST_SEED_OFFSET = 10_000_000

# 51 templates; the order matters for exact reproduction (rng.choice indexes into it)
TEMPLATES = [
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
    # Chinese
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
assert len(TEMPLATES) == 51

def words_path():
    """$NANOCHAT_DATA_DIR/words_alpha.txt if present, else $BASE/words_alpha.txt (downloaded once)."""
    data_dir = get_data_dir()
    if data_dir and os.path.exists(os.path.join(data_dir, "words_alpha.txt")):
        return os.path.join(data_dir, "words_alpha.txt")
    path = os.path.join(get_base_dir(), "words_alpha.txt")
    try:
        return download_file_with_lock(WORDS_URL, path)
    except OSError as e:
        raise RuntimeError(f"word list missing and its download failed ({e}): put words_alpha.txt (one lowercase "
                           f"word per line) in NANOCHAT_DATA_DIR or at {path}, or download {WORDS_URL}") from e


def load_words():
    return _read_words(words_path())


@functools.lru_cache(maxsize=None)  # several tasks share one read of the 4 MB file (cache_clear() resets it)
def _read_words(path):
    fix = "put words_alpha.txt (one lowercase word per line, UTF-8) there, or delete it to download it again"
    with open_regular(path, fix, 256 << 20, "word list") as f:
        try:
            words = [w for w in (line.decode("utf-8").strip() for line in f) if w]
        except UnicodeDecodeError as e:
            raise InputFileError(f"{path}: not UTF-8 text ({e.reason}); {fix}") from None
    if not words:
        raise InputFileError(f"{path} holds no words; {fix}")
    return words


class _SpellingTask(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def rng_for(self, index):
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


class SpellingBee(_SpellingTask):

    def get_example(self, index):
        rng = self.rng_for(index)
        # the draws below happen in a fixed order; changing it changes every example
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote = rng.choice(["", "'", '"'])
        word_quote = rng.choice(["", "'", '"'])
        user = template.format(letter=letter_quote + letter + letter_quote, word=word_quote + word + word_quote)
        if rng.random() < 0.5:
            user += "?"

        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first."
                  f"\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of '{letter}':\n")
        running = 0
        for i, c in enumerate(word, 1):
            if c == letter:
                running += 1
                manual += f"{i}:{c} hit! count={running}\n"  # no space after "i:" (it would change the token)
            else:
                manual += f"{i}:{c}\n"
        manual += f"\nThis gives us {running}."
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}

    evaluate = GSM8K.evaluate  # the same check: the number after "#### " matches the reference's


class SimpleSpelling(_SpellingTask):
    """Training only: 'Spell the word: w' -> 'w:a,b,c'."""

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = list(self.words)
        random.Random(42).shuffle(self.words)  # a different word order from SpellingBee

    def get_example(self, index):
        word = self.rng_for(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}
