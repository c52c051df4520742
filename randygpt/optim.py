"""AdamW on a flat parameter buffer, global-norm gradient clipping, and the LR schedule."""
from __future__ import annotations

import math

import numpy as np

from .ops.contract import get_backend
from .ops.reference import array_module


def decay_start_of(iters: int, warmup: int, decay_frac: float) -> int:
    """The iteration where the cosine begins in a run of `iters` iterations."""
    return max(warmup, int(iters * (1.0 - decay_frac)))


def lr_at(it: int, iters: int, lr: float, min_lr: float, warmup: int, decay_frac: float,
          decay_start: int | None = None) -> float:
    """Learning rate for iteration `it` (0-based) of a run of `iters` iterations.

    Linear warmup over `warmup` iterations -> constant `lr` -> cosine decay to `min_lr` over the
    final `decay_frac` of the run. The constant phase lets the model learn at full speed for
    most of the run; the cosine tail settles it into a lower loss at the end. `decay_start`
    pins where the cosine began (a time budget that shortens a decay already under way).
    """
    if it < warmup:
        return lr * (it + 1) / warmup
    if decay_start is None:
        decay_start = decay_start_of(iters, warmup, decay_frac)
    if it < decay_start:
        return lr
    span = max(1, iters - decay_start)
    progress = min(1.0, (it - decay_start) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(grad, max_norm: float) -> float:
    """Scale `grad` in place so its global L2 norm is at most max_norm; return the norm before.
    A GPU array's norm stays on the GPU (a 0-d array) and so does the decision to clip."""
    if not isinstance(grad, np.ndarray):
        xp = array_module(grad)
        norm = xp.sqrt(xp.dot(grad, grad))
        if max_norm > 0:
            grad *= xp.where(norm > max_norm, max_norm / (norm + 1e-6), 1.0).astype(grad.dtype)
        return norm
    norm = float(np.sqrt(np.dot(grad, grad)))
    if max_norm > 0 and norm > max_norm:
        grad *= grad.dtype.type(max_norm / (norm + 1e-6))
    return norm


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), over one flat buffer.

    decay_mask is 1 where weight decay applies (matrices) and 0 elsewhere (norm gains). The
    update itself is the backend's adamw_update (a Backend or a backend name; None: the
    readable reference, reference.adamw_update, where the formula is written out)."""

    def __init__(self, params, decay_mask, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01,
                 backend=None):
        self.params = params
        self.decay_mask = decay_mask
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.backend = get_backend("reference" if backend is None else backend)
        xp = array_module(params)            # the moments live where the weights do
        self.m = xp.zeros_like(params)
        self.v = xp.zeros_like(params)
        self.step_count = 0

    def step(self, grad, lr: float) -> None:
        self.step_count += 1
        self.backend.adamw_update(self.params, grad, self.m, self.v, self.decay_mask, lr,
                                  self.beta1, self.beta2, self.eps, self.weight_decay,
                                  self.step_count)
