"""Linear, without and with a bias: the reference's math on 2-D views. NumPy's matmul of a (B, T, IN) array
runs one small sgemm per batch item; one (B*T, IN) @ (IN, OUT) product is 1.5-2x faster.
Which kernel runs each float32 product, OpenBLAS or our own sgemm (fused/sgemm.py), is the
backend's `kernels` option: a choose.KernelChoice that times both on first use of a shape
and keeps the faster (float64 always runs on OpenBLAS). The cache is the reference's (x, w)."""
import numpy as np

from . import sgemm as own
from .jit import rows


def _matmul(a, b, empty, kernels):
    # a (M, K) @ b (K, N) -> (M, N)
    out = empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    if kernels is not None and kernels.kernel("rows", a, b, out) == "own":
        return own.sgemm(a, b, out)
    return np.matmul(a, b, out=out)


def _weight_gradient(x2, d2, empty, kernels):
    # x2 (N, IN), d2 (N, OUT) -> x2^T d2 (IN, OUT): a long sum over positions into a small C
    dw = empty((x2.shape[1], d2.shape[1]), d2.dtype)
    if kernels is not None and kernels.kernel("deep", x2.T, d2, dw) == "own":
        return own.sgemm_deep(x2.T, d2, dw)
    return np.matmul(x2.T, d2, out=dw)


def linear_forward(x, w, *, empty=np.empty, kernels=None):
    # x (..., IN), w (IN, OUT) -> out (..., OUT)
    out = _matmul(rows(x), w, empty, kernels).reshape(x.shape[:-1] + (w.shape[1],))
    return out, (x, w)


def linear_backward(dout, cache, *, empty=np.empty, kernels=None):
    # dx = dout @ W^T ;  dW = x^T dout over all positions
    x, w = cache
    d2, x2 = rows(dout), rows(x)
    return (_matmul(d2, w.T, empty, kernels).reshape(x.shape),
            _weight_gradient(x2, d2, empty, kernels))


def linear_bias_forward(x, w, b, *, empty=np.empty, kernels=None):
    # x (..., IN), w (IN, OUT), b (OUT,) -> out (..., OUT): the product, then b added in place
    out, cache = linear_forward(x, w, empty=empty, kernels=kernels)
    out += b
    return out, cache


def linear_bias_backward(dout, cache, *, empty=np.empty, kernels=None):
    # as linear; db = the sum of dout over all positions
    dx, dw = linear_backward(dout, cache, empty=empty, kernels=kernels)
    return dx, dw, rows(dout).sum(axis=0)
