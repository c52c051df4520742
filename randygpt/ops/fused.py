"""Fast twins of ops/reference.py for the training hot path: numba kernels, same signatures.

`GPT(cfg, ops=fused)` runs on these instead of the readable reference. Each function returns
what its reference twin returns (output and gradients), to float32 round-off; only the opaque
caches passed from a forward to its backward differ, and they are smaller:

  - linear: x is reshaped to 2-D so one large product replaces one per batch item; on
    CPUs with AVX-512 the float32 products run on our own sgemm (ops/sgemm.py).
  - attention never stores the (B, H, T, T) probabilities: forward keeps the log-sum-exp of
    each row (B, H, T) and backward recomputes the probabilities from it (the flash-attention
    idea). Its small products run on 4 x 16 register tiles and skip blocks above the diagonal.
  - rmsnorm and squared ReLU keep only their outputs, which the model holds anyway for the
    next matmul's backward (xhat = out / g, relu(x) = sqrt(out)): no second (N, C) array.
  - dropout stores no mask: the mask is the reference's hash of each element's index under a
    key from the caller's Generator, so both paths drop the same units, and backward hashes
    again. It is fused with the residual add that follows it (x + dropout(f), one pass).
  - cross-entropy keeps the logits and one log-sum-exp per row, not a probability matrix.
  - large outputs come from a pool of recycled memory (`_BufferPool`), not fresh pages.

Kernels are compiled on first use (~12 s for all of them) and cached on disk (`cache=True`:
in __pycache__ next to this file, or numba's per-user cache directory when that is not
writable, or NUMBA_CACHE_DIR); later runs load them in well under a second. Elementwise
kernels are a plain `prange` over rows or elements (LLVM vectorises those bodies; a loop over
a sub-range inside a prange of chunks came out scalar, 4x slower); reductions and attention
split rows or (batch, head) pairs into a fixed number of chunks, so that their sums do not
depend on the number of threads. float32 and
float64 both work (float64 for the finite-difference tests); `fastmath` allows the
reassociation that vectorised reductions need, but not nnan/ninf.
"""
from __future__ import annotations

import math
import weakref

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import reference
from . import sgemm as own
from .sgemm import stack_block
from .reference import residual_backward  # noqa: F401  (nothing to compute)

# No nnan/ninf: a diverging run must still produce the inf/nan that train() checks for.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_jit = njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
_pjit = njit(cache=True, fastmath=_FASTMATH, error_model="numpy", parallel=True)

_CHUNKS = 16   # work chunks of parallel loops: fixed, so results do not depend on threads

# The attention tiles need LLVM's SLP (straight-line) vectoriser, which numba leaves off by
# default; it is read at each compilation, so this must run before the first one.
numba.config.SLP_VECTORIZE = 1


