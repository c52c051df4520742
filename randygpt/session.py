"""Generation: one model, many streams decoded together, each with its own sampling.

    Session(model, tokenizer, streams=N)
      submit(prompt, max_tokens, sampling, stop, rng) -> stream id      (prefills the prompt)
      submit_all([{prompt: ..., ...}, ...]) -> stream ids         (all prompts in one call)
      step() -> [Event, ...]     one new token for every active stream: each samples from its
                                 own logits, then all of them are decoded in ONE batched step
    generate(model, tokenizer, prompt, ...) -> iterator of Events       (one stream)
    complete(model, tokenizer, prompt, ...) -> str                      (the whole text)
    score_tokens(model, ids, top_n) -> [TokenLogprob | None, ...]       (a text's own logprobs)

The weights are the model's own, shared by every stream; a stream owns only its row of the
KVCache, its window of token ids, its sampler state and its text filters. An Event carries
the token id, the text that token releases (a BPE token can end mid-character, and text
that may still become a stop string is held back) and, on a stream's last event, why it
ended: "stop" (end of document, or a stop string, which is not output) or "length". A
stream submitted with `logprobs=N` also gets, on each event with a token, that token's log
probability and the N likeliest tokens' under the model's own distribution (log-softmax of
the logits: before temperature, top-k and top-p, which only shape the draw).

Windows: positions are absolute (learned wpe), so when a stream's window holds block_size
tokens the next one does not fit; the window restarts as its last `keep` tokens plus the
new one, recomputed in the same decode call as the other streams' next tokens (rows at
positions 0..keep: GPT.decode). keep = block_size - 1 makes every prediction see exactly
the last block_size tokens, as a full forward pass does (nanoGPT's idx[:, -block_size:]);
the default keep = block_size // 2 restarts once every block_size // 2 tokens. Either way
each logit equals a full forward pass over the stream's window (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UserError
from .model import KVCache
from .sample import Detokenizer, SamplingConfig, StopFilter, encode_prompt, sample_tokens


@dataclass
class Event:
    stream: int
    token: int | None                 # the new token; None when the stream ends without one
    text: str                         # the text this event releases (may be "")
    finish_reason: str | None = None  # "stop" or "length" on the stream's last event
    logprob: "TokenLogprob | None" = None   # only for a stream submitted with logprobs=N


@dataclass
class TokenLogprob:
    logprob: float                    # log p(token | what came before)
    top: list                         # [(id, logprob), ...] the top_n likeliest, best first


def token_logprob(logits, token: int, top_n: int) -> TokenLogprob:
    """log-softmax of logits (V,) at `token`, and the top_n likeliest ids with theirs."""
    z = logits.astype(np.float64)
    lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))                  # (V,)
    top = np.argsort(-lp, kind="stable")[:top_n] if top_n else []
    return TokenLogprob(float(lp[token]), [(int(i), float(lp[i])) for i in top])


@dataclass
class _Stream:
    logits: np.ndarray                # (V,) for the next token
    max_tokens: int
    sampling: SamplingConfig
    rng: np.random.Generator
    detokenizer: Detokenizer
    stops: StopFilter
    logprobs: int | None = None       # top-N logprobs per token; None: none computed
    generated: int = 0
    tokens: list = field(default_factory=list)


class Session:
    def __init__(self, model, tokenizer, streams: int = 1, keep: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.block_size = model.cfg.block_size
        self.keep = self.block_size // 2 if keep is None else int(keep)
        if not 0 <= self.keep < self.block_size:
            raise ValueError(f"keep must be in [0, {self.block_size - 1}], got {keep}")
        self.cache = KVCache(model.cfg, streams, model.dtype, model.xp)
        self.active: dict[int, _Stream] = {}
        self._windows: dict[int, list] = {}   # stream -> its window of ids
        self.rebuilds = 0                 # prefills after a stream's first (windows slid)

    @property
    def free(self) -> int:
        return self.cache.streams - len(self.active)

    # ---- the window mechanics: logits for each stream's next token ----------------------
    def prefill(self, stream: int, ids) -> np.ndarray:
        """Start `stream` on the last block_size of ids; logits (V,) for the token after."""
        return self.prefill_all([stream], [ids])[0]

    def prefill_all(self, streams, id_lists) -> np.ndarray:
        """prefill for several streams in ONE decode call; logits (S, V), a row each."""
        windows = [[int(i) for i in ids][-self.block_size:] for ids in id_lists]
        if not all(windows):
            raise ValueError("a stream needs at least one token (BOS for an empty prompt)")
        for s, window in zip(streams, windows):
            self._windows[s] = window
        # rows at positions 0..T-1 of one decode call: a prefill on the op-by-op path, rows of
        # the compiled step where the backend has one (Xeon, small preset: a 6-token prompt
        # 0.58 ms against the fused prefill's 1.21, 32 tokens 2.37 against 2.81)
        return self._decode_runs([(s, window, 0) for s, window in zip(streams, windows)])

    def _decode_runs(self, runs) -> np.ndarray:
        """One decode call over runs (stream, ids, first position): each run's ids are rows
        at consecutive positions; logits (len(runs), V) after each run's last id."""
        rows, ids, positions, last = [], [], [], []
        for s, new, start in runs:
            rows += [s] * len(new)
            ids += new
            positions += range(start, start + len(new))
            last.append(len(rows) - 1)
        return self.model.decode(np.asarray(ids), self.cache, rows, positions)[last]

    def feed(self, streams, tokens) -> np.ndarray:
        """Append one token to each stream; logits (S, V) for the token after each. A stream
        whose window is full restarts on its last `keep` tokens and the new one; all of it
        is one decode call (a restart is rows at positions 0..keep, see GPT.decode)."""
        windows = [self._windows[s] for s in streams]
        if all(len(w) < self.block_size for w in windows):   # the usual step: one row each
            for window, t in zip(windows, tokens):
                window.append(int(t))
            return self.model.decode(np.asarray(tokens), self.cache, streams)
        runs = []
        for s, t in zip(streams, tokens):
            window = self._windows[s]
            if len(window) < self.block_size:
                window.append(int(t))
                runs.append((s, [int(t)], len(window) - 1))
            else:
                self.rebuilds += 1
                window = self._windows[s] = window[len(window) - self.keep:] + [int(t)]
                runs.append((s, window, 0))
        return self._decode_runs(runs)

    def window(self, stream: int) -> list:
        return self._windows[stream]

    # ---- streams of text ---------------------------------------------------------------
    def submit(self, prompt="", max_tokens: int = 200, sampling: SamplingConfig | None = None,
               stop=(), rng=None, logprobs: int | None = None) -> int:
        """Start a stream on `prompt` (text, or a list of ids); returns its id. Every
        argument is checked here, before any token is made. `logprobs=N`: each event carries
        its token's logprob and the N likeliest alternatives (see Event)."""
        return self.submit_all([dict(prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                                     stop=stop, rng=rng, logprobs=logprobs)])[0]

    def submit_all(self, requests) -> list[int]:
        """submit for each request (a dict of submit's arguments), their prompts in one
        decode call (a server admitting several at one step); the new streams' ids. Every
        request is checked before any starts."""
        checked = [self._checked(**r) for r in requests]
        if len(checked) > self.free:
            raise RuntimeError("every stream of this session is busy" if not self.free else
                               f"{len(checked)} streams asked for, {self.free} free")
        streams = sorted(set(range(self.cache.streams)) - set(self.active))[:len(checked)]
        logits = self.prefill_all(streams, [ids for ids, _ in checked])
        for s, (_, stream), row in zip(streams, checked, logits):
            stream.logits = row
            self.active[s] = stream
        return streams

    def _checked(self, prompt="", max_tokens: int = 200, sampling: SamplingConfig | None = None,
                 stop=(), rng=None, logprobs: int | None = None) -> tuple[list, _Stream]:
        """submit's arguments checked: the prompt's ids and its stream, whose logits the
        prefill gives."""
        sampling = sampling or SamplingConfig()
        sampling.validate()
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise UserError(f"{{field}} {max_tokens} must be at least 1", "max_tokens")
        if any(s == "" for s in stop):
            raise UserError("a {field} string is empty; give at least one character", "stop")
        if logprobs is not None and not 0 <= logprobs <= self.model.cfg.vocab_size:
            raise UserError(f"{{field}} {logprobs} must be in [0, vocab size "
                            f"{self.model.cfg.vocab_size}]", "logprobs")
        ids = encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        return ids, _Stream(None, max_tokens, sampling,
                            rng if rng is not None else np.random.default_rng(),
                            Detokenizer(self.tokenizer), StopFilter(stop), logprobs)

    def cancel(self, stream: int) -> None:
        self.active.pop(stream, None)

    def step(self) -> list[Event]:
        """One token for every active stream (in stream order); finished streams leave."""
        events, going = self._sample()
        self._advance(going)
        return events

    def _sample(self) -> tuple[list[Event], list]:
        """step's first half: each stream's token and its Event from the logits it has; the
        (stream, token) pairs still going, whose next logits _advance computes."""
        events, going = [], []
        order = sorted(self.active)
        if not order:
            return events, going
        streams = [self.active[s] for s in order]
        tokens = sample_tokens([st.logits for st in streams], [st.sampling for st in streams],
                               [st.rng for st in streams])                # all rows at once
        for s, st, token in zip(order, streams, tokens):
            lp = None if st.logprobs is None else token_logprob(st.logits, token, st.logprobs)
            if token == self.tokenizer.eos_id:
                events.append(self._finish(s, None, "", "stop"))
                continue
            st.generated += 1
            st.tokens.append(token)
            text = st.stops.push(st.detokenizer.push(token))
            if st.stops.stopped:
                events.append(self._finish(s, token, text, "stop", flush=False))
            elif st.generated == st.max_tokens:
                events.append(self._finish(s, token, text, "length"))
            else:
                events.append(Event(s, token, text))
                going.append((s, token))
            events[-1].logprob = lp
        return events, going

    def _advance(self, going) -> None:
        if going:
            streams, tokens = zip(*going)
            for s, logits in zip(streams, self.feed(list(streams), list(tokens))):
                self.active[s].logits = logits

    def _finish(self, s, token, text, reason, flush=True) -> Event:
        st = self.active.pop(s)
        if flush:       # held-back text: the end of a character, or not a stop string after all
            text += st.stops.push(st.detokenizer.flush())
            if st.stops.stopped:
                reason = "stop"
            else:
                text += st.stops.flush()
        return Event(s, token, text, reason)


