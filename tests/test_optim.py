"""AdamW, gradient clipping and the LR schedule against direct formulas."""
import math

import numpy as np
import pytest

from randygpt.ops.contract import get_backend
from randygpt.optim import AdamW, clip_grad_norm, lr_at


@pytest.mark.parametrize("backend", [None, "reference", "fused"])
def test_adamw_matches_textbook_formula(backend):
    rng = np.random.default_rng(0)
    p = rng.normal(size=10)
    mask = np.array([1.0] * 6 + [0.0] * 4)            # last four: "norm gains", no decay
    opt = AdamW(p, mask, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                backend=None if backend is None else get_backend(backend))
    assert opt.backend.name == (backend or "reference")
    ref, m, v = p.copy(), np.zeros(10), np.zeros(10)
    for t in range(1, 6):
        g = rng.normal(size=10)
        lr = 0.01 * t
        opt.step(g.copy(), lr)
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.95 ** t)
        ref = ref - lr * (mhat / (np.sqrt(vhat) + 1e-8) + 0.1 * mask * ref)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert opt.step_count == 5
    assert opt.m.shape == opt.v.shape == p.shape            # what checkpoints save


def test_adamw_takes_a_backend_name():
    p = np.zeros(3)
    assert AdamW(p, np.ones(3), backend="fused").backend.own >= {"adamw_update"}


def test_clip_grad_norm_scales_only_when_above():
    g = np.array([3.0, 4.0], dtype=np.float32)
    assert clip_grad_norm(g, 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(g, [3.0, 4.0])
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    assert np.linalg.norm(g) == pytest.approx(1.0, rel=1e-5)
    g2 = np.array([30.0, 40.0])
    clip_grad_norm(g2, 0.0)                          # 0 = off
    np.testing.assert_array_equal(g2, [30.0, 40.0])


def test_lr_schedule_warmup_constant_cosine():
    kw = dict(iters=1000, lr=1e-3, min_lr=1e-4, warmup=100, decay_frac=0.3)
    assert lr_at(0, **kw) == pytest.approx(1e-5)           # first step of warmup
    assert lr_at(49, **kw) == pytest.approx(5e-4)
    assert lr_at(99, **kw) == pytest.approx(1e-3)          # end of warmup
    assert lr_at(100, **kw) == lr_at(699, **kw) == 1e-3    # constant phase
    assert lr_at(700, **kw) == pytest.approx(1e-3)         # cosine starts at the peak
    mid = 700 + 150
    assert lr_at(mid, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(999, **kw) == pytest.approx(1e-4, rel=1e-3)
    lrs = [lr_at(i, **kw) for i in range(700, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))        # monotone decay


def test_lr_schedule_without_warmup_or_decay():
    assert lr_at(0, 10, 1e-3, 0.0, 0, 0.0) == 1e-3
    assert lr_at(9, 10, 1e-3, 0.0, 0, 0.0) == 1e-3
    assert math.isclose(lr_at(9, 10, 1e-3, 0.0, 0, 1.0), 0.5e-3 * (1 + math.cos(math.pi * 0.9)))
