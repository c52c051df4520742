"""Tokenizers. Every tokenizer has the same small interface:

    encode(text) -> np.ndarray[int32]     decode(ids) -> str
    vocab_size, bos_id, eos_id            to_dict() / tokenizer_from_dict(d)  (for checkpoints)
"""
from __future__ import annotations

import numpy as np

from .errors import UserError

MAX_CHAR_VOCAB = 512


class CharTokenizer:
    """One id per distinct character of the training text (sorted), then BOS and EOS."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        if len(self.chars) + 2 > MAX_CHAR_VOCAB:
            raise UserError(
                f"the text has {len(self.chars)} distinct characters; the char tokenizer takes at "
                f"most {MAX_CHAR_VOCAB - 2}: use a BPE tokenizer (--bpe) for this text")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.bos_id = len(self.chars)
        self.eos_id = len(self.chars) + 1
        # a lookup table over code points makes encoding a vectorised gather, not a dict loop
        self._table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int32)
        for c, i in self.stoi.items():
            self._table[ord(c)] = i

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        inside = codes < len(self._table)
        ids = np.full(codes.shape, -1, dtype=np.int32)
        ids[inside] = self._table[codes[inside]]
        if (ids < 0).any():
            unknown = self.unknown_chars(text)
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserError(f"the text has {len(unknown)} character(s) the tokenizer does not "
                            f"know: {shown}; remove them or train a tokenizer that covers them")
        return ids

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in np.asarray(ids).tolist() if 0 <= i < n)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def tokenizer_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    raise UserError(f"unknown tokenizer kind {kind!r}")
