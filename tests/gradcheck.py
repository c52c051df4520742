"""Float64 central finite differences, shared by every gradient test."""
from __future__ import annotations

import numpy as np


def numerical_grad(f, x, eps=1e-6, indices=None):
    """Central differences of the scalar f() w.r.t. entries of array x (changed in place and
    restored). indices: flat positions to probe (default: all). Returns (indices, grads)."""
    flat = x.reshape(-1)
    if indices is None:
        indices = np.arange(flat.size)
    out = np.empty(len(indices))
    for n, j in enumerate(indices):
        old = flat[j]
        flat[j] = old + eps
        fp = f()
        flat[j] = old - eps
        fm = f()
        flat[j] = old
        out[n] = (fp - fm) / (2 * eps)
    return indices, out


def rel_error(a, b) -> float:
    """||a - b|| / max(||a||, ||b||): relative error of a whole gradient tensor."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = max(np.linalg.norm(a), np.linalg.norm(b), 1e-30)
    return float(np.linalg.norm(a - b) / denom)


def check_op(loss_fn, analytic, arrays, tol=1e-6, eps=1e-6):
    """Compare analytic gradients (list, one per array) with finite differences of loss_fn()."""
    for name_idx, (x, g) in enumerate(zip(arrays, analytic)):
        _, num = numerical_grad(loss_fn, x, eps)
        err = rel_error(num, g)
        assert err <= tol, f"input {name_idx}: relative error {err:.3e} > {tol}"


def check_model_gradient(model, loss_fn, tol=1e-6, per_tensor=40, seed=2):
    """Every parameter tensor of `model`: up to per_tensor entries of its gradient from the
    last backward() against central differences of loss_fn(); each tensor's relative error
    must be <= tol, and no tensor's gradient may be all zero."""
    probe = np.random.default_rng(seed)
    for name, _ in model.params.shapes:
        p, g = model.params[name], model.grads[name]
        idx = probe.choice(p.size, size=min(p.size, per_tensor), replace=False)
        _, num = numerical_grad(loss_fn, p, eps=1e-6, indices=idx)
        err = rel_error(num, g.reshape(-1)[idx])
        assert err <= tol, f"{name}: relative error {err:.2e}"
        assert np.abs(g).max() > 0, f"{name}: gradient is all zero"
