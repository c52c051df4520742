"""How well a model predicts a text: mean loss per token, perplexity, bits per character.

Every predicted token is scored exactly once. A piece of text is scored in windows of at most
block_size tokens; each window is one forward pass and scores only the targets no earlier
window scored:

    stride None   non-overlapping windows (the cheap estimate: the first positions of a
                  window see less context than the model could use; slightly pessimistic)
    stride S      sliding windows: after the first, each window ends S targets further and
                  scores only those S, so every target sees at least block_size - S tokens of
                  context (S = 1: the full context for every token, one pass per token)

What is a piece: a plain text is BOS followed by its tokens (no EOS: every predicted token is a
token of the text). With a document separator each document is framed as training frames it,
BOS doc EOS, and EOS is predicted too; `evaluate_documents` scores framed Documents (a run's
validation split) the same way.

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
    tokens: int            # predicted tokens
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


def piece_windows(a: int, b: int, T: int, stride: int | None):
    """The windows scoring tokens[a+1:b] once each, as (start, width, skip): the window feeds
    tokens[start:start+width] and scores its targets from position `skip` on."""
    n = b - a - 1                                  # targets of the piece
    if n <= 0:
        return []
    step = T if stride is None else stride
    out = [(a, min(T, n), 0)]
    scored = min(T, n)
    while scored < n:
        end = min(scored + step, n)                # score targets [scored, end)
        start = scored if stride is None else max(end - T, 0)
        out.append((a + start, end - start, scored - start))
        scored = end
    return out


def score_windows(model, tokens: np.ndarray, windows, batch_windows: int = 16) -> float:
    """Total nats of the scored targets of `windows` (see piece_windows) over `tokens`.
    Windows of similar width share a forward pass of about batch_windows full windows'
    tokens (short documents: many rows; padding is never scored)."""
    total = 0.0
    order = sorted(windows, key=lambda w: w[1])
    budget = batch_windows * max((w for _, w, _ in order), default=1)
    groups, i = [], 0
    while i < len(order):       # widths ascend: a group's last window is its widest
        j = i + 1
        while j < len(order) and (j + 1 - i) * order[j][1] <= budget:
            j += 1
        groups.append(order[i:j])
        i = j
    for group in groups:
        width = max(w for _, w, _ in group)
        idx = np.array([[s + min(j, w) for j in range(width + 1)] for s, w, _ in group])
        chunk = tokens[idx].astype(np.int64)                               # (B, width+1)
        nats = token_nats(model, chunk[:, :-1], chunk[:, 1:])              # (B, width)
        cols = np.arange(width)
        mask = np.array([(cols >= k) & (cols < w) for _, w, k in group])
        total += float(nats[mask].sum())
    return total


def evaluate_documents(model, docs, stride: int | None = None,
                       batch_windows: int = 16) -> EvalResult:
    """The exact loss over every target of framed Documents (e.g. a run's validation split):
    each piece's targets once, in windows that stay inside the piece."""
    T = model.cfg.block_size
    if stride is not None and not 1 <= stride <= T:
        raise UserError(f"{{field}} {stride} must be between 1 and the block size ({T})",
                        "stride")
    windows = [w for d in range(docs.n_docs)
               for w in piece_windows(int(docs.bounds[d]), int(docs.bounds[d + 1]), T, stride)]
    total = score_windows(model, docs.tokens, windows, batch_windows)
    n_pred = docs.n_targets
    loss = total / n_pred if n_pred else float("nan")
    chars = docs.n_chars
    return EvalResult(loss=loss, perplexity=math.exp(loss) if n_pred else float("nan"),
                      bits_per_char=total / math.log(2) / chars if chars else float("nan"),
                      total_nats=total, tokens=n_pred, chars=chars, windows=len(windows))


def evaluate_text(model, tokenizer, text: str, batch_windows: int = 16,
                  separator: str | None = None, stride: int | None = None) -> EvalResult:
    """The loss of `text`: one piece BOS text, or with `separator` its documents framed as
    training frames them (BOS doc EOS)."""
    if not text.strip():
        raise UserError("the evaluation text is empty (or only whitespace); give a file with "
                        "some text in it")
    from .data import Documents, encode_documents, split_text
    if separator is not None:
        docs = encode_documents(split_text(text, separator), tokenizer, progress=False)
    else:
        stream = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)
        docs = Documents(stream, np.array([0, len(stream)]), np.array([len(text)]))
    return evaluate_documents(model, docs, stride, batch_windows)
