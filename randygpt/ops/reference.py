"""The readable reference of every layer: a forward and a backward function, side by side.

Shapes: B batch, T time (positions), C channels, H heads, hs = C // H head size, V vocabulary.
The calling convention is the backend contract's (ops/contract.py): `X_forward(inputs...)`
returns `(out, cache)`; `X_backward(dout, cache)` takes the upstream gradient (the shape of
`out`) and returns a tuple: the input gradient(s), then the parameter gradient(s). The
derivation of each gradient is in the comments.

Nothing here imports a model or knows about one. Every function takes its array module from
its inputs (`array_module`), so that another array library with NumPy's interface can run
it (untested so far). There are no Python loops over batch items or positions: fast kernels replace these
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
    return wte[idx] + wpe[:T], (idx, wte.shape[0], wpe.shape[0])


def embedding_backward(dout, cache):
    # dout (B, T, C) -> (None: ids have no gradient, dwte (V, C), dwpe (block_size, C))
    # d/dwte[v] sums dout over every (b, t) where idx == v; d/dwpe[t] sums dout over b.
    idx, vocab_size, block_size = cache
    xp = array_module(dout)
    B, T, C = dout.shape
    dwte = xp.zeros((vocab_size, C), dtype=dout.dtype)
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))
    dwpe = xp.zeros((block_size, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)
    return None, dwte, dwpe


# --------------------------------------------------------------------------------------------
# RMSNorm: out = g * x / rms(x),  rms(x) = sqrt(mean(x^2) + eps), over the last axis

def rmsnorm_forward(x, g, eps):
    # x (..., C), g (C,) -> out (..., C); cache the normalised x, 1/rms and the gain
    xp = array_module(x)
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = x * rstd
    return xhat * g, (xhat, rstd, g)


def rmsnorm_backward(dout, cache):
    # With xhat = x * r, r = (mean(x^2) + eps)^-1/2:  dr/dx_j = -r^3 x_j / C, so
    # dx = r * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dout * g,  dg = sum(dout * xhat).
    xhat, rstd, g = cache
    C = xhat.shape[-1]
    dg = (dout * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dout * g
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg


# --------------------------------------------------------------------------------------------
# LayerNorm (GPT-2's): out = g * (x - mean(x)) / sqrt(var(x) + eps) + b, over the last axis

def layernorm_forward(x, g, b, eps):
    # x (..., C), g (C,), b (C,) -> out (..., C); cache the normalised x, 1/std and the gain
    xp = array_module(x)
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dout, cache):
    # xhat = (x - mu) r: the centring removes the mean of dxhat, the scaling its projection
    # on xhat:  dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * g;
    # dg = sum(dout * xhat),  db = sum(dout).
    xhat, rstd, g = cache
    C = xhat.shape[-1]
    dg = (dout * xhat).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    dxhat = dout * g
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


# --------------------------------------------------------------------------------------------
# Linear (no bias): out = x @ W, W stored (in, out)

def linear_forward(x, w):
    # x (..., IN), w (IN, OUT) -> out (..., OUT)
    return x @ w, (x, w)


def linear_backward(dout, cache):
    # dx = dout @ W^T ;  dW = sum over all leading positions of x^T dout
    x, w = cache
    IN, OUT = w.shape
    dx = dout @ w.T
    dw = x.reshape(-1, IN).T @ dout.reshape(-1, OUT)
    return dx, dw


# Linear with a bias (GPT-2's four block layers): out = x @ W + b

def linear_bias_forward(x, w, b):
    # x (..., IN), w (IN, OUT), b (OUT,) -> out (..., OUT)
    out, cache = linear_forward(x, w)
    return out + b, cache


def linear_bias_backward(dout, cache):
    # as linear, and db = sum of dout over all leading positions
    dx, dw = linear_backward(dout, cache)
    return dx, dw, dout.reshape(-1, dout.shape[-1]).sum(axis=0)


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
    return (dqkv,)


# Attention of new positions over a KV cache (generation; forward only). Stream s has keys
# and values for positions 0..lengths[s]-1 cached; its query is the newest position, which
# sees all of them: the same softmax(q k^T / sqrt(hs)) v as above, for one row.

def kv_attention_forward(q, k, v, lengths):
    # q (S, H, hs), k and v (S, H, T, hs), lengths (S,) ints >= 1 -> y (S, H * hs)
    xp = array_module(q)
    S, H, T, hs = k.shape
    scores = (k @ q[..., None])[..., 0] * (1.0 / math.sqrt(hs))        # (S, H, T)
    if (lengths < T).any():                                            # a shorter stream
        unseen = xp.arange(T)[None, None, :] >= xp.asarray(lengths)[:, None, None]
        scores = xp.where(unseen, -xp.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    att = xp.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)                             # (S, H, T)
    return (att[:, :, None, :] @ v)[:, :, 0, :].reshape(S, H * hs)


# --------------------------------------------------------------------------------------------
# Squared ReLU: out = relu(x)^2

def squared_relu_forward(x):
    # x (..., D) -> out (..., D); d/dx relu(x)^2 = 2 relu(x)
    xp = array_module(x)
    r = xp.maximum(x, 0)
    return r * r, r


def squared_relu_backward(dout, r):
    return (2.0 * r * dout,)


# --------------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2's gelu_new): out = x/2 * (1 + tanh(u)),
# u = sqrt(2/pi) * (x + 0.044715 x^3)

GELU_SCALE, GELU_CUBIC = math.sqrt(2.0 / math.pi), 0.044715


def gelu_forward(x):
    # x (..., D) -> out (..., D); cache x (the backward needs tanh(u), recomputed from it)
    xp = array_module(x)
    t = xp.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
    return 0.5 * x * (1.0 + t), x


def gelu_backward(dout, x):
    # d/dx = (1 + t)/2 + x/2 * (1 - t^2) * du/dx,  du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 x^2)
    xp = array_module(x)
    t = xp.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
    du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
    return (dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du),)


# --------------------------------------------------------------------------------------------
# Dropout (inverted): out = x * keep / (1 - p); backward uses the same mask.
#
# The keep mask is a hash of each element's flat index under a key drawn from `rng`, not a
# stream of random numbers: any implementation (this one, a parallel kernel, a GPU) makes the
# same mask from the same key, in any order, and a backward kernel can rebuild it instead of
# storing it. The hash is two rounds of lowbias32 (C. Wellons' integer hash, a bijection of
# uint32 with near-ideal avalanche), keyed before each round: h = mix(mix(i ^ k0) ^ k1).
# An element is kept when h >= p * 2^32, i.e. with probability 1 - p (to 2^-32).
# `row0` numbers the rows of a slice of a bigger batch: row b of the slice hashes the indices
# of row row0 + b of the whole batch, so a row's mask is the same whichever process or
# micro-batch computes it (distributed.py).

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


def row_offset(shape, row0):
    """The flat index of row `row0` of a batch whose rows have shape[1:]."""
    return row0 * math.prod(shape[1:])


def dropout_keep(key, shape, p, xp, row0=0):
    """The keep mask (bools of `shape`) that `key` gives at drop probability p, for rows
    row0, row0+1, ... of the whole batch."""
    k0, k1 = key
    n, offset = math.prod(shape), row_offset(shape, row0)
    check_dropout_size(offset + n)
    h = xp.arange(offset, offset + n, dtype=xp.uint32)
    h ^= xp.uint32(k0)
    h = mix32(h)
    h ^= xp.uint32(k1)
    h = mix32(h)
    return (h >= xp.uint32(dropout_threshold(p))).reshape(shape)


def dropout_forward(x, p, rng, row0=0):
    # rng: a Generator of x's array module; p == 0 or rng None -> identity, no mask
    if p == 0.0 or rng is None:
        return x, None
    keep = dropout_keep(dropout_key(rng), x.shape, p, array_module(x), row0)
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, mask):
    return dout if mask is None else dout * mask


# --------------------------------------------------------------------------------------------
# Residual after dropout, as each block half ends: out = x + dropout(f(x)). The gradient
# flows unchanged into x, and through the dropout mask into f(x). Fused kernels do it in
# one pass.

def residual_dropout_forward(x, fx, p, rng, row0=0):
    dropped, mask = dropout_forward(fx, p, rng, row0)
    return x + dropped, mask


def residual_dropout_backward(dout, mask):
    return dout, dropout_backward(dout, mask)


# --------------------------------------------------------------------------------------------
# Cross-entropy: loss = mean over all (b, t) of -log softmax(logits)[target]. A negative
# target (data.IGNORE: padding after a short document) is left out of the mean and the gradient.

def cross_entropy_forward(logits, targets):
    # logits (B, T, V), targets (B, T) int -> scalar loss; cache the softmax probabilities,
    # the flat targets and the logits' shape
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
    return loss, (xp.exp(logprobs), tflat, logits.shape)


def cross_entropy_backward(dloss, cache):
    # d loss / d logits = dloss * (softmax - onehot(target)) / N, N = number of positions
    # (ignored positions: gradient 0, and N counts only the kept ones)
    probs, tflat, logits_shape = cache
    xp = array_module(probs)
    N = probs.shape[0]
    dlogits = probs.copy()
    if (tflat < 0).any():
        keep = tflat >= 0
        dlogits[~keep] = 0.0
        dlogits[xp.arange(N)[keep], tflat[keep]] -= 1.0
        dlogits *= dloss / max(int(keep.sum()), 1)
        return (dlogits.reshape(logits_shape),)
    dlogits[xp.arange(N), tflat] -= 1.0
    dlogits *= dloss / N
    return (dlogits.reshape(logits_shape),)


# --------------------------------------------------------------------------------------------
# AdamW (decoupled weight decay, Loshchilov & Hutter) on flat buffers, in place; step t >= 1.
#   m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2 ;  bias-correct both;
#   p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p * mask)     (mask: 1 on matrices)

def adamw_update(params, grad, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, t):
    xp = array_module(params)
    dt = params.dtype.type
    m *= dt(beta1)
    m += dt(1 - beta1) * grad
    v *= dt(beta2)
    v += dt(1 - beta2) * grad * grad
    m_hat_scale = dt(1.0 / (1 - beta1 ** t))
    v_hat_scale = dt(1.0 / (1 - beta2 ** t))
    update = (m * m_hat_scale) / (xp.sqrt(v * v_hat_scale) + dt(eps))
    if weight_decay:
        update += dt(weight_decay) * decay_mask * params
    params -= dt(lr) * update
