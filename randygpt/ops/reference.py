"""The readable reference of every layer: a forward and a backward function, side by side.

Shapes: B batch, T time (positions), C channels, H heads, hs = C // H head size, V vocabulary.
Each `*_forward` returns its output and whatever its backward needs (the "cache"); each
`*_backward` takes the upstream gradient `dout` (same shape as the output) and returns the
gradients of the inputs and parameters. The derivation of each gradient is in the comments.

Nothing here imports a model or knows about one. Every function takes its array module from
its inputs (`array_module`), so NumPy arrays run on the CPU and CuPy arrays would run on a GPU
unchanged. There are no Python loops over batch items or positions: fast kernels replace these
functions on the hot path and are tested against them.
"""
from __future__ import annotations

import math

import numpy as np


def array_module(x):
    """NumPy for NumPy arrays; CuPy for CuPy arrays (without importing CuPy otherwise)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


# --------------------------------------------------------------------------------------------
# Embedding: out[b, t] = wte[idx[b, t]] + wpe[t]

def embedding_forward(wte, wpe, idx):
    # wte (V, C), wpe (block_size, C), idx (B, T) int -> out (B, T, C)
    T = idx.shape[1]
    return wte[idx] + wpe[:T]


def embedding_backward(dout, idx, vocab_size, block_size):
    # dout (B, T, C) -> dwte (V, C), dwpe (block_size, C)
    # d/dwte[v] sums dout over every (b, t) where idx == v; d/dwpe[t] sums dout over b.
    xp = array_module(dout)
    B, T, C = dout.shape
    dwte = xp.zeros((vocab_size, C), dtype=dout.dtype)
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))
    dwpe = xp.zeros((block_size, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


# --------------------------------------------------------------------------------------------
# RMSNorm: out = g * x / rms(x),  rms(x) = sqrt(mean(x^2) + eps), over the last axis

def rmsnorm_forward(x, g, eps=1e-5):
    # x (..., C), g (C,) -> out (..., C); cache the normalised x and 1/rms
    xp = array_module(x)
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = x * rstd
    return xhat * g, (xhat, rstd)


def rmsnorm_backward(dout, g, cache):
    # With xhat = x * r, r = (mean(x^2) + eps)^-1/2:  dr/dx_j = -r^3 x_j / C, so
    # dx = r * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dout * g,  dg = sum(dout * xhat).
    xhat, rstd = cache
    C = xhat.shape[-1]
    dg = (dout * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dout * g
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg


# --------------------------------------------------------------------------------------------
# Linear (no bias): out = x @ W, W stored (in, out)

def linear_forward(x, w):
    # x (..., IN), w (IN, OUT) -> out (..., OUT)
    return x @ w


def linear_backward(dout, x, w):
    # dx = dout @ W^T ;  dW = sum over all leading positions of x^T dout
    IN, OUT = w.shape
    dx = dout @ w.T
    dw = x.reshape(-1, IN).T @ dout.reshape(-1, OUT)
    return dx, dw


# --------------------------------------------------------------------------------------------
# Causal multi-head self-attention on a fused qkv tensor

def attention_forward(qkv, n_head):
    # qkv (B, T, 3C) -> out (B, T, C). Per head: att = softmax(mask(q k^T / sqrt(hs))), y = att v
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = (qkv[:, :, i * C:(i + 1) * C].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
               for i in range(3))                                      # each (B, H, T, hs)
    scale = 1.0 / math.sqrt(hs)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale                     # (B, H, T, T)
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)                 # True above the diagonal
    scores = xp.where(future, -xp.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)               # stable softmax
    att = xp.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)                             # (B, H, T, T)
    y = att @ v                                                        # (B, H, T, hs)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    return out, (q, k, v, att)


def attention_backward(dout, cache):
    # y = P v:           dP = dy v^T,  dv = P^T dy
    # P = softmax(S):    dS = P * (dP - sum_j(dP * P))   (masked entries have P = 0, so dS = 0)
    # S = q k^T * s:     dq = dS k * s,  dk = dS^T q * s
    xp = array_module(dout)
    q, k, v, att = cache
    B, H, T, hs = q.shape
    C = H * hs
    dy = dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3)               # (B, H, T, hs)
    dv = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)                                # (B, H, T, T)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    scale = 1.0 / math.sqrt(hs)
    dq = (dscores @ k) * scale
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale
    dqkv = xp.empty((B, T, 3 * C), dtype=dout.dtype)
    for i, d in enumerate((dq, dk, dv)):                               # 3 slices, not a data loop
        dqkv[:, :, i * C:(i + 1) * C] = d.transpose(0, 2, 1, 3).reshape(B, T, C)
    return dqkv


# --------------------------------------------------------------------------------------------
# Squared ReLU: out = relu(x)^2

def squared_relu_forward(x):
    # x (..., D) -> out (..., D); d/dx relu(x)^2 = 2 relu(x)
    xp = array_module(x)
    r = xp.maximum(x, 0)
    return r * r, r


def squared_relu_backward(dout, r):
    return 2.0 * r * dout


# --------------------------------------------------------------------------------------------
# Dropout (inverted): out = x * keep / (1 - p); backward uses the same mask.
#
# The keep mask is a hash of each element's flat index under a key drawn from `rng`, not a
# stream of random numbers: any implementation (this one, a parallel kernel, a GPU) makes the
# same mask from the same key, in any order, and a backward kernel can rebuild it instead of
# storing it. The hash is two rounds of lowbias32 (C. Wellons' integer hash, a bijection of
# uint32 with near-ideal avalanche), keyed before each round: h = mix(mix(i ^ k0) ^ k1).
# An element is kept when h >= p * 2^32, i.e. with probability 1 - p (to 2^-32).

def dropout_key(rng):
    """Two 32-bit keys drawn from a NumPy (or CuPy) Generator: one mask's worth of randomness."""
    k0, k1 = rng.integers(0, 1 << 32, size=2, dtype=np.uint64)
    return int(k0), int(k1)


