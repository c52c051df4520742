"""The rules that turn logits into text: sampling, detokenizing, stop strings, prompts.

    logits -> sample_token (temperature -> top-k -> top-p -> draw) -> id
              (sample_tokens: the same for many streams' rows at once)
           -> Detokenizer (id -> text piece) -> StopFilter (hold back a possible stop string)

session.py runs the model and applies these per stream. Everything here is plain NumPy on
single vectors, and imports nothing heavy, so that `randygpt generate` starts quickly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError


# --------------------------------------------------------------------------------------------
# Sampling rules

@dataclass
class SamplingConfig:
    temperature: float = 1.0   # 0 = greedy (argmax)
    top_k: int = 0             # keep the k most likely tokens (0 = off)
    top_p: float = 1.0         # keep the smallest set of tokens with this much mass (1 = off)

    def validate(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0
                and math.isfinite(self.temperature)):
            raise UserError(f"{{field}} {self.temperature} must be a number >= 0 "
                            "(0 means greedy)", "temperature")
        if self.top_k < 0:
            raise UserError(f"{{field}} {self.top_k} must be >= 0 (0 turns it off)", "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"{{field}} {self.top_p} must be in (0, 1] (1 turns it off)",
                            "top_p")


def sample_token(logits, sampling: SamplingConfig, rng) -> int:
    """One id from logits (V,): temperature, then top-k, then top-p on what is left, then a
    draw. Ties at the k-th logit are all kept (as nanoGPT does)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    z = np.multiply(logits, 1.0 / sampling.temperature, dtype=np.float64)    # (V,)
    V, k = z.shape[0], sampling.top_k
    if 0 < k < V:
        kth = np.partition(z, V - k)[V - k]                                   # k-th largest
        z[z < kth] = -np.inf
    probs = np.exp(z - z.max())                                               # unnormalised
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass = np.cumsum(probs[order])
        n_keep = int(np.searchsorted(mass, sampling.top_p * mass[-1])) + 1    # first with >= p
        probs[order[n_keep:]] = 0.0
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return i if i < V else int(np.flatnonzero(probs)[-1])                    # u rounded up to 1


def sample_tokens(logits, samplings, rngs) -> list[int]:
    """sample_token for each of S rows of logits (V,), each with its own settings and generator,
    as whole-array operations: the same float64 operations in the same order on each row
    (an exact sort gives the k-th largest; a count of the sums below a bound is searchsorted),
    so the ids are those of sample_token row by row (tested), without ~40 us of NumPy calls
    per stream and step."""
    if len(logits) < 4:                # fewer rows: sample_token's calls cost less (~20 us)
        return [sample_token(row, c, rng) for row, c, rng in zip(logits, samplings, rngs)]
    logits = np.stack(logits)                                                 # (S, V)
    S, V = logits.shape
    ids = logits.argmax(axis=1)                                               # greedy rows
    temperature = np.array([s.temperature for s in samplings], dtype=np.float64)
    rows = np.flatnonzero(temperature != 0)
    if not len(rows):
        return ids.tolist()
    z = np.multiply(logits[rows], (1.0 / temperature[rows])[:, None], dtype=np.float64)
    k = np.array([samplings[r].top_k for r in rows])
    cut = np.flatnonzero((0 < k) & (k < V))
    if len(cut):
        kth = np.sort(z[cut], axis=1)[np.arange(len(cut)), V - k[cut]]        # k-th largest
        kept = z[cut]
        z[cut] = np.where(kept < kth[:, None], -np.inf, kept)
    probs = np.exp(z - z.max(axis=1, keepdims=True))                          # unnormalised
    top_p = np.array([samplings[r].top_p for r in rows])
    nucleus = np.flatnonzero(top_p < 1.0)
    if len(nucleus):
        p = probs[nucleus]
        order = np.argsort(-p, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
        n_keep = (mass < (top_p[nucleus] * mass[:, -1])[:, None]).sum(axis=1) + 1
        drop = np.arange(V) >= n_keep[:, None]                  # ranks past the nucleus
        p[np.nonzero(drop)[0], order[drop]] = 0.0
        probs[nucleus] = p
    cdf = np.cumsum(probs, axis=1)
    u = np.array([rngs[r].random() for r in rows]) * cdf[:, -1]
    drawn = (cdf <= u[:, None]).sum(axis=1)                   # searchsorted(side="right")
    for j in np.flatnonzero(drawn >= V):                      # u rounded up to 1
        drawn[j] = np.flatnonzero(probs[j])[-1]
    ids[rows] = drawn
    return ids.tolist()


# --------------------------------------------------------------------------------------------
# Ids to text, a piece at a time

class Detokenizer:
    """Text for each new id. A char tokenizer maps one id to one character; any other
    tokenizer is decoded over a short run of recent ids, and text is released only when it no
    longer ends in an incomplete UTF-8 sequence (U+FFFD), so multi-byte characters split
    across tokens come out whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chars = tokenizer.chars if getattr(tokenizer, "kind", None) == "char" else None
        self.ids: list[int] = []
        self.prefix = self.read = 0      # ids[prefix:read] were decoded for context only

    def push(self, token: int) -> str:
        if self.chars is not None:
            return self.chars[token] if token < len(self.chars) else ""      # BOS/EOS: no text
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        if self.chars is not None or self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]      # what is left, even if it ends mid-character


class StopFilter:
    """Cuts the generated text at the first stop string, which is not itself output.

    Text that could still turn out to be the beginning of a stop string (a suffix that is a
    prefix of one) is held back until the next pieces decide it, so a stop string that
    arrives over several tokens is never partly printed.
    """

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that is safe to output now."""
        if not self.stops:
            return piece
        text = self.pending + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.pending = True, ""
            return text[:min(found)]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop string after all."""
        out, self.pending = self.pending, ""
        return out


# --------------------------------------------------------------------------------------------
# Prompt in, text out

def encode_prompt(tokenizer, prompt: str, bos: bool = False) -> list[int]:
    """The prompt's ids; an empty prompt is [BOS]. `bos`: the prompt begins a new document
    (BOS first), as every training document does; without it the prompt continues text of
    unknown start. Unknown characters are a UserError."""
    if not prompt:
        return [tokenizer.bos_id]
    if bos:
        return [tokenizer.bos_id] + encode_prompt(tokenizer, prompt)
    unknown = tokenizer.unknown_chars(prompt) if hasattr(tokenizer, "unknown_chars") else []
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UserError(f"the prompt has {len(unknown)} character(s) this model's tokenizer "
                        f"does not know: {shown}; use only characters of its training text",
                        "prompt")
    return [int(i) for i in tokenizer.encode(prompt)]

