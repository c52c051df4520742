"""Linear, without and with a bias: the reference's math on 2-D views. NumPy's matmul of a (B, T, IN) array
runs one small sgemm per batch item; one (B*T, IN) @ (IN, OUT) product is 1.5-2x faster.
With the backend's own_sgemm option (by default on CPUs with AVX-512) the float32 products
run on our own sgemm (fused/sgemm.py) wherever it beats OpenBLAS; elsewhere, and in float64,
on OpenBLAS. The cache is the reference's (x, w)."""
import numpy as np

from . import sgemm as own
from .jit import rows


def _matmul(a, b, empty, own_sgemm):
    # a (M, K) @ b (K, N) -> (M, N)
    out = empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    if own_sgemm and own.takes_rows(a, b, out.dtype):
        return own.sgemm(a, b, out)
    return np.matmul(a, b, out=out)


def _weight_gradient(x2, d2, empty, own_sgemm):
    # x2 (N, IN), d2 (N, OUT) -> x2^T d2 (IN, OUT): a long sum over positions into a small C
    dw = empty((x2.shape[1], d2.shape[1]), d2.dtype)
    if own_sgemm and own.takes_deep(x2.T, d2, dw.dtype):
        return own.sgemm_deep(x2.T, d2, dw)
    return np.matmul(x2.T, d2, out=dw)


def linear_forward(x, w, *, empty=np.empty, own_sgemm=False):
    # x (..., IN), w (IN, OUT) -> out (..., OUT)
    out = _matmul(rows(x), w, empty, own_sgemm).reshape(x.shape[:-1] + (w.shape[1],))
    return out, (x, w)


def linear_backward(dout, cache, *, empty=np.empty, own_sgemm=False):
    # dx = dout @ W^T ;  dW = x^T dout over all positions
    x, w = cache
    d2, x2 = rows(dout), rows(x)
    return (_matmul(d2, w.T, empty, own_sgemm).reshape(x.shape),
            _weight_gradient(x2, d2, empty, own_sgemm))


def linear_bias_forward(x, w, b, *, empty=np.empty, own_sgemm=False):
    # x (..., IN), w (IN, OUT), b (OUT,) -> out (..., OUT): the product, then b added in place
    out, cache = linear_forward(x, w, empty=empty, own_sgemm=own_sgemm)
    out += b
    return out, cache


def linear_bias_backward(dout, cache, *, empty=np.empty, own_sgemm=False):
    # as linear; db = the sum of dout over all positions
    dx, dw = linear_backward(dout, cache, empty=empty, own_sgemm=own_sgemm)
    return dx, dw, rows(dout).sum(axis=0)