def warm_up(model) -> None:
    """One prefill and one decode step of a scratch stream, so that the backend's kernels
    are compiled (or loaded from disk) now rather than during a client's request: the decode
    step for every stream's tokens, the forward kernels for scoring a prompt (echo)."""
    cache = KVCache(model.cfg, 1, model.dtype, model.xp)
    model.prefill([0], cache)
    model.decode(np.array([0]), cache, [0])


def score_tokens(model, ids, top_n: int = 0) -> list:
    """The model's logprob of each of `ids` given the ones before it: [None (the first has no
    context), TokenLogprob, ...]. This is how a text is scored (OpenAI's echo + logprobs with
    max_tokens 0). Beyond block_size tokens each forward window starts half a block after the
    previous one, so every scored token sees at least block_size // 2 tokens of context."""
    ids = np.asarray(ids, dtype=np.int64)
    T, out = model.cfg.block_size, [None] * len(ids)
    start, done = 0, 1                    # window start; ids[:done] are scored
    while done < len(ids):
        window = ids[start:start + T + 1]                                      # (<= T+1,)
        logits, _ = model.forward(window[None, :-1])                           # (1, t, V)
        for j in range(done - start - 1, len(window) - 1):    # logits[j] predicts start+j+1
            out[start + j + 1] = token_logprob(logits[0, j], int(window[j + 1]), top_n)
        done = start + len(window)
        start += max(1, T // 2)
    return out


def generate(model, tokenizer, prompt="", max_tokens: int = 200,
             sampling: SamplingConfig | None = None, stop=(), rng=None,
             keep: int | None = None) -> Iterator[Event]:
    """The Events of one stream continuing `prompt`; the arguments are checked at the call,
    before any output."""
    session = Session(model, tokenizer, 1, keep)
    session.submit(prompt, max_tokens, sampling, stop, rng)
    return _drain(session)


def _drain(session: Session) -> Iterator[Event]:
    # each Event goes out before the decode step after it: its text reaches the reader one
    # step sooner (the first token's right after the prompt's prefill)
    while session.active:
        events, going = session._sample()
        yield from events
        session._advance(going)


def complete(model, tokenizer, prompt="", **kwargs) -> str:
    """The whole completion of `prompt` as one string (see generate for the arguments)."""
    return "".join(e.text for e in generate(model, tokenizer, prompt, **kwargs))
