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
               grad_hook=None, check_loss=None, micro_batches: int = 1, row0: int = 0,
               n_targets: int | None = None) -> StepResult:
    """One optimizer step on the batch (x, y). `check_loss(loss)` runs between forward and
    backward, so a loss it rejects (by raising) never reaches the weights; `grad_hook(grad)`
    sees the flat gradient after backward and before clipping (where gradients of several
    processes are summed: distributed.py).

    Gradient accumulation: (x, y) is cut into `micro_batches` equal slices of rows, each one a
    forward and backward of its own (the memory of one slice), their gradients summed in
    order. Each slice's loss counts by its share of the targets of the whole step's batch,
    `n_targets` (default: those of (x, y)), so the sum is the gradient of the step's mean loss.
    `row0`: (x, y) are the rows row0.. of the step's batch (a rank's share); the dropout masks
    are those rows', and every slice draws the same dropout keys, so a row's mask does not
    depend on which slice or process trains it."""
    rows, left = divmod(len(x), micro_batches)
    if left:
        raise ValueError(f"{len(x)} rows do not split into {micro_batches} micro-batches")
    if n_targets is None:
        n_targets = int((y >= 0).sum())
    keep_keys = micro_batches > 1 and dropout_rng is not None
    keys = dropout_rng.bit_generator.state if keep_keys else None
    total = loss = None
    for j in range(micro_batches):
        xj, yj = x[j * rows:(j + 1) * rows], y[j * rows:(j + 1) * rows]
        if j:
            dropout_rng.bit_generator.state = keys       # the same keys for every slice
        _, loss_j = model.forward(xj, yj, rng=dropout_rng, row0=row0 + j * rows)
        if check_loss is not None:
            check_loss(loss_j)
        share = int((yj >= 0).sum()) / n_targets         # 1.0 for a whole batch
        model.backward(share)
        grad = model.grads.flat
        if j == 0:
            loss = share * loss_j
            total = grad.copy() if micro_batches > 1 else grad
        else:
            loss += share * loss_j
            total += grad                                # in slice order: a fixed sum
    if grad_hook is not None:
        grad_hook(total)
    norm = clip_grad_norm(total, grad_clip)
    optimizer.step(total, lr)
    return StepResult(loss, norm)


def make_optimizer(model, tcfg, backend):
    """The AdamW of a training run, its update on `backend`: the one place it is chosen."""
    return AdamW(model.params.flat, model.decay_mask(), tcfg.beta1, tcfg.beta2,
                 weight_decay=tcfg.weight_decay, backend=backend)
