"""How well a model predicts a text: mean loss per token, perplexity, bits per character.

The text is encoded as BOS followed by tokenizer.encode(text): the start of a document, as in
training (data.frame frames a document as BOS text EOS; the closing EOS is left out
here, so every predicted token is a token of the text and each is predicted exactly once).
That stream is cut into non-overlapping windows of block_size predictions; each window is one
forward pass, so the first positions of a window see less context than the model could use
(the usual cheap estimate: slightly pessimistic, never optimistic).

    loss           = total nats / number of predicted tokens
    perplexity     = exp(loss)
    bits per char  = total nats / ln 2 / number of characters of the text

Bits per character compares a char model with a BPE model fairly: both pay for the same text.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import UserError


@dataclass
class EvalResult:
    loss: float            # mean nats per predicted token
    perplexity: float
    bits_per_char: float
    total_nats: float
    tokens: int            # predicted tokens (= tokens of the text)
    chars: int             # characters of the text
    windows: int           # forward windows of at most block_size tokens

    def to_dict(self) -> dict:
        return asdict(self)


def token_nats(model, inputs, targets):
    """-log p(target) for each position: inputs, targets (B, T) -> (B, T) float64."""
    logits, _ = model.forward(inputs)                                        # (B, T, V)
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=-1))                               # (B, T)
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]      # (B, T)
    return logsumexp - picked


def evaluate_text(model, tokenizer, text: str, batch_windows: int = 16) -> EvalResult:
    if not text:
        raise UserError("the evaluation text is empty; give a file with some text in it")
    stream = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int64)
    T = model.cfg.block_size
    n_pred = len(stream) - 1                                   # every text token, once
    n_full, rest = divmod(n_pred, T)
    total = 0.0
    # full windows, batch_windows at a time: window w predicts stream[w*T+1 : w*T+T+1]
    full = stream[:n_full * T]
    shifted = stream[1:n_full * T + 1]
    for a in range(0, n_full, batch_windows):
        b = min(a + batch_windows, n_full)
        x = full[a * T:b * T].reshape(b - a, T)
        y = shifted[a * T:b * T].reshape(b - a, T)
        total += float(token_nats(model, x, y).sum())
    if rest:                                                   # the last, shorter window
        x = stream[n_full * T:n_full * T + rest][None, :]
        y = stream[n_full * T + 1:][None, :]
        total += float(token_nats(model, x, y).sum())
    loss = total / n_pred
    return EvalResult(loss=loss, perplexity=math.exp(loss),
                      bits_per_char=total / math.log(2) / len(text), total_nats=total,
                      tokens=n_pred, chars=len(text), windows=n_full + (1 if rest else 0))
