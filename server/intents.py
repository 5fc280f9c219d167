"""The intent classifier behind the `enclave harmful intent` rail, trained offline by
scripts/train_intents.py and kept as data in a rails directory
(rails/intents/classifier.npz). No pickles: the file holds arrays only and is read with
allow_pickle=False.

One multinomial linear model reads the sentence embedding (what the message means, however
it is worded) and hashed word and character n-grams (the tell-tale wording of jailbreaks,
encodings and suffixes, which a sentence embedding smooths away). P(harmful) is
1 - P(benign); the intent it names (fraud, intrusion, malware, phishing, violence,
personal data, extraction, injection, jailbreak…) is the most likely harmful label, the
reason in the audit row. The data rails' classifier is the same kind with two labels.

A message is judged as a reader sees it (`normalise`: homoglyphs, hidden tag characters),
in windows of WINDOW_WORDS words: its start and, when longer, its end
(where an adversarial suffix or a planted instruction sits); the verdict is the worst
window. The sentence model reads the first 256 word pieces of each, so a long jailbreak is
judged on both ends and a short message on all of it: short messages are judged like long
ones.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

BENIGN = "benign"
INSTRUCTION = "instruction"  # the data classifier's other label: a sentence addressed to the model
WINDOW_WORDS = 160
HASH_FEATURES = 2**14
NGRAM_WEIGHT = 0.7  # the n-gram blocks' scale beside the unit-length embedding


# Sentence ends: punctuation followed by whitespace (not the dot in "example.com"), or a
# line break. The separators are kept, so text split and joined keeps its layout.
SENTENCE_BREAK = re.compile(r"((?<=[.!?])\s+|\n+)")


def sentences(text: str) -> list[str]:
    """The sentences of a text, as the data rails judge them (separators dropped)."""
    return [s for s in SENTENCE_BREAK.split(text)[::2] if s.strip()]


# Letters that look Latin but are not (Cyrillic and Greek homoglyphs): an attack spelled
# with them reads the same to a person and differently to every rule.
_HOMOGLYPHS = str.maketrans(
    "АВЕКМНОРСТХУаеорсухіјѕԁɡɑıοΑΒΕΖΗΙΚΜΝΟΡΤΥΧνρτ",
    "ABEKMHOPCTXYaeopcyxijsdgaioABEZHIKMNOPTYXvpt",
)


def invisible(ch: str) -> bool:
    """A character a reader does not see: a format character (zero-width spaces and
    joiners, bidi controls, invisible operators, tag characters) or a variation selector."""
    o = ord(ch)
    return unicodedata.category(ch) == "Cf" or 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF


@cache
def _invisible_runs() -> re.Pattern:
    # The characters of `invisible` as one regex class, so a long message is scanned in C.
    # Format characters are assigned in the first two planes and in plane 14 (tags and
    # variation selectors); built once, in about 30 ms.
    points = [o for o in (*range(0x20000), *range(0xE0000, 0xE1000)) if not 0xD800 <= o <= 0xDFFF and invisible(chr(o))]
    ranges: list[list[int]] = []
    for o in points:  # consecutive code points as one range: the class stays small
        if ranges and ranges[-1][1] == o - 1:
            ranges[-1][1] = o
        else:
            ranges.append([o, o])
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]+")


def longest_invisible_run(text: str) -> int:
    """The most invisible characters in a row: emoji use a few between visible ones (a
    flag, a skin tone); a long run is text smuggled past the reader, in whatever code."""
    if text.isascii():  # most messages: no invisible character is ASCII
        return 0
    return max((len(m.group()) for m in _invisible_runs().finditer(text)), default=0)


def normalise(text: str) -> str:
    """The text as a reader sees it: compatibility forms folded (NFKC: full-width and
    styled letters), homoglyphs in words that mix scripts mapped to Latin, invisible Unicode
    tag characters and supplementary variation selectors decoded to the ASCII they hide,
    other invisible characters (zero-width, variation selectors) and markdown heading
    and quote markers dropped."""
    out = []
    for ch in unicodedata.normalize("NFKC", text):
        o = ord(ch)
        if 0xE0020 <= o <= 0xE007E:  # tag characters: a hidden copy of ASCII
            out.append(chr(o - 0xE0000))
        elif 0xE0120 <= o <= 0xE017E:  # variation selectors 17+ used the same way
            out.append(chr(o - 0xE0100))
        elif invisible(ch):
            continue
        else:
            out.append(ch)
    return _LATIN_WORD.sub(_unmix, _MARKUP.sub("", "".join(out)))


# Markdown heading and quote markers at the start of a line, which a reader of the
# rendered text does not see: "# Returns" is judged as the title "Returns".
_MARKUP = re.compile(r"(?m)^[ \t]*(#{1,6}|>)[ \t]+")


_LATIN_WORD = re.compile(r"\w+")


def _unmix(m: re.Match) -> str:
    # Only a word that mixes scripts is mapped: Russian or Greek written as such stays.
    word = m.group()
    latin = any("a" <= c.lower() <= "z" for c in word)
    return word.translate(_HOMOGLYPHS) if latin and word.translate(_HOMOGLYPHS) != word else word


def windows(text: str) -> list[str]:
    words = normalise(text).split()
    if len(words) <= WINDOW_WORDS:
        return [" ".join(words)] if words else []
    return [" ".join(words[:WINDOW_WORDS]), " ".join(words[-WINDOW_WORDS:])]


@cache
def _vectorizers() -> tuple:
    # Stateless (hashing): nothing to fit, so training and serving see the same features.
    from sklearn.feature_extraction.text import HashingVectorizer

    words = HashingVectorizer(n_features=HASH_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm="l2")
    chars = HashingVectorizer(n_features=HASH_FEATURES, analyzer="char_wb", ngram_range=(3, 4), alternate_sign=False, norm="l2")
    return words, chars


def features(vectors: np.ndarray, texts: list[str]):
    """The verdict model's features: [embedding | word 1-2-grams | char 3-4-grams]."""
    from scipy.sparse import csr_matrix, hstack

    words, chars = _vectorizers()
    return hstack([csr_matrix(vectors), words.transform(texts) * NGRAM_WEIGHT, chars.transform(texts) * NGRAM_WEIGHT]).tocsr()


