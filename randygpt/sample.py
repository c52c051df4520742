"""Turning logits into text: temperature sampling from a model (full forward each step)."""
from __future__ import annotations

import numpy as np


def softmax(logits, temperature: float = 1.0):
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


def generate_simple(model, prompt_ids, max_new_tokens: int, rng, temperature: float = 1.0,
                    stop_id: int | None = None) -> list[int]:
    """Sample up to max_new_tokens ids after prompt_ids, re-running the model on the last
    block_size tokens each step. Returns only the new ids (stops early at stop_id)."""
    ids = list(prompt_ids)
    new = []
    T = model.cfg.block_size
    for _ in range(max_new_tokens):
        window = np.asarray(ids[-T:], dtype=np.int64)[None, :]
        logits, _ = model.forward(window)
        nxt = int(rng.choice(logits.shape[-1], p=softmax(logits[0, -1], temperature)))
        if nxt == stop_id:
            break
        ids.append(nxt)
        new.append(nxt)
    return new
