"""Reading the training text, the train/validation split, and batch sampling."""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .errors import UserError

VAL_FRACTION = 0.1


def builtin_sample_text() -> str:
    """A few KB of text written for this project, used when there is no train.txt."""
    return resources.files("randygpt").joinpath("sample_text.txt").read_text(encoding="utf-8")


def read_text(path: str) -> str:
    """Read a UTF-8 text file, or raise a UserError that says what is wrong with it."""
    if not os.path.exists(path):
        raise UserError(f"data file {path!r} does not exist; pass --data PATH to a UTF-8 text file")
    if os.path.isdir(path):
        raise UserError(f"data path {path!r} is a directory; pass --data PATH to a text file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise UserError(f"data file {path!r} is empty; give it some text to learn from")
    if b"\x00" in raw[:1 << 20]:
        raise UserError(f"data file {path!r} looks binary (it has NUL bytes); "
                        "randyGPT trains on UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path!r} is not valid UTF-8 (bad byte at offset {e.start}); "
                        "convert it to UTF-8 first") from None


@dataclass
class Split:
    train: np.ndarray   # token ids, int32
    val: np.ndarray


def split_tokens(tokens: np.ndarray, block_size: int, source: str = "the text") -> Split:
    """First 90 % for training, last 10 % for validation; each needs a whole window."""
    n_val = int(len(tokens) * VAL_FRACTION)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = block_size + 1
    if len(val) < need:
        raise UserError(
            f"{source} is too short: {len(tokens)} tokens gives a validation split of {len(val)}, "
            f"but a window needs block_size+1 = {need}; use more text (at least "
            f"{need * 10} tokens) or a smaller --block")
    return Split(train, val)


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, rng):
    """Random windows of block_size+1 tokens: inputs x (B, T) and next-token targets y (B, T)."""
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    window = starts[:, None] + np.arange(block_size + 1)              # (B, T+1) gather indices
    chunk = tokens[window]
    return chunk[:, :-1].astype(np.int64), chunk[:, 1:].astype(np.int64)