@dataclass(frozen=True)
class IntentScore:
    intent: str  # the most likely harmful intent
    p_harmful: float  # 1 - P(benign), in the worst window


class IntentClassifier:
    """A multinomial linear model over `features`: P(label) for benign and each harmful
    intent; P(harmful) = 1 - P(benign)."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, labels: list[str], embedding_model: str, trained_on: str = ""):
        if BENIGN not in labels or len(labels) != len(coef):
            raise ValueError("the intent classifier needs one row per label, 'benign' among them")
        self.coef = np.asarray(coef, dtype=np.float32)
        self.intercept = np.asarray(intercept, dtype=np.float32)
        self.labels = labels
        self.embedding_model = embedding_model
        # The SHA-256 of the training pairs (evals/redteam/training.digest): a test checks
        # that the shipped file was trained on the data the repository holds.
        self.trained_on = trained_on
        self._benign = labels.index(BENIGN)

    @classmethod
    def load(cls, path: Path) -> IntentClassifier:
        with np.load(path, allow_pickle=False) as d:
            trained_on = str(d["trained_on"]) if "trained_on" in d.files else ""
            return cls(d["coef"], d["intercept"], [str(x) for x in d["labels"]], str(d["embedding_model"]), trained_on)

    def save(self, path: Path) -> None:
        # float16 weights: a quarter of the size, the same verdicts to the third decimal.
        np.savez_compressed(
            path,
            coef=self.coef.astype(np.float16),
            intercept=self.intercept,
            labels=np.array(self.labels),
            embedding_model=np.array(self.embedding_model),
            trained_on=np.array(self.trained_on),
        )

    def probabilities(self, vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        logits = np.asarray(features(vectors, texts) @ self.coef.T) + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def harmful(self, vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        return 1.0 - self.probabilities(vectors, texts)[:, self._benign]

    def score(self, vectors: np.ndarray, texts: list[str]) -> IntentScore:
        """The verdict on one message from its windows (texts) and their vectors."""
        probs = self.probabilities(vectors, texts)
        w = int(np.argmin(probs[:, self._benign]))
        others = probs[w].copy()
        others[self._benign] = -1.0
        return IntentScore(self.labels[int(np.argmax(others))], float(1.0 - probs[w, self._benign]))
