"""A WordPiece tokenizer fitted on the training split: no download, no external vocabulary.

Vocabulary: `[PAD]`, `[UNK]`, every word seen at least `min_count` times in the training
notes (and, given the notes' patients, in the notes of at least `min_patients` distinct ones, so
that a name or a rare detail of a few patients is not stored with the model), then every single
character seen, both as a word start and as a `##` continuation, so any word made of seen
characters (typos included) encodes without `[UNK]`. Encoding is BERT's
greedy longest-match-first WordPiece over lowercased words and punctuation.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD, UNK = 0, 1
_SPECIALS = ("[PAD]", "[UNK]")
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


class WordPieceTokenizer:
    def __init__(self, vocab: Sequence[str]):
        if tuple(vocab[: len(_SPECIALS)]) != _SPECIALS:
            raise ValueError(f"vocabulary must start with {_SPECIALS}, got {tuple(vocab[:2])}")
        self.vocab = tuple(vocab)
        self._ids = {piece: i for i, piece in enumerate(self.vocab)}
        self._max_piece = max(len(p) for p in self.vocab)
        self._cache: dict[str, tuple[int, ...]] = {}  # word -> ids; notes reuse few words

    def __getstate__(self):  # pickled into Grain workers: send the vocabulary, not the cache
        return {"vocab": self.vocab}

    def __setstate__(self, state):
        self.__init__(state["vocab"])

    @classmethod
    def fit(cls, texts: Sequence[str], min_count: int = 3, max_words: int = 8000, *,
            patients: Sequence | None = None, min_patients: int = 1) -> WordPieceTokenizer:
        """`patients[i]` is the patient of `texts[i]`; without it every text counts as its own patient."""
        keys = list(patients) if patients is not None else range(len(texts))
        counts, patient_counts, chars = collections.Counter(), collections.Counter(), set()
        # one patient's notes at a time: memory holds one patient's words, not every patient's
        for _, group in itertools.groupby(sorted(range(len(texts)), key=keys.__getitem__), key=keys.__getitem__):
            words_of_patient = set()
            for i in group:
                words = split_words(texts[i])
                counts.update(words)
                words_of_patient.update(words)
            patient_counts.update(words_of_patient)
            for w in words_of_patient:
                chars.update(w)
        words = sorted((w for w, c in counts.items() if c >= min_count and patient_counts[w] >= min_patients),
                       key=lambda w: (-counts[w], w))
        chars = sorted(chars)
        pieces = words[:max_words] + chars + ["##" + c for c in chars]
        return cls(list(_SPECIALS) + list(dict.fromkeys(pieces)))

    def __len__(self) -> int:
        return len(self.vocab)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        ids, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self._max_piece), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._ids:
                    ids.append(self._ids[piece])
                    start = end
                    break
            else:
                return (UNK,)  # BERT's rule: a word that cannot be split is one [UNK]
        return tuple(ids)

    def tokenize(self, text: str) -> list[int]:
        out = []
        for w in split_words(text):
            ids = self._cache.get(w)
            if ids is None:
                ids = self._encode_word(w)
                if len(self._cache) < 200_000:
                    self._cache[w] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Returns (ids i32[max_length], mask bool[max_length], length before truncation)."""
        tokens = self.tokenize(text)
        ids = np.zeros(max_length, np.int32)
        kept = tokens[:max_length]
        ids[: len(kept)] = kept
        return ids, ids != PAD, len(tokens)

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            if i == PAD:
                continue
            piece = self.vocab[i]
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        return " ".join(words)
