"""Elementwise and row-wise kernels: a fast exp, embedding, RMSNorm, squared ReLU, the
residual add after dropout, cross-entropy. Each public op has its reference twin's signature
(ops/contract.py); those that return large arrays also take `empty`, the allocator the
backend binds (fused/memory.py). Caches hold less than the reference's (see each op)."""
import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .. import reference
from .jit import CHUNKS, flat, jit, pjit, rows


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


def exp_nonpositive(x):
    return math.exp(x)


@overload(exp_nonpositive, inline="always")
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


@jit
def _exp_array(x):
    for i in range(x.size):
        x[i] = exp_nonpositive(x[i])


def fast_exp(x):
    """exp of an array of values <= 0 through the kernel above (for tests)."""
    out = np.array(x, copy=True).reshape(-1)
    _exp_array(out)
    return out.reshape(np.shape(x))


# --------------------------------------------------------------------------------------------
# Embedding: out[b, t] = wte[idx[b, t]] + wpe[t]; the cache is the reference's

@jit
def _embedding_forward(wte, wpe, idx, out):
    # element loops, not row expressions: those allocate a temporary per row and compile
    # numba's shape-error messages (~3 s of a cold start)
    B, T = idx.shape
    C = wte.shape[1]
    for b in range(B):
        for t in range(T):
            row, pos, o = wte[idx[b, t]], wpe[t], out[b, t]
            for c in range(C):
                o[c] = row[c] + pos[c]


def embedding_forward(wte, wpe, idx, *, empty=np.empty):
    # wte (V, C), wpe (block_size, C), idx (B, T) int -> out (B, T, C)
    idx = np.ascontiguousarray(idx)
    out = empty(idx.shape + (wte.shape[1],), wte.dtype)
    _embedding_forward(wte, wpe, idx, out)
    return out, (idx, wte.shape[0], wpe.shape[0])


@jit
def _embedding_backward(dout, idx, dwte, dwpe):
    B, T, C = dout.shape
    for b in range(B):
        for t in range(T):
            d, row, pos = dout[b, t], dwte[idx[b, t]], dwpe[t]
            for c in range(C):
                row[c] += d[c]
                pos[c] += d[c]


def embedding_backward(dout, cache):
    # dout (B, T, C) -> (None, dwte (V, C), dwpe (block_size, C)): scatter-add, as the reference
    idx, vocab_size, block_size = cache
    C = dout.shape[-1]
    dwte = np.zeros((vocab_size, C), dtype=dout.dtype)
    dwpe = np.zeros((block_size, C), dtype=dout.dtype)
    _embedding_backward(np.ascontiguousarray(dout), idx, dwte, dwpe)
    return None, dwte, dwpe


# --------------------------------------------------------------------------------------------
# RMSNorm: out = g * x * r, r = (mean(x^2) + eps)^-1/2. Backward needs xhat = x * r; the
# model keeps `out` anyway (the next matmul's input), so the cache is (out, r) and backward
# recovers xhat = out / g: one (N, C) array less per norm than keeping x or xhat. (If a gain
# is 0 or tiny, out / g would lose xhat, and the cache keeps x instead.)
#   dx = r * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dout * g,  dg = sum(dout * xhat)

class RMSNormCache(NamedTuple):
    xhat_source: np.ndarray   # (N, C): the output (scales 1 and 1/g), or x (scales r and 1)
    row_scale: np.ndarray     # (N,)   xhat = xhat_source * row_scale[:, None] * col_scale
    col_scale: np.ndarray     # (C,)
    rstd: np.ndarray          # (N,)   r = 1/rms of each row
    g: np.ndarray             # (C,)   the gain


@pjit
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


