"""GPU twins of the hot ops, as numba-cuda kernels: attention, squared ReLU, residual +
dropout, cross-entropy, AdamW. Each returns what its reference twin (ops/reference.py)
returns, to float32 round-off; caches differ (attention keeps one log-sum-exp per row, not
the (B, H, T, T) probabilities; dropout keeps its key, not a mask).

Why numba-cuda and not CuPy RawKernel CUDA C: a RawKernel's source can only be compiled and
run by a GPU, so on a machine without one it is untested text. numba-cuda kernels are
Python functions that numba compiles for the GPU, and that its simulator
(NUMBA_ENABLE_CUDASIM=1) runs, thread by thread, on the CPU: every kernel here is executed
and checked against the reference in CI (tests/sim_kernels.py, on tiny shapes, because the
simulator runs each GPU thread as a Python thread). On a GPU the kernels take CuPy arrays
directly (__cuda_array_interface__: no copies) and run on the legacy default stream, the one
CuPy uses, so kernel and CuPy work stay in order without host synchronisation; numba's
per-launch stream sync of imported arrays is switched off (CUDA_ARRAY_INTERFACE_SYNC = 0)
for that reason.

The kernels are the simple forms, one GPU thread per row or element, not tiled: attention
is the FlashAttention-2 recurrence (online softmax forward; backward recomputes the
probabilities from the saved log-sum-exp: one kernel for dq by query row, one for dk, dv by
key row) without shared-memory tiling. What they cost on a GPU is unmeasured so far.
"""
from __future__ import annotations

import math
import os
from functools import partial

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")

import numpy as np  # noqa: E402
from numba import cuda, float32  # noqa: E402

from ..reference import (array_module, check_dropout_size, dropout_key,  # noqa: E402
                         dropout_threshold, row_offset)

for _config in ("numba.cuda.core.config", "numba.core.config"):   # numba-cuda's, numba's own:
    try:                                 # read at launch time; the env default may come late
        __import__(_config, fromlist=["_"]).CUDA_ARRAY_INTERFACE_SYNC = 0
    except ImportError:
        pass

SIMULATED = bool(getattr(cuda, "simulator_enabled", False)) or os.environ.get(
    "NUMBA_ENABLE_CUDASIM") == "1"
# compiled kernels are cached on disk (beside this file) on a GPU; the simulator compiles nothing
jit = cuda.jit if SIMULATED else partial(cuda.jit, cache=True)
THREADS = 32 if SIMULATED else 256     # threads per block of the 1-D kernels
ROW_THREADS = 32                       # threads per row of cross-entropy (a shared reduction)
MAX_HEAD_SIZE = 256                    # attention keeps a head's accumulators in registers
U32 = np.uint64(0xFFFFFFFF)
MIX1, MIX2 = np.uint64(0x7FEB352D), np.uint64(0x846CA68B)


