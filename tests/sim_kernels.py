"""The cupy backend's numba-cuda kernels against the readable reference they replace.

Not collected by the default test run (the name has no test_ prefix): the kernels need a CUDA
target. tests/test_cupy_backend.py runs this file in a subprocess under numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1: every GPU thread a Python thread, so the shapes are
tiny), with NumPy arrays; benchmarks/gpu_check.sh runs it on a GPU, with CuPy arrays and a
few larger shapes (RANDYGPT_GPU=1).
"""
import os

import numpy as np
import pytest

from randygpt.ops import reference
from gradcheck import rel_error

ON_GPU = os.environ.get("RANDYGPT_GPU") == "1"
if ON_GPU:
    cupy = pytest.importorskip("cupy", reason="needs a CUDA GPU: CuPy is not installed")
    xp = cupy
elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    xp = np
else:
    pytest.skip("needs a CUDA GPU (RANDYGPT_GPU=1) or numba's CUDA simulator "
                "(NUMBA_ENABLE_CUDASIM=1); test_cupy_backend runs this file under the latter",
                allow_module_level=True)

from randygpt.ops.cupy import kernels  # noqa: E402  (after the simulator switch)

RNG = np.random.default_rng(0)
TOL = 2e-6                                   # relative error of whole float32 tensors
# (B, T, C, H): tiny under the simulator, plus GPU-sized ones on a GPU
SHAPES = [(2, 5, 8, 2), (1, 3, 12, 3)] + ([(4, 64, 128, 4), (2, 256, 768, 12)] if ON_GPU else [])


def host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def normal(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def close(got, want, tol=TOL):
    err = rel_error(host(got).astype(np.float64), np.asarray(want, dtype=np.float64))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("B,T,C,H", SHAPES)
def test_attention(B, T, C, H):
    qkv, dout = normal(B, T, 3 * C), normal(B, T, C)
    out, cache = kernels.attention_forward(xp.asarray(qkv), H)
    want, ref_cache = reference.attention_forward(qkv, H)
    close(out, want)
    dqkv, = kernels.attention_backward(xp.asarray(dout), cache)
    close(dqkv, reference.attention_backward(dout, ref_cache)[0])


def test_squared_relu():
    x, dout = normal(3, 4, 5), normal(3, 4, 5)
    x[0, 0, :2] = 0.0                                   # the kink: gradient 0 there
    out, cache = kernels.squared_relu_forward(xp.asarray(x))
    want, ref_cache = reference.squared_relu_forward(x)
    close(out, want)
    close(kernels.squared_relu_backward(xp.asarray(dout), cache)[0],
          reference.squared_relu_backward(dout, ref_cache)[0])


@pytest.mark.parametrize("p, row0", [(0.0, 0), (0.3, 0), (0.3, 5)])
def test_residual_dropout_is_the_reference_mask(p, row0):
    # the same key drawn from the same generator: the same mask, bit for bit (row0: a slice
    # of a bigger batch, as on an MPI rank)
    x, fx, dout = normal(2, 3, 40), normal(2, 3, 40), normal(2, 3, 40)
    out, cache = kernels.residual_dropout_forward(xp.asarray(x), xp.asarray(fx), p,
                                                  np.random.default_rng(7), row0)
    want, mask = reference.residual_dropout_forward(x, fx, p, np.random.default_rng(7), row0)
    np.testing.assert_array_equal(host(out), want)
    dx, dfx = kernels.residual_dropout_backward(xp.asarray(dout), cache)
    rdx, rdfx = reference.residual_dropout_backward(dout, mask)
    np.testing.assert_array_equal(host(dx), rdx)
    np.testing.assert_array_equal(host(dfx), rdfx)
    if p:
        dropped = 1 - (host(dfx) != 0).mean()
        assert 0.15 < dropped < 0.45                   # ~p of 240 elements


@pytest.mark.parametrize("ignore", [False, True])
def test_cross_entropy(ignore):
    logits = normal(2, 3, 37, scale=3.0)
    targets = RNG.integers(0, 37, (2, 3))
    if ignore:
        targets[1, 1:] = -1                            # padding: out of the mean and gradient
    loss, cache = kernels.cross_entropy_forward(xp.asarray(logits), xp.asarray(targets))
    want, ref_cache = reference.cross_entropy_forward(logits, targets)
    assert abs(float(loss) - float(want)) <= 2e-6 * abs(float(want))
    close(kernels.cross_entropy_backward(1.0, cache)[0],
          reference.cross_entropy_backward(1.0, ref_cache)[0])


def test_adamw():
    n = 50
    p, g, m, v = normal(n), normal(n), normal(n, scale=0.1), np.abs(normal(n, scale=0.1))
    mask = (np.arange(n) % 3 != 0).astype(np.float32)
    dev = [xp.asarray(a) for a in (p, g, m, v, mask)]
    for t in (1, 7):
        kernels.adamw_update(*dev, 1e-2, 0.9, 0.99, 1e-8, 0.1, t)
        reference.adamw_update(p, g, m, v, mask, 1e-2, 0.9, 0.99, 1e-8, 0.1, t)
    for got, want in zip(dev[:4], (p, g, m, v)):
        close(got, want)