def rmsnorm_forward(x, g, eps, *, empty=np.empty):
    # x (..., C), g (C,) -> out (..., C)
    x2 = rows(x)
    out = empty(x2.shape, x2.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _rmsnorm_forward(x2, g, x.dtype.type(eps), out, rstd)
    if np.all(np.abs(g) > 1e-6):
        cache = RMSNormCache(out, np.ones_like(rstd), (1 / g).astype(g.dtype), rstd, g)
    else:
        cache = RMSNormCache(x2, rstd, np.ones_like(g), rstd, g)
    return out.reshape(x.shape), cache


@pjit
def _rmsnorm_backward(dout, g, xhat_source, row_scale, col_scale, rstd, dx, dg_parts):
    N, C = xhat_source.shape
    chunk = (N + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        for i in range(k * chunk, min(N, (k + 1) * chunk)):
            r, s = rstd[i], row_scale[i]
            dot = r * 0                                        # sum(dxhat * xhat)
            for c in range(C):
                xhat = xhat_source[i, c] * s * col_scale[c]
                dot += dout[i, c] * g[c] * xhat
                dg_parts[k, c] += dout[i, c] * xhat
            mean = dot / C
            for c in range(C):
                xhat = xhat_source[i, c] * s * col_scale[c]
                dx[i, c] = r * (dout[i, c] * g[c] - xhat * mean)


def rmsnorm_backward(dout, cache, *, empty=np.empty):
    # dout (..., C) -> (dx (..., C), dg (C,))
    d2 = rows(dout)
    dx = empty(d2.shape, d2.dtype)
    dg_parts = np.zeros((CHUNKS, cache.xhat_source.shape[1]), dtype=cache.xhat_source.dtype)
    _rmsnorm_backward(d2, cache.g, cache.xhat_source, cache.row_scale, cache.col_scale,
                      cache.rstd, dx, dg_parts)
    return dx.reshape(dout.shape), dg_parts.sum(axis=0)


# --------------------------------------------------------------------------------------------
# Squared ReLU: out = relu(x)^2, dx = 2 relu(x) dout. The cache is the output itself, (N, D)
# (the model keeps it anyway for the next matmul's backward), since relu(x) = sqrt(out).

@pjit
def _squared_relu_forward(x, out):
    N, D = x.shape
    for i in prange(N):
        for c in range(D):
            r = max(x[i, c], 0)
            out[i, c] = r * r


def squared_relu_forward(x, *, empty=np.empty):
    # x (..., D) -> out (..., D)
    x2 = rows(x)
    out = empty(x2.shape, x2.dtype)
    _squared_relu_forward(x2, out)
    return out.reshape(x.shape), out


@pjit
def _squared_relu_backward(dout, out, dx):
    N, D = out.shape
    for i in prange(N):
        for c in range(D):
            dx[i, c] = 2 * math.sqrt(out[i, c]) * dout[i, c]


def squared_relu_backward(dout, out, *, empty=np.empty):
    d2 = rows(dout)
    dx = empty(d2.shape, d2.dtype)
    _squared_relu_backward(d2, out, dx)
    return (dx.reshape(dout.shape),)


# --------------------------------------------------------------------------------------------
# LayerNorm (GPT-2's): out = g * xhat + b, xhat = (x - mean) * r, r = (var + eps)^-1/2, one
# pass per row for the statistics and one for the output. The cache is xhat and r.
#   dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * g

@pjit
def _layernorm_forward(x, g, b, eps, out, xhat, rstd):
    N, C = x.shape
    one = x.dtype.type(1.0)
    for i in prange(N):
        s = x[i, 0] * 0
        for c in range(C):
            s += x[i, c]
        mu = s / C
        ss = x[i, 0] * 0
        for c in range(C):
            d = x[i, c] - mu
            ss += d * d
        r = one / math.sqrt(ss / C + eps)
        rstd[i] = r
        for c in range(C):
            h = (x[i, c] - mu) * r
            xhat[i, c] = h
            out[i, c] = h * g[c] + b[c]


def layernorm_forward(x, g, b, eps, *, empty=np.empty):
    # x (..., C), g (C,), b (C,) -> out (..., C)
    x2 = rows(x)
    out, xhat = empty(x2.shape, x2.dtype), empty(x2.shape, x2.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _layernorm_forward(x2, g, b, x.dtype.type(eps), out, xhat, rstd)
    return out.reshape(x.shape), (xhat, rstd, g)


@pjit
def _layernorm_backward(dout, g, xhat, rstd, dx, dg_parts, db_parts):
    N, C = xhat.shape
    chunk = (N + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        for i in range(k * chunk, min(N, (k + 1) * chunk)):
            s = rstd[i] * 0                                    # sum(dxhat)
            dot = rstd[i] * 0                                  # sum(dxhat * xhat)
            for c in range(C):
                dh = dout[i, c] * g[c]
                s += dh
                dot += dh * xhat[i, c]
                dg_parts[k, c] += dout[i, c] * xhat[i, c]
                db_parts[k, c] += dout[i, c]
            mean, mean_dot, r = s / C, dot / C, rstd[i]
            for c in range(C):
                dx[i, c] = r * (dout[i, c] * g[c] - mean - xhat[i, c] * mean_dot)


def layernorm_backward(dout, cache, *, empty=np.empty):
    # dout (..., C) -> (dx (..., C), dg (C,), db (C,))
    xhat, rstd, g = cache
    d2 = rows(dout)
    dx = empty(d2.shape, d2.dtype)
    dg_parts = np.zeros((CHUNKS, xhat.shape[1]), dtype=xhat.dtype)
    db_parts = np.zeros_like(dg_parts)
    _layernorm_backward(d2, g, xhat, rstd, dx, dg_parts, db_parts)
    return dx.reshape(dout.shape), dg_parts.sum(axis=0), db_parts.sum(axis=0)


# --------------------------------------------------------------------------------------------
# GELU, tanh approximation: one pass each way instead of NumPy's ~10 (the (N, 4C) activation
# is the block's widest array). The cache is x; backward recomputes tanh(u).

_GELU_SCALE, _GELU_CUBIC = reference.GELU_SCALE, reference.GELU_CUBIC


@pjit
def _gelu_forward(x, out):
    N, D = x.shape
    half, one = x.dtype.type(0.5), x.dtype.type(1.0)
    k, a = x.dtype.type(_GELU_SCALE), x.dtype.type(_GELU_CUBIC)
    for i in prange(N):
        for c in range(D):
            v = x[i, c]
            out[i, c] = half * v * (one + math.tanh(k * (v + a * v * v * v)))


def gelu_forward(x, *, empty=np.empty):
    # x (..., D) -> out (..., D)
    x2 = rows(x)
    out = empty(x2.shape, x2.dtype)
    _gelu_forward(x2, out)
    return out.reshape(x.shape), x2


@pjit
def _gelu_backward(dout, x, dx):
    N, D = x.shape
    half, one, three = x.dtype.type(0.5), x.dtype.type(1.0), x.dtype.type(3.0)
    k, a = x.dtype.type(_GELU_SCALE), x.dtype.type(_GELU_CUBIC)
    for i in prange(N):
        for c in range(D):
            v = x[i, c]
            t = math.tanh(k * (v + a * v * v * v))
            du = k * (one + three * a * v * v)
            dx[i, c] = dout[i, c] * (half * (one + t) + half * v * (one - t * t) * du)


def gelu_backward(dout, x, *, empty=np.empty):
    d2 = rows(dout)
    dx = empty(d2.shape, d2.dtype)
    _gelu_backward(d2, x, dx)
    return (dx.reshape(dout.shape),)


# --------------------------------------------------------------------------------------------
# The residual add after (inverted) dropout: out = x + dropout(fx). The keep mask is the
# reference's hash of each element's flat index (reference.dropout_keep), computed here in
# parallel and never stored: the cache is the mask's key (with the row offset of a slice of a
# bigger batch, reference.row_offset), and backward hashes the indices again. Kept units are
# scaled by 1/(1-p) in x's precision, so the dropped units and the gradients match the
# reference bit for bit.

class DropoutKey(NamedTuple):
    k0: np.uint32             # the two keys of the hash
    k1: np.uint32
    threshold: np.uint32      # hashes below it are dropped
    scale: np.floating        # 1 / (1 - p), in the data's dtype
    offset: np.int64          # the flat index of this slice's first element in the batch


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


@pjit
def _dropout(src, k0, k1, threshold, scale, offset, out):
    # out = src * keep * scale; all arrays flat (n,)
    for i in prange(src.size):
        out[i] = src[i] * scale if _kept(offset + i, k0, k1, threshold) else 0


@pjit
def _residual_dropout(x, fx, k0, k1, threshold, scale, offset, out):
    # out = x + fx * keep * scale; all arrays flat (n,)
    for i in prange(fx.size):
        out[i] = x[i] + fx[i] * scale if _kept(offset + i, k0, k1, threshold) else x[i]


def _dropout_key(x, p, rng, row0):
    offset = reference.row_offset(x.shape, row0)
    reference.check_dropout_size(offset + x.size)
    k0, k1 = reference.dropout_key(rng)
    return DropoutKey(np.uint32(k0), np.uint32(k1), np.uint32(reference.dropout_threshold(p)),
                      x.dtype.type(1.0 / (1.0 - p)), np.int64(offset))


def residual_dropout_forward(x, fx, p, rng, row0=0, *, empty=np.empty):
    # x, fx (B, T, C) -> x + dropout(fx) in one pass; cache: the mask's key (None: no dropout).
    # row0: these are rows row0.. of a bigger batch (reference.dropout_keep)
    if p == 0.0 or rng is None:
        return np.add(x, fx, out=empty(np.broadcast_shapes(x.shape, fx.shape),
                                       np.result_type(x, fx))), None
    key = _dropout_key(fx, p, rng, row0)
    out = empty(fx.shape, fx.dtype)
    _residual_dropout(flat(x), flat(fx), *key, out.reshape(-1))
    return out, key


def residual_dropout_backward(dout, key, *, empty=np.empty):
    # -> (dx = dout, dfx = dout * keep * scale)
    if key is None:
        return dout, dout
    dfx = empty(dout.shape, dout.dtype)
    _dropout(flat(dout), *key, dfx.reshape(-1))
    return dout, dfx


# --------------------------------------------------------------------------------------------
# Cross-entropy: loss = mean over kept positions of lse(logits) - logits[target]; a negative
# target is left out (as in the reference). Backward: (softmax - onehot) / N_kept, from the
# logits and one log-sum-exp per row (no probability matrix is kept).

class CrossEntropyCache(NamedTuple):
    logits: np.ndarray        # (N, V)
    lse: np.ndarray           # (N,) float64: log sum exp of each row
    targets: np.ndarray       # (N,) int, negative = ignored
    kept: int                 # positions with a target (>= 1)
    logits_shape: tuple       # (B, T, V)


@pjit
def _cross_entropy_forward(logits, targets, lse, losses):
    N, V = logits.shape
    for i in prange(N):
        m = logits[i, 0]
        for v in range(1, V):
            m = max(m, logits[i, v])
        total = logits[i, 0] * 0
        for v in range(V):
            total += exp_nonpositive(logits[i, v] - m)
        lse[i] = m + math.log(total)
        tgt = targets[i]
        losses[i] = lse[i] - logits[i, tgt] if tgt >= 0 else 0


def cross_entropy_forward(logits, targets):
    # logits (B, T, V), targets (B, T) int -> scalar loss
    flat_logits = rows(logits)
    tflat = flat(targets)
    lse = np.empty(flat_logits.shape[0], dtype=np.float64)
    losses = np.empty(flat_logits.shape[0], dtype=np.float64)
    _cross_entropy_forward(flat_logits, tflat, lse, losses)
    kept = max(int((tflat >= 0).sum()), 1)
    return losses.sum() / kept, CrossEntropyCache(flat_logits, lse, tflat, kept, logits.shape)


@pjit
def _cross_entropy_backward(logits, lse, targets, scale, dlogits):
    N, V = logits.shape
    for i in prange(N):
        tgt = targets[i]
        if tgt < 0:
            dlogits[i, :] = 0
            continue
        lse_i = logits.dtype.type(lse[i])                 # logits' precision: the fast exp
        for v in range(V):
            dlogits[i, v] = exp_nonpositive(logits[i, v] - lse_i) * scale
        dlogits[i, tgt] -= scale


def cross_entropy_backward(dloss, cache, *, empty=np.empty):
    # dloss (scalar, 1.0 for the loss itself) -> (dlogits (B, T, V),)
    dlogits = empty(cache.logits.shape, cache.logits.dtype)
    _cross_entropy_backward(cache.logits, cache.lse, cache.targets, float(dloss) / cache.kept,
                            dlogits)
    return (dlogits.reshape(cache.logits_shape),)