def dropout_threshold(p):
    """Hashes below this are dropped: round(p * 2^32), as a uint32."""
    return min(round(p * 2.0 ** 32), 2 ** 32 - 1)


def mix32(h):
    # lowbias32 on a uint32 array, in place: shifts and multiplies wrap modulo 2^32
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


def check_dropout_size(n):
    """The hash numbers elements with 32-bit indices."""
    if n > 1 << 32:
        raise ValueError(f"dropout hashes 32-bit indices: {n} elements is too many")


def dropout_keep(key, shape, p, xp=np):
    """The keep mask (bools of `shape`) that `key` gives at drop probability p."""
    k0, k1 = key
    n = math.prod(shape)
    check_dropout_size(n)
    h = xp.arange(n, dtype=xp.uint32)
    h ^= xp.uint32(k0)
    h = mix32(h)
    h ^= xp.uint32(k1)
    h = mix32(h)
    return (h >= xp.uint32(dropout_threshold(p))).reshape(shape)


def dropout_forward(x, p, rng):
    # rng: a Generator of x's array module; p == 0 or rng None -> identity, no mask
    if p == 0.0 or rng is None:
        return x, None
    keep = dropout_keep(dropout_key(rng), x.shape, p, array_module(x))
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, mask):
    return dout if mask is None else dout * mask


# --------------------------------------------------------------------------------------------
# Residual: out = x + f(x); the gradient flows unchanged into both branches

def residual_forward(x, fx):
    return x + fx


def residual_backward(dout):
    return dout, dout


# --------------------------------------------------------------------------------------------
# Residual after dropout, as each block half ends: out = x + dropout(f(x)). Only the
# composition of the two layers above; fused kernels do it in one pass.

def residual_dropout_forward(x, fx, p, rng):
    dropped, mask = dropout_forward(fx, p, rng)
    return residual_forward(x, dropped), mask


def residual_dropout_backward(dout, mask):
    dx, ddropped = residual_backward(dout)
    return dx, dropout_backward(ddropped, mask)


# --------------------------------------------------------------------------------------------
# Cross-entropy: loss = mean over all (b, t) of -log softmax(logits)[target]. A negative
# target (data.IGNORE: padding after a short document) is left out of the mean and the gradient.

def cross_entropy_forward(logits, targets):
    # logits (B, T, V), targets (B, T) int -> scalar loss; cache the softmax probabilities
    xp = array_module(logits)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    shifted = flat - flat.max(axis=-1, keepdims=True)
    logsumexp = xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    logprobs = shifted - logsumexp
    rows = xp.arange(flat.shape[0])
    tflat = targets.reshape(-1)
    if (tflat < 0).any():
        keep = tflat >= 0
        loss = -logprobs[rows[keep], tflat[keep]].sum() / max(int(keep.sum()), 1)
    else:
        loss = -logprobs[rows, tflat].mean()
    return loss, (xp.exp(logprobs), tflat)


def cross_entropy_backward(cache, logits_shape, dloss=1.0):
    # d loss / d logits = (softmax - onehot(target)) / N, N = number of positions
    # (ignored positions: gradient 0, and N counts only the kept ones)
    xp = array_module(cache[0])
    probs, tflat = cache
    N = probs.shape[0]
    dlogits = probs.copy()
    if (tflat < 0).any():
        keep = tflat >= 0
        dlogits[~keep] = 0.0
        dlogits[xp.arange(N)[keep], tflat[keep]] -= 1.0
        dlogits *= dloss / max(int(keep.sum()), 1)
        return dlogits.reshape(logits_shape)
    dlogits[xp.arange(N), tflat] -= 1.0
    dlogits *= dloss / N
    return dlogits.reshape(logits_shape)
