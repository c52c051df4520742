"""AdamW on a flat parameter buffer, global-norm gradient clipping, and the LR schedule."""
from __future__ import annotations

import math

import numpy as np


def lr_at(it: int, iters: int, lr: float, min_lr: float, warmup: int, decay_frac: float) -> float:
    """Learning rate for iteration `it` (0-based) of a run of `iters` iterations.

    Linear warmup over `warmup` iterations -> constant `lr` -> cosine decay to `min_lr` over the
    final `decay_frac` of the run. The constant phase lets the model learn at full speed for
    most of the run; the cosine tail settles it into a lower loss at the end.
    """
    if it < warmup:
        return lr * (it + 1) / warmup
    decay_start = max(warmup, int(iters * (1.0 - decay_frac)))
    if it < decay_start:
        return lr
    span = max(1, iters - decay_start)
    progress = min(1.0, (it - decay_start) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(grad, max_norm: float) -> float:
    """Scale `grad` in place so its global L2 norm is at most max_norm; return the norm before."""
    norm = float(np.sqrt(np.dot(grad, grad)))
    if max_norm > 0 and norm > max_norm:
        grad *= grad.dtype.type(max_norm / (norm + 1e-6))
    return norm


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), over one flat buffer.

    decay_mask is 1 where weight decay applies (matrices) and 0 elsewhere (norm gains).
    """

    def __init__(self, params, decay_mask, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01):
        self.params = params
        self.decay_mask = decay_mask
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.step_count = 0

    def step(self, grad, lr: float) -> None:
        # m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2 ;  bias-correct both;
        # p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p * mask)
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.beta1, self.beta2
        dt = self.params.dtype.type
        self.m *= dt(b1)
        self.m += dt(1 - b1) * grad
        self.v *= dt(b2)
        self.v += dt(1 - b2) * grad * grad
        m_hat_scale = dt(1.0 / (1 - b1 ** t))
        v_hat_scale = dt(1.0 / (1 - b2 ** t))
        update = (self.m * m_hat_scale) / (np.sqrt(self.v * v_hat_scale) + dt(self.eps))
        if self.weight_decay:
            update += dt(self.weight_decay) * self.decay_mask * self.params
        self.params -= dt(lr) * update


class FusedAdamW(AdamW):
    """AdamW's exact update in one parallel numba pass over the flat buffers (instead of ~10
    NumPy passes); tested against AdamW. It imports numba, so only training uses it."""

    def step(self, grad, lr: float) -> None:
        from .ops.fused import adamw_update
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.beta1, self.beta2
        dt = self.params.dtype.type
        adamw_update(self.params, grad, self.m, self.v, self.decay_mask, dt(lr), dt(b1),
                     dt(1 - b1), dt(b2), dt(1 - b2), dt(self.eps), dt(self.weight_decay),
                     dt(1.0 / (1 - b1 ** t)), dt(1.0 / (1 - b2 ** t)))
