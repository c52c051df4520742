"""One training step: forward, backward, gradient hook, clipping, optimizer step.

The training loop, the benchmarks and the tests all step through `train_step`, so a change to
the step (a multi-process gradient reduction in `grad_hook`, say) is made here once.
"""
from __future__ import annotations

from dataclasses import dataclass

from .optim import AdamW, clip_grad_norm


@dataclass(frozen=True)
class StepResult:
    loss: float          # the mean loss of the batch, before this step's update
    grad_norm: float     # the global gradient L2 norm before clipping


def train_step(model, optimizer, x, y, lr: float, *, grad_clip: float, dropout_rng,
               grad_hook=None, check_loss=None) -> StepResult:
    """One optimizer step on the batch (x, y). `check_loss(loss)` runs between forward and
    backward, so a loss it rejects (by raising) never reaches the weights; `grad_hook(grad)`
    sees the flat gradient after backward and before clipping (where gradients of several
    processes will be summed)."""
    _, loss = model.forward(x, y, rng=dropout_rng)
    if check_loss is not None:
        check_loss(loss)
    model.backward()
    grad = model.grads.flat
    if grad_hook is not None:
        grad_hook(grad)
    norm = clip_grad_norm(grad, grad_clip)
    optimizer.step(grad, lr)
    return StepResult(loss, norm)


def make_optimizer(model, tcfg, backend):
    """The AdamW of a training run, its update on `backend`: the one place it is chosen."""
    return AdamW(model.params.flat, model.decay_mask(), tcfg.beta1, tcfg.beta2,
                 weight_decay=tcfg.weight_decay, backend=backend)
