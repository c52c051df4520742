"""Turning a model into text: sampling rules, a sliding KV-cache window, stop strings, streaming.

    prompt -> ids -> Decoder (prefill, then one decode_step per token) -> logits
           -> sample_token (temperature -> top-k -> top-p -> draw) -> id
           -> Detokenizer (id -> text piece) -> StopFilter (hold back a possible stop string)
           -> the caller (the CLI writes each piece to stdout and flushes)

Everything here is plain NumPy on single vectors, and imports nothing heavy, so that
`randygpt generate` reaches its first token quickly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

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
            raise UserError(f"--temperature {self.temperature} must be a number >= 0 "
                            "(0 means greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1] (1 turns it off)")


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


# --------------------------------------------------------------------------------------------
# The context window over a KV cache

class Decoder:
    """Next-token logits for a growing text, through the model's KV cache.

    The window is the run of most recent tokens the cache holds, at positions 0..n-1. It grows
    by one token per `feed` until it holds block_size tokens. The token after that does not
    fit, and because positions are absolute (learned wpe), the cached keys and values cannot
    simply be shifted down: the window restarts as the last `keep` tokens plus the new one,
    rebuilt with one prefill. With keep = block_size - 1 every prediction sees exactly the last
    block_size tokens, as a full forward pass does (nanoGPT's `idx[:, -block_size:]`), but once
    the text outgrows the block every token costs a prefill. The default keep = block_size // 2
    prefills once every block_size // 2 tokens; each prediction then sees between keep + 1 and
    block_size tokens of context. Either way each logit equals a full forward pass over
    `self.window` (tested).
    """

    def __init__(self, model, keep: int | None = None):
        self.model = model
        self.block_size = model.cfg.block_size
        self.keep = self.block_size // 2 if keep is None else int(keep)
        if not 0 <= self.keep < self.block_size:
            raise ValueError(f"keep must be in [0, {self.block_size - 1}], got {keep}")
        self.cache = model.new_kv_cache()
        self.window: list[int] = []
        self.rebuilds = 0            # prefills after the first (window slides)

    def start(self, ids) -> np.ndarray:
        """Prefill the last block_size of ids; logits (V,) for the token after them."""
        ids = [int(i) for i in ids][-self.block_size:]
        if not ids:
            raise ValueError("start() needs at least one token (use BOS for an empty prompt)")
        self.window = ids
        return self.model.prefill(ids, self.cache)[-1]

    def feed(self, token: int) -> np.ndarray:
        """Append one token; logits (V,) for the token after it."""
        token = int(token)
        if len(self.window) < self.block_size:
            self.window.append(token)
            return self.model.decode_step(token, self.cache)
        self.window = self.window[len(self.window) - self.keep:] + [token]
        self.rebuilds += 1
        return self.model.prefill(self.window, self.cache)[-1]


def generate_ids(model, prompt_ids, max_tokens: int, sampling: SamplingConfig, rng,
                 stop_id: int | None = None, keep: int | None = None) -> Iterator[int]:
    """Yield up to max_tokens new ids after prompt_ids; stop before yielding stop_id."""
    if max_tokens < 1:
        return
    decoder = Decoder(model, keep)
    logits = decoder.start(prompt_ids)
    for i in range(max_tokens):
        token = sample_token(logits, sampling, rng)
        if token == stop_id:
            return
        yield token
        if i + 1 < max_tokens:
            logits = decoder.feed(token)


def generate_uncached(model, prompt_ids, max_tokens: int, sampling: SamplingConfig, rng,
                      stop_id: int | None = None) -> list[int]:
    """The reference without a cache (nanoGPT style): a full forward pass over the last
    block_size tokens for every new token. `generate_ids(..., keep=block_size - 1)` gives the
    same tokens; the benchmark uses this as its baseline."""
    ids, new = [int(i) for i in prompt_ids], []
    for _ in range(max_tokens):
        logits, _ = model.forward(np.asarray(ids[-model.cfg.block_size:])[None, :])
        token = sample_token(logits[0, -1], sampling, rng)
        if token == stop_id:
            break
        ids.append(token)
        new.append(token)
    return new


def generate_simple(model, prompt_ids, max_new_tokens: int, rng, temperature: float = 1.0,
                    stop_id: int | None = None) -> list[int]:
    """Temperature sampling through the KV cache; only the new ids (train.py's end sample)."""
    return list(generate_ids(model, prompt_ids, max_new_tokens,
                             SamplingConfig(temperature=temperature), rng, stop_id))


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

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt is [BOS]. Unknown characters are a UserError."""
    if not prompt:
        return [tokenizer.bos_id]
    unknown = tokenizer.unknown_chars(prompt) if hasattr(tokenizer, "unknown_chars") else []
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UserError(f"the prompt has {len(unknown)} character(s) this model's tokenizer "
                        f"does not know: {shown}; use only characters of its training text")
    return [int(i) for i in tokenizer.encode(prompt)]


def stream_text(model, tokenizer, prompt: str = "", max_tokens: int = 200,
                sampling: SamplingConfig | None = None, stop=(), rng=None,
                keep: int | None = None) -> Iterator[str]:
    """An iterator over the completion of `prompt`, piece by piece (not the prompt itself).

    Generation ends at EOS, after max_tokens tokens, or at the first of the `stop` strings
    (matched in the completion only, and not output). rng: a numpy Generator (the seed).
    """
    sampling = sampling or SamplingConfig()
    sampling.validate()
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens} must be at least 1")
    if any(s == "" for s in stop):
        raise UserError("a --stop string is empty; give at least one character")
    rng = rng if rng is not None else np.random.default_rng()
    prompt_ids = encode_prompt(tokenizer, prompt)      # errors now, before any output
    return _stream(model, tokenizer, prompt_ids, max_tokens, sampling, stop, rng, keep)


def _stream(model, tokenizer, prompt_ids, max_tokens, sampling, stop, rng, keep):
    detok, stops = Detokenizer(tokenizer), StopFilter(stop)
    for token in generate_ids(model, prompt_ids, max_tokens, sampling, rng,
                              stop_id=tokenizer.eos_id, keep=keep):
        out = stops.push(detok.push(token))
        if out:
            yield out
        if stops.stopped:
            return
    out = stops.push(detok.flush())
    out += "" if stops.stopped else stops.flush()
    if out:
        yield out


def generate_text(model, tokenizer, prompt: str = "", **kwargs) -> str:
    """The whole completion as one string (see stream_text for the arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, **kwargs))