def _rows(x):
    """x (..., D) -> a C-contiguous (N, D) view (or copy)."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


class _BufferPool:
    """Recycled memory for the large arrays the ops return.

    A training step allocates the same big arrays every time. Fresh ones over 32 MiB (glibc's
    largest heap size: config B's (B, T, 4C) activations are 64 MiB) come straight from the
    kernel as untouched pages, and faulting them in cost ~10% of a B step. Here a block of
    memory goes back to a free list, by size, when the last array viewing it dies, and the
    next request of that size takes it. (Each request gets a new `_Lease` as its arrays'
    base: NumPy collapses view chains to the memory's owner, so the lease is what every view
    keeps alive, and its finalizer runs only after the last of them is gone.)"""

    class _Lease:
        def __init__(self, block, shape, dtype):
            self.block = block
            self.__array_interface__ = dict(block.__array_interface__, shape=tuple(shape),
                                            typestr=dtype.str, strides=None)

    def __init__(self, min_bytes=1 << 20):
        self.min_bytes = min_bytes
        self.free: dict[int, list] = {}

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        stack = self.free.setdefault(nbytes, [])
        block = stack.pop() if stack else np.empty(nbytes, np.uint8)
        lease = self._Lease(block, shape, dtype)
        weakref.finalize(lease, stack.append, block)
        return np.asarray(lease)


_empty = _BufferPool().empty


def _empty_like(x):
    return _empty(x.shape, x.dtype)


# --------------------------------------------------------------------------------------------
# A fast exp for softmax: inputs are <= 0 (max-shifted). exp(x) = 2^k * e^f with
# k = round(x / ln2), |f| <= ln2/2, e^f from a degree-6 Taylor polynomial (relative error
# < 3e-7 in float32), and 2^k built straight from its exponent bits. It is a scalar function
# that numba inlines, so the loops that call it vectorise; float64 uses the exact math.exp.

@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bit pattern is the int32 `bits` (a bitcast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


def _exp_nonpositive(x):
    return math.exp(x)


@overload(_exp_nonpositive, inline="always")
def _exp_nonpositive_impl(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp_float32(x):
        x = max(x, np.float32(-87.0))                      # below this exp underflows float32
        k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        f = x - k * np.float32(0.693145751953125)          # ln2 split in two (Cody-Waite)
        f = f - k * np.float32(1.428606765330187e-06)
        p = np.float32(1.0 / 720.0)
        p = p * f + np.float32(1.0 / 120.0)
        p = p * f + np.float32(1.0 / 24.0)
        p = p * f + np.float32(1.0 / 6.0)
        p = p * f + np.float32(0.5)
        p = p * f + np.float32(1.0)
        p = p * f + np.float32(1.0)
        return p * _float32_from_bits((np.int32(k) + np.int32(127)) << 23)   # p * 2^k
    return exp_float32


@_jit
def _exp_array(x):
    for i in range(x.size):
        x[i] = _exp_nonpositive(x[i])


def fast_exp(x):
    """exp of an array of values <= 0 through the kernel above (for tests)."""
    out = np.array(x, copy=True).reshape(-1)
    _exp_array(out)
    return out.reshape(np.shape(x))


# --------------------------------------------------------------------------------------------
# Embedding: out[b, t] = wte[idx[b, t]] + wpe[t]

@_jit
def _embedding_forward(wte, wpe, idx, out):
    B, T = idx.shape
    for b in range(B):
        for t in range(T):
            out[b, t] = wte[idx[b, t]] + wpe[t]


def embedding_forward(wte, wpe, idx):
    # wte (V, C), wpe (block_size, C), idx (B, T) int -> out (B, T, C)
    out = _empty(idx.shape + (wte.shape[1],), wte.dtype)
    _embedding_forward(wte, wpe, np.ascontiguousarray(idx), out)
    return out


@_jit
def _embedding_backward(dout, idx, dwte, dwpe):
    B, T, C = dout.shape
    for b in range(B):
        for t in range(T):
            dwte[idx[b, t]] += dout[b, t]
            dwpe[t] += dout[b, t]


def embedding_backward(dout, idx, vocab_size, block_size):
    # dout (B, T, C) -> dwte (V, C), dwpe (block_size, C): scatter-add, as the reference
    C = dout.shape[-1]
    dwte = np.zeros((vocab_size, C), dtype=dout.dtype)
    dwpe = np.zeros((block_size, C), dtype=dout.dtype)
    _embedding_backward(np.ascontiguousarray(dout), np.ascontiguousarray(idx), dwte, dwpe)
    return dwte, dwpe


# --------------------------------------------------------------------------------------------
# RMSNorm: out = g * x * r, r = (mean(x^2) + eps)^-1/2. Backward needs xhat = x * r; the
# model keeps `out` anyway (the next matmul's input), so the cache is (out, r) and backward
# recovers xhat = out / g: one (N, C) array less per norm than keeping x or xhat. (If a gain
# is 0 or tiny, out / g would lose xhat, and the cache keeps x instead.)
#   dx = r * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dout * g,  dg = sum(dout * xhat)

@_pjit
def _rmsnorm_forward(x, g, eps, out, rstd):
    N, C = x.shape
    one = x.dtype.type(1.0)
    for i in prange(N):
        ss = x[i, 0] * 0
        for c in range(C):
            ss += x[i, c] * x[i, c]
        r = one / math.sqrt(ss / C + eps)
        rstd[i] = r
        for c in range(C):
            out[i, c] = x[i, c] * r * g[c]


def rmsnorm_forward(x, g, eps=1e-5):
    # x (..., C), g (C,) -> out (..., C); cache (saved, row_scale, col_scale) with
    # xhat = saved * row_scale[:, None] * col_scale[None, :]
    x2 = _rows(x)
    out = _empty_like(x2)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _rmsnorm_forward(x2, g, x.dtype.type(eps), out, rstd)
    if np.all(np.abs(g) > 1e-6):
        cache = (out, np.ones_like(rstd), (1 / g).astype(g.dtype))
    else:
        cache = (x2, rstd, np.ones_like(g))
    return out.reshape(x.shape), cache + (rstd,)


@_pjit
def _rmsnorm_backward(dout, g, saved, row_scale, col_scale, rstd, dx, dg_parts):
    N, C = saved.shape
    chunk = (N + _CHUNKS - 1) // _CHUNKS
    for k in prange(_CHUNKS):
        for i in range(k * chunk, min(N, (k + 1) * chunk)):
            r, s = rstd[i], row_scale[i]
            dot = r * 0                                        # sum(dxhat * xhat)
            for c in range(C):
                xhat = saved[i, c] * s * col_scale[c]
                dot += dout[i, c] * g[c] * xhat
                dg_parts[k, c] += dout[i, c] * xhat
            mean = dot / C
            for c in range(C):
                xhat = saved[i, c] * s * col_scale[c]
                dx[i, c] = r * (dout[i, c] * g[c] - xhat * mean)


def rmsnorm_backward(dout, g, cache):
    saved, row_scale, col_scale, rstd = cache
    d2 = _rows(dout)
    dx = _empty_like(d2)
    dg_parts = np.zeros((_CHUNKS, saved.shape[1]), dtype=saved.dtype)
    _rmsnorm_backward(d2, g, saved, row_scale, col_scale, rstd, dx, dg_parts)
    return dx.reshape(dout.shape), dg_parts.sum(axis=0)


# --------------------------------------------------------------------------------------------
# Register tiles for attention's small matrix products: a product's 4 x 16 block of
# results lives in a stack array that LLVM promotes to registers, and its SLP vectoriser turns
# each 16-wide row update into one vector FMA. The tile functions are compiled with fastmath
# "contract" only: with reassociation allowed, LLVM vectorises across the k loop instead
# (gathers, much slower).

_TILE_ROWS, _TILE_COLS = 4, 16


_stack_tile_pointer = stack_block(_TILE_ROWS * _TILE_COLS)


# --------------------------------------------------------------------------------------------
# Linear (no bias): the reference's math on 2-D views. NumPy's matmul of a (B, T, IN) array
# runs one small sgemm per batch item; one (B*T, IN) @ (IN, OUT) product is 1.5-2x faster.
# On CPUs with AVX-512 the float32 products run on our own sgemm (ops/sgemm.py) wherever it
# beats OpenBLAS; elsewhere, on other CPUs and in float64, on OpenBLAS.

def _matmul(a, b):
    out = _empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    if own.USE_OWN_SGEMM and own.takes_rows(a, b, out.dtype):
        return own.sgemm(a, b, out)
    return np.matmul(a, b, out=out)


def linear_forward(x, w):
    # x (..., IN), w (IN, OUT) -> out (..., OUT)
    return _matmul(_rows(x), w).reshape(x.shape[:-1] + (w.shape[1],))


def linear_backward(dout, x, w):
    # dx = dout @ W^T ;  dW = x^T dout over all positions (OpenBLAS: see above)
    d2, x2 = _rows(dout), _rows(x)
    return _matmul(d2, w.T).reshape(x.shape), _weight_gradient(x2, d2)


def _weight_gradient(x2, d2):
    # x2 (N, IN), d2 (N, OUT) -> x2^T d2 (IN, OUT): a long sum over positions into a small C
    dw = _empty((x2.shape[1], d2.shape[1]), d2.dtype)
    if own.USE_OWN_SGEMM and own.takes_deep(x2.T, d2, dw.dtype):
        return own.sgemm_deep(x2.T, d2, dw)
    return np.matmul(x2.T, d2, out=dw)


# --------------------------------------------------------------------------------------------
# Causal self-attention as small matrix products on register tiles.
#
# Per (batch item, head), with q pre-scaled by s = 1/sqrt(hs):
#   forward:  S = q k^T;  P = softmax(S masked to j <= t);  y = P v;  lse_t = log sum_j e^S_tj
#   backward: P again from lse (nothing T x T is kept between the passes);  dP = dy v^T;
#             dS = P * (dP - D) with D_t = sum_j P_tj dP_tj = dy_t . y_t;
#             dq = s dS k;  dk = dS^T (s q);  dv = P^T dy
# Every product is done by `_tile_product`, which keeps a 4 x 16 block of the result in
# registers while it runs down the shared dimension (LLVM's SLP vectoriser turns each row of
# the block into one vector FMA). Blocks above the diagonal are skipped: S, P and dS are only
# computed for key columns up to the 16-aligned end of each 4-row block. The (T, T) matrices
# live in per-chunk scratch for one (batch item, head) at a time, never for the whole batch.

@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _tile_product(a, a0, a_transposed, b, b0, k0, k1, dst, d0, dcol, nrows, ncols, scale):
    """dst[d0 + r, dcol + c] = scale * sum_{k0 <= k < k1} A[r, k] * b[k, b0 + c] for r < nrows,
    c < ncols, where A[r, k] = a[a0 + r, k], or a[k, a0 + r] when a_transposed."""
    acc = numba.carray(_stack_tile_pointer(a.dtype), (_TILE_ROWS, _TILE_COLS))
    for r in range(_TILE_ROWS):
        for c in range(_TILE_COLS):
            acc[r, c] = 0
    if a_transposed:
        for k in range(k0, k1):
            a_col = a[k, a0:a0 + _TILE_ROWS]
            b_row = b[k, b0:b0 + _TILE_COLS]
            for r in range(_TILE_ROWS):
                for c in range(_TILE_COLS):
                    acc[r, c] += a_col[r] * b_row[c]
    else:
        for k in range(k0, k1):
            b_row = b[k, b0:b0 + _TILE_COLS]
            for r in range(_TILE_ROWS):
                a_rk = a[a0 + r, k]
                for c in range(_TILE_COLS):
                    acc[r, c] += a_rk * b_row[c]
    for r in range(min(_TILE_ROWS, nrows)):
        out = dst[d0 + r]
        for c in range(min(_TILE_COLS, ncols)):
            out[dcol + c] = acc[r, c] * scale


@njit(inline="always")
def _round_up(n, m):
    return (n + m - 1) // m * m


@njit(inline="always")
def _key_end(t0, T):
    """Key columns a 4-row block starting at query t0 needs: up to its last row's diagonal,
    rounded up to whole 16-column tiles."""
    return min(_round_up(T, _TILE_COLS), _round_up(t0 + _TILE_ROWS, _TILE_COLS))


@njit(inline="always")
def _attention_layout(qkv, n_head):
    """Sizes both attention kernels work with: B, T, C, head size hs, hs padded to whole
    tiles, T padded to whole tile rows / columns, the score scale 1/sqrt(hs), the number of
    (batch item, head) pairs and how many of them each parallel chunk takes."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    pairs = B * n_head
    return (B, T, C, hs, _round_up(hs, _TILE_COLS), _round_up(T, _TILE_ROWS),
            _round_up(T, _TILE_COLS), qkv.dtype.type(1.0 / math.sqrt(hs)), pairs,
            (pairs + _CHUNKS - 1) // _CHUNKS)


@_pjit
def _attention_forward(qkv, n_head, out, lse):
    B, T, C, hs, hp, Tr, Tc, scale, pairs, per_chunk = _attention_layout(qkv, n_head)
    dt = qkv.dtype
    one = dt.type(1.0)
    for chunk in prange(_CHUNKS):
        q = np.zeros((Tr, hp), dtype=dt)               # this head's q (scaled), k^T and v,
        kt = np.zeros((hp, Tc), dtype=dt)              # zero-padded to whole tiles
        v = np.zeros((Tc, hp), dtype=dt)
        P = np.empty((Tr, Tc), dtype=dt)               # scores, then probabilities
        for bh in range(chunk * per_chunk, min(pairs, (chunk + 1) * per_chunk)):
            b, h = bh // n_head, bh % n_head
            qo, ko, vo = h * hs, C + h * hs, 2 * C + h * hs
            x, y = qkv[b], out[b]                      # (T, 3C), (T, C)
            for t in range(T):
                for d in range(hs):
                    q[t, d] = x[t, qo + d] * scale
                    kt[d, t] = x[t, ko + d]
                    v[t, d] = x[t, vo + d]
            for t0 in range(0, Tr, _TILE_ROWS):
                jend = _key_end(t0, T)
                for j0 in range(0, jend, _TILE_COLS):                      # S = q k^T
                    _tile_product(q, t0, False, kt, j0, 0, hs, P, t0, j0, 4, 16, one)
                for t in range(t0, t0 + _TILE_ROWS):                       # softmax rows
                    row = P[t]
                    if t >= T:
                        row[:jend] = 0.0
                        continue
                    m = row[0]
                    for j in range(1, t + 1):
                        m = max(m, row[j])
                    for j in range(t + 1):
                        row[j] = _exp_nonpositive(row[j] - m)
                    row[t + 1:jend] = 0.0                                  # the future
                    total = row[0] * 0
                    for j in range(t + 1):
                        total += row[j]
                    lse[b, h, t] = m + math.log(total)
                    inv = one / total
                    for j in range(t + 1):
                        row[j] *= inv
                for d0 in range(0, hs, _TILE_COLS):                        # y = P v
                    _tile_product(P, t0, False, v, d0, 0, jend, y, t0, qo + d0, T - t0,
                                  hs - d0, one)


def attention_forward(qkv, n_head):
    # qkv (B, T, 3C) -> out (B, T, C); cache (qkv, out, lse (B, H, T), n_head)
    qkv = np.ascontiguousarray(qkv)
    B, T, C3 = qkv.shape
    out = _empty((B, T, C3 // 3), qkv.dtype)
    lse = np.empty((B, n_head, T), dtype=qkv.dtype)
    _attention_forward(qkv, n_head, out, lse)
    return out, (qkv, out, lse, n_head)


@_pjit
def _attention_backward(dout, qkv, out, lse, n_head, dqkv):
    B, T, C, hs, hp, Tr, Tc, scale, pairs, per_chunk = _attention_layout(qkv, n_head)
    dt = qkv.dtype
    one = dt.type(1.0)
    for chunk in prange(_CHUNKS):
        q = np.zeros((Tc, hp), dtype=dt)               # scaled queries
        g = np.zeros((Tc, hp), dtype=dt)               # dy of this head
        k = np.zeros((Tc, hp), dtype=dt)
        kt = np.zeros((hp, Tc), dtype=dt)
        vt = np.zeros((hp, Tc), dtype=dt)
        D = np.empty(T, dtype=dt)                      # D_t = dy_t . y_t
        P = np.empty((Tc, Tc), dtype=dt)
        dS = np.empty((Tc, Tc), dtype=dt)
        for bh in range(chunk * per_chunk, min(pairs, (chunk + 1) * per_chunk)):
            b, h = bh // n_head, bh % n_head
            qo, ko, vo = h * hs, C + h * hs, 2 * C + h * hs
            x, dx = qkv[b], dqkv[b]
            for t in range(T):
                acc = one * 0
                for d in range(hs):
                    q[t, d] = x[t, qo + d] * scale
                    g[t, d] = dout[b, t, qo + d]
                    k[t, d] = kt[d, t] = x[t, ko + d]
                    vt[d, t] = x[t, vo + d]
                    acc += dout[b, t, qo + d] * out[b, t, qo + d]
                D[t] = acc
            for t0 in range(0, Tr, _TILE_ROWS):
                jend = _key_end(t0, T)
                for j0 in range(0, jend, _TILE_COLS):
                    _tile_product(q, t0, False, kt, j0, 0, hs, P, t0, j0, 4, 16, one)   # S
                    _tile_product(g, t0, False, vt, j0, 0, hs, dS, t0, j0, 4, 16, one)  # dP
                for t in range(t0, t0 + _TILE_ROWS):
                    prow, drow = P[t], dS[t]
                    if t >= T:                                             # padding rows
                        prow[:jend] = 0.0
                        drow[:jend] = 0.0
                        continue
                    l = lse[b, h, t]
                    for j in range(t + 1):
                        prow[j] = _exp_nonpositive(prow[j] - l)             # P = e^(S - lse)
                    prow[t + 1:jend] = 0.0
                    Dt = D[t]
                    for j in range(jend):
                        drow[j] = prow[j] * (drow[j] - Dt)                 # dS
                for d0 in range(0, hs, _TILE_COLS):                        # dq = dS k * scale
                    _tile_product(dS, t0, False, k, d0, 0, jend, dx, t0, qo + d0, T - t0,
                                  hs - d0, scale)
            for j0 in range(0, Tr, _TILE_ROWS):            # keys j0..j0+3: rows t >= j0 only
                for d0 in range(0, hs, _TILE_COLS):
                    _tile_product(dS, j0, True, q, d0, j0, Tr, dx, j0, ko + d0, T - j0,
                                  hs - d0, one)                            # dk = dS^T q
                    _tile_product(P, j0, True, g, d0, j0, Tr, dx, j0, vo + d0, T - j0,
                                  hs - d0, one)                            # dv = P^T dy

def attention_backward(dout, cache):
    qkv, out, lse, n_head = cache
    dqkv = _empty_like(qkv)
    _attention_backward(np.ascontiguousarray(dout), qkv, out, lse, n_head, dqkv)
    return dqkv


# --------------------------------------------------------------------------------------------
# Squared ReLU: out = relu(x)^2, dx = 2 relu(x) dout. Cache: the output itself (the model keeps
# it anyway for the next matmul's backward), since relu(x) = sqrt(out): no extra array.

@_pjit
def _squared_relu_forward(x, out):
    N, D = x.shape
    for i in prange(N):
        for c in range(D):
            r = max(x[i, c], 0)
            out[i, c] = r * r


def squared_relu_forward(x):
    # x (..., D) -> out (..., D)
    x2 = _rows(x)
    out = _empty_like(x2)
    _squared_relu_forward(x2, out)
    return out.reshape(x.shape), out


@_pjit
def _squared_relu_backward(dout, out, dx):
    N, D = out.shape
    for i in prange(N):
        for c in range(D):
            dx[i, c] = 2 * math.sqrt(out[i, c]) * dout[i, c]


def squared_relu_backward(dout, out):
    d2 = _rows(dout)
    dx = _empty_like(d2)
    _squared_relu_backward(d2, out, dx)
    return dx.reshape(dout.shape)


# --------------------------------------------------------------------------------------------
# Dropout (inverted) and the residual add after it. The keep mask is the reference's hash of
# each element's flat index (reference.dropout_keep), computed here in parallel and never
# stored: backward hashes the indices again. Kept units are scaled by 1/(1-p) in x's
# precision, so outputs match the reference bit for bit.

@njit(inline="always")
def _mix32(h):
    # reference.mix32 on one uint32 (each product truncated back to 32 bits)
    h ^= h >> np.uint32(16)
    h = np.uint32(h * np.uint32(0x7FEB352D))
    h ^= h >> np.uint32(15)
    h = np.uint32(h * np.uint32(0x846CA68B))
    h ^= h >> np.uint32(16)
    return h


@njit(inline="always")
def _kept(i, k0, k1, threshold):
    return _mix32(_mix32(np.uint32(i) ^ k0) ^ k1) >= threshold


@_pjit
def _dropout(src, k0, k1, threshold, scale, out):
    # out = src * keep * scale; all arrays flat (n,)
    for i in prange(src.size):
        out[i] = src[i] * scale if _kept(i, k0, k1, threshold) else 0


@_pjit
def _residual_dropout(x, fx, k0, k1, threshold, scale, out):
    # out = x + fx * keep * scale; all arrays flat (n,)
    for i in prange(fx.size):
        out[i] = x[i] + fx[i] * scale if _kept(i, k0, k1, threshold) else x[i]


def _dropout_mask(x, p, rng):
    """The cache of a dropout: (k0, k1, threshold, scale) as the kernels take them."""
    reference.check_dropout_size(x.size)
    k0, k1 = reference.dropout_key(rng)
    return (np.uint32(k0), np.uint32(k1), np.uint32(reference.dropout_threshold(p)),
            x.dtype.type(1.0 / (1.0 - p)))


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def dropout_forward(x, p, rng):
    if p == 0.0 or rng is None:
        return x, None
    mask = _dropout_mask(x, p, rng)
    out = _empty_like(x)
    _dropout(_flat(x), *mask, out.reshape(-1))
    return out, mask


def dropout_backward(dout, mask):
    if mask is None:
        return dout
    dx = _empty_like(dout)
    _dropout(_flat(dout), *mask, dx.reshape(-1))
    return dx


def residual_forward(x, fx):
    # out = x + f(x), into recycled memory (the backward is the reference's)
    return np.add(x, fx, out=_empty(np.broadcast_shapes(x.shape, fx.shape),
                                    np.result_type(x, fx)))


def residual_dropout_forward(x, fx, p, rng):
    # x, fx (..., C) -> x + dropout(fx) in one pass; cache: the mask's key
    if p == 0.0 or rng is None:
        return residual_forward(x, fx), None
    mask = _dropout_mask(fx, p, rng)
    out = _empty(fx.shape, fx.dtype)
    _residual_dropout(_flat(x), _flat(fx), *mask, out.reshape(-1))
    return out, mask


def residual_dropout_backward(dout, mask):
    return dout, dropout_backward(dout, mask)


# --------------------------------------------------------------------------------------------
# Cross-entropy: loss = mean over kept positions of lse(logits) - logits[target]; a negative
# target is left out (as in the reference). Backward: (softmax - onehot) / N_kept.

@_pjit
def _cross_entropy_forward(logits, targets, lse, losses):
    N, V = logits.shape
    for i in prange(N):
        m = logits[i, 0]
        for v in range(1, V):
            m = max(m, logits[i, v])
        total = logits[i, 0] * 0
        for v in range(V):
            total += _exp_nonpositive(logits[i, v] - m)
        lse[i] = m + math.log(total)
        tgt = targets[i]
        losses[i] = lse[i] - logits[i, tgt] if tgt >= 0 else 0


def cross_entropy_forward(logits, targets):
    # logits (B, T, V), targets (B, T) int -> scalar loss; cache (logits, lse, targets, kept)
    flat = _rows(logits)
    tflat = np.ascontiguousarray(targets).reshape(-1)
    lse = np.empty(flat.shape[0], dtype=np.float64)
    losses = np.empty(flat.shape[0], dtype=np.float64)
    _cross_entropy_forward(flat, tflat, lse, losses)
    kept = max(int((tflat >= 0).sum()), 1)
    return losses.sum() / kept, (flat, lse, tflat, kept)


@_pjit
def _cross_entropy_backward(logits, lse, targets, scale, dlogits):
    N, V = logits.shape
    for i in prange(N):
        tgt = targets[i]
        if tgt < 0:
            dlogits[i, :] = 0
            continue
        lse_i = logits.dtype.type(lse[i])                 # logits' precision: the fast exp
        for v in range(V):
            dlogits[i, v] = _exp_nonpositive(logits[i, v] - lse_i) * scale
        dlogits[i, tgt] -= scale


def cross_entropy_backward(cache, logits_shape, dloss=1.0):
    flat, lse, tflat, kept = cache
    dlogits = _empty_like(flat)
    _cross_entropy_backward(flat, lse, tflat, dloss / kept, dlogits)
    return dlogits.reshape(logits_shape)


# --------------------------------------------------------------------------------------------
# AdamW in one pass over the flat buffers (optim.FusedAdamW calls this; optim.AdamW is the
# readable twin): m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
# p -= lr * (m * mhat_scale / (sqrt(v * vhat_scale) + eps) + wd * mask * p)

@_pjit
def adamw_update(params, grad, m, v, decay_mask, lr, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, eps, weight_decay, mhat_scale, vhat_scale):
    # every array (N,) of one dtype; every scalar already of that dtype
    for i in prange(params.size):
        g = grad[i]
        mi = beta1 * m[i] + one_minus_beta1 * g
        vi = beta2 * v[i] + one_minus_beta2 * g * g
        m[i] = mi
        v[i] = vi
        update = (mi * mhat_scale) / (math.sqrt(vi * vhat_scale) + eps)
        params[i] -= lr * (update + weight_decay * decay_mask[i] * params[i])