def _blocks(n):
    return max(1, (n + THREADS - 1) // THREADS)


# --------------------------------------------------------------------------------------------
# Attention: one thread per (b, h, t) row; qkv (B, T, 3C), out (B, T, C), lse (B, H, T)

@jit
def _attention_forward(qkv, out, lse, n_head, scale):
    i = cuda.grid(1)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    if i >= B * n_head * T:
        return
    t, h, b = i % T, (i // T) % n_head, i // (T * n_head)
    q0, k0, v0 = h * hs, C + h * hs, 2 * C + h * hs
    acc = cuda.local.array(MAX_HEAD_SIZE, float32)
    for d in range(hs):
        acc[d] = 0.0
    m, l = -math.inf, 0.0                    # running max and sum of exp(score - m)
    for s in range(t + 1):                   # causal: keys 0..t
        score = 0.0
        for d in range(hs):
            score += qkv[b, t, q0 + d] * qkv[b, s, k0 + d]
        score *= scale
        if score > m:                        # rescale what was summed under the old max
            corr = math.exp(m - score)
            l *= corr
            for d in range(hs):
                acc[d] *= corr
            m = score
        p = math.exp(score - m)
        l += p
        for d in range(hs):
            acc[d] += p * qkv[b, s, v0 + d]
    for d in range(hs):
        out[b, t, q0 + d] = acc[d] / l
    lse[b, h, t] = m + math.log(l)


@jit
def _attention_backward_dq(qkv, dout, lse, D, dqkv, n_head, scale):
    # dq_t = scale * sum_s dS_ts k_s,  dS_ts = P_ts (dy_t . v_s - D_t),  P_ts = exp(S_ts - lse_t)
    i = cuda.grid(1)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    if i >= B * n_head * T:
        return
    t, h, b = i % T, (i // T) % n_head, i // (T * n_head)
    q0, k0, v0 = h * hs, C + h * hs, 2 * C + h * hs
    acc = cuda.local.array(MAX_HEAD_SIZE, float32)
    for d in range(hs):
        acc[d] = 0.0
    for s in range(t + 1):
        score, dp = 0.0, 0.0
        for d in range(hs):
            score += qkv[b, t, q0 + d] * qkv[b, s, k0 + d]
            dp += dout[b, t, q0 + d] * qkv[b, s, v0 + d]
        ds = math.exp(score * scale - lse[b, h, t]) * (dp - D[b, h, t])
        for d in range(hs):
            acc[d] += ds * qkv[b, s, k0 + d]
    for d in range(hs):
        dqkv[b, t, q0 + d] = acc[d] * scale


@jit
def _attention_backward_dkv(qkv, dout, lse, D, dqkv, n_head, scale):
    # for key row s: dv_s = sum_{t>=s} P_ts dy_t,  dk_s = scale * sum_{t>=s} dS_ts q_t
    i = cuda.grid(1)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    if i >= B * n_head * T:
        return
    s, h, b = i % T, (i // T) % n_head, i // (T * n_head)
    q0, k0, v0 = h * hs, C + h * hs, 2 * C + h * hs
    dk = cuda.local.array(MAX_HEAD_SIZE, float32)
    dv = cuda.local.array(MAX_HEAD_SIZE, float32)
    for d in range(hs):
        dk[d] = 0.0
        dv[d] = 0.0
    for t in range(s, T):
        score, dp = 0.0, 0.0
        for d in range(hs):
            score += qkv[b, t, q0 + d] * qkv[b, s, k0 + d]
            dp += dout[b, t, q0 + d] * qkv[b, s, v0 + d]
        p = math.exp(score * scale - lse[b, h, t])
        ds = p * (dp - D[b, h, t])
        for d in range(hs):
            dv[d] += p * dout[b, t, q0 + d]
            dk[d] += ds * qkv[b, t, q0 + d]
    for d in range(hs):
        dqkv[b, s, k0 + d] = dk[d] * scale
        dqkv[b, s, v0 + d] = dv[d]


def attention_forward(qkv, n_head):
    # qkv (B, T, 3C) -> out (B, T, C); cache qkv, out and the log-sum-exp of each row
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    if hs > MAX_HEAD_SIZE:
        raise ValueError(f"head size {hs} exceeds the GPU attention kernel's {MAX_HEAD_SIZE}")
    qkv = xp.ascontiguousarray(qkv)
    out = xp.empty((B, T, C3 // 3), dtype=qkv.dtype)
    lse = xp.empty((B, n_head, T), dtype=xp.float32)
    n = B * n_head * T
    _attention_forward[_blocks(n), THREADS](qkv, out, lse, n_head, np.float32(1 / math.sqrt(hs)))
    return out, (qkv, out, lse, n_head)


def attention_backward(dout, cache):
    # D_t = dy_t . y_t (= sum_s P_ts dy_t . v_s), the softmax's row term, per head
    qkv, out, lse, n_head = cache
    xp = array_module(dout)
    B, T, C = dout.shape
    hs = C // n_head
    dout = xp.ascontiguousarray(dout)
    D = xp.ascontiguousarray((dout * out).reshape(B, T, n_head, hs).sum(axis=-1)
                             .transpose(0, 2, 1))                            # (B, H, T)
    dqkv = xp.empty_like(qkv)
    n, scale = B * n_head * T, np.float32(1 / math.sqrt(hs))
    _attention_backward_dq[_blocks(n), THREADS](qkv, dout, lse, D, dqkv, n_head, scale)
    _attention_backward_dkv[_blocks(n), THREADS](qkv, dout, lse, D, dqkv, n_head, scale)
    return (dqkv,)


# --------------------------------------------------------------------------------------------
# Squared ReLU on flat views: out = relu(x)^2, dx = 2 relu(x) dout; the cache is x

@jit
def _squared_relu_forward(x, out):
    i = cuda.grid(1)
    if i < x.size:
        r = max(x[i], 0.0)
        out[i] = r * r


@jit
def _squared_relu_backward(x, dout, dx):
    i = cuda.grid(1)
    if i < x.size:
        dx[i] = 2.0 * max(x[i], 0.0) * dout[i]


def squared_relu_forward(x):
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x)
    _squared_relu_forward[_blocks(x.size), THREADS](x.reshape(-1), out.reshape(-1))
    return out, x


def squared_relu_backward(dout, x):
    xp = array_module(dout)
    dout = xp.ascontiguousarray(dout)
    dx = xp.empty_like(x)
    _squared_relu_backward[_blocks(x.size), THREADS](x.reshape(-1), dout.reshape(-1),
                                                     dx.reshape(-1))
    return (dx,)


# --------------------------------------------------------------------------------------------
# Residual + dropout: out = x + fx * keep / (1 - p), keep from the reference's keyed hash of
# each element's flat index (so the mask is the reference's, rebuilt in backward, not stored)

@jit(device=True)
def _mix32(h):
    # lowbias32 on a uint64 holding 32 bits; products of two 32-bit values fit in 64 bits
    h ^= h >> np.uint64(16)
    h = (h * MIX1) & U32
    h ^= h >> np.uint64(15)
    h = (h * MIX2) & U32
    h ^= h >> np.uint64(16)
    return h


@jit(device=True)
def _kept(i, k0, k1, threshold):
    h = _mix32(np.uint64(i) ^ k0)
    return _mix32(h ^ k1) >= threshold


@jit
def _residual_dropout_forward(x, fx, out, offset, k0, k1, threshold, scale):
    i = cuda.grid(1)
    if i < x.size:
        kept = _kept(offset + np.uint64(i), k0, k1, threshold)
        out[i] = x[i] + fx[i] * scale if kept else x[i]


@jit
def _dropout_backward(dout, dfx, offset, k0, k1, threshold, scale):
    i = cuda.grid(1)
    if i < dout.size:
        dfx[i] = dout[i] * scale if _kept(offset + np.uint64(i), k0, k1, threshold) else 0.0


def residual_dropout_forward(x, fx, p, rng, row0=0):
    # rng: the host's NumPy Generator (two integers a step: no device round trip); row0: the
    # slice's first row in the whole batch (the mask of a row is the same on every rank)
    if p == 0.0 or rng is None:
        return x + fx, None
    xp = array_module(x)
    offset = row_offset(x.shape, row0)
    check_dropout_size(offset + x.size)
    key = dropout_key(rng)
    x, fx = xp.ascontiguousarray(x), xp.ascontiguousarray(fx)
    out = xp.empty_like(x)
    _residual_dropout_forward[_blocks(x.size), THREADS](
        x.reshape(-1), fx.reshape(-1), out.reshape(-1), np.uint64(offset),
        *_dropout_args(key, p, x.dtype))
    return out, (key, p, offset)


def residual_dropout_backward(dout, cache):
    if cache is None:
        return dout, dout
    xp = array_module(dout)
    key, p, offset = cache
    dout = xp.ascontiguousarray(dout)
    dfx = xp.empty_like(dout)
    _dropout_backward[_blocks(dout.size), THREADS](dout.reshape(-1), dfx.reshape(-1),
                                                   np.uint64(offset),
                                                   *_dropout_args(key, p, dout.dtype))
    return dout, dfx


def _dropout_args(key, p, dtype):
    return (np.uint64(key[0]), np.uint64(key[1]), np.uint64(dropout_threshold(p)),
            dtype.type(1.0 / (1.0 - p)))


# --------------------------------------------------------------------------------------------
# Cross-entropy: one block of ROW_THREADS per row of logits (N, V) reduces its max and its
# sum of exponentials in shared memory; loss_n = lse_n - logit[n, target_n] (0 if ignored)

@jit(device=True)
def _block_reduce(buf, value, is_max):
    j = cuda.threadIdx.x
    buf[j] = value
    cuda.syncthreads()
    step = ROW_THREADS // 2
    while step > 0:
        if j < step:
            buf[j] = max(buf[j], buf[j + step]) if is_max else buf[j] + buf[j + step]
        cuda.syncthreads()
        step //= 2
    result = buf[0]
    cuda.syncthreads()
    return result


@jit
def _cross_entropy_forward(logits, targets, lse, losses):
    n = cuda.blockIdx.x
    j0 = cuda.threadIdx.x
    V = logits.shape[1]
    buf = cuda.shared.array(ROW_THREADS, float32)
    m = -math.inf
    for j in range(j0, V, ROW_THREADS):
        m = max(m, logits[n, j])
    m = _block_reduce(buf, m, True)
    s = 0.0
    for j in range(j0, V, ROW_THREADS):
        s += math.exp(logits[n, j] - m)
    s = _block_reduce(buf, s, False)
    if j0 == 0:
        row_lse = m + math.log(s)
        lse[n] = row_lse
        t = targets[n]
        losses[n] = row_lse - logits[n, t] if t >= 0 else 0.0


@jit
def _cross_entropy_backward(logits, targets, lse, scale, dlogits):
    # dlogits = scale * (softmax - onehot(target)), 0 on ignored rows; scale = dloss / count
    i = cuda.grid(1)
    N, V = logits.shape
    if i >= N * V:
        return
    n, j = i // V, i % V
    t = targets[n]
    if t < 0:
        dlogits[n, j] = 0.0
    else:
        p = math.exp(logits[n, j] - lse[n])
        dlogits[n, j] = scale[0] * (p - 1.0 if j == t else p)


def cross_entropy_forward(logits, targets):
    # logits (B, T, V), targets (B, T) -> the mean loss as a 0-d array of logits' module (no
    # host round trip: the caller converts it when it logs it)
    xp = array_module(logits)
    V = logits.shape[-1]
    flat = xp.ascontiguousarray(logits).reshape(-1, V)
    tflat = xp.ascontiguousarray(xp.asarray(targets).reshape(-1))
    N = flat.shape[0]
    lse = xp.empty(N, dtype=xp.float32)
    losses = xp.empty(N, dtype=xp.float32)
    _cross_entropy_forward[N, ROW_THREADS](flat, tflat, lse, losses)
    count = xp.maximum((tflat >= 0).sum(), 1).astype(xp.float32)
    return losses.sum(dtype=xp.float32) / count, (flat, tflat, lse, count, logits.shape)


def cross_entropy_backward(dloss, cache):
    flat, tflat, lse, count, shape = cache
    xp = array_module(flat)
    scale = (xp.asarray(dloss, dtype=xp.float32) / count).reshape(1)
    dlogits = xp.empty_like(flat)
    _cross_entropy_backward[_blocks(flat.size), THREADS](flat, tflat, lse, scale, dlogits)
    return (dlogits.reshape(shape),)


# --------------------------------------------------------------------------------------------
# AdamW: one thread per element of the flat buffers (the formula: reference.adamw_update)

@jit
def _adamw(params, grad, m, v, decay_mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
           eps, weight_decay, m_hat_scale, v_hat_scale):
    i = cuda.grid(1)
    if i < params.size:
        g = grad[i]
        mi = beta1 * m[i] + one_minus_beta1 * g
        vi = beta2 * v[i] + one_minus_beta2 * g * g
        m[i] = mi
        v[i] = vi
        update = (mi * m_hat_scale) / (math.sqrt(vi * v_hat_scale) + eps)
        params[i] -= lr * (update + weight_decay * decay_mask[i] * params[i])


def adamw_update(params, grad, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, t):
    f = np.float32
    _adamw[_blocks(params.size), THREADS](
        params, grad, m, v, decay_mask, f(lr), f(beta1), f(1 - beta1), f(beta2), f(1 - beta2),
        f(eps), f(weight_decay), f(1.0 / (1 - beta1 ** t)), f(1.0 / (1 - beta2 ** t)))
