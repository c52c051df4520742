"""Causal self-attention as small matrix products on register tiles.

Per (batch item, head), with q pre-scaled by s = 1/sqrt(hs):
  forward:  S = q k^T;  P = softmax(S masked to j <= t);  y = P v;  lse_t = log sum_j e^S_tj
  backward: P again from lse (nothing T x T is kept between the passes: the flash-attention
            idea);  dP = dy v^T;  dS = P * (dP - D) with D_t = sum_j P_tj dP_tj = dy_t . y_t;
            dq = s dS k;  dk = dS^T (s q);  dv = P^T dy
Every product is a sequence of 4 x 16 tiles of its result (`_tile_product`), each kept in
registers while it runs down the shared dimension (LLVM's SLP vectoriser turns each row of
the tile into one vector FMA). Tiles above the diagonal are skipped: S, P and dS are only
computed for key columns up to the 16-aligned end of each 4-row block. The (T, T) matrices
live in per-chunk scratch for one (batch item, head) at a time, never for the whole batch.
"""
import math
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .elementwise import exp_nonpositive
from .jit import CHUNKS, pjit, stack_block

# The tile functions are compiled with fastmath "contract" only: with reassociation allowed,
# LLVM vectorises across the k loop instead (gathers, much slower).
_TILE_ROWS, _TILE_COLS = 4, 16
_stack_tile_pointer = stack_block(_TILE_ROWS * _TILE_COLS)


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _tile_product(a, row0, b, col0, depth, out, out_col0, ncols, scale):
    """One tile of scale * (a @ b): for r < 4 (and rows that out has), c < min(16, ncols):
    out[row0 + r, out_col0 + c] = scale * sum_{k < depth} a[row0 + r, k] * b[k, col0 + c]."""
    acc = numba.carray(_stack_tile_pointer(a.dtype), (_TILE_ROWS, _TILE_COLS))
    for r in range(_TILE_ROWS):
        for c in range(_TILE_COLS):
            acc[r, c] = 0
    for k in range(depth):
        b_row = b[k, col0:col0 + _TILE_COLS]
        for r in range(_TILE_ROWS):
            a_rk = a[row0 + r, k]
            for c in range(_TILE_COLS):
                acc[r, c] += a_rk * b_row[c]
    for r in range(min(_TILE_ROWS, out.shape[0] - row0)):
        out_row = out[row0 + r]
        for c in range(min(_TILE_COLS, ncols)):
            out_row[out_col0 + c] = acc[r, c] * scale


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _tile_product_transposed(a, row0, b, col0, k_end, out, out_col0, ncols):
    """One tile of a^T @ b whose sum starts at the tile's first row (the causal terms: a is
    dS or P, zero where k < row0): for r < 4 (and rows that out has), c < min(16, ncols):
    out[row0 + r, out_col0 + c] = sum_{row0 <= k < k_end} a[k, row0 + r] * b[k, col0 + c]."""
    acc = numba.carray(_stack_tile_pointer(a.dtype), (_TILE_ROWS, _TILE_COLS))
    for r in range(_TILE_ROWS):
        for c in range(_TILE_COLS):
            acc[r, c] = 0
    for k in range(row0, k_end):
        a_col = a[k, row0:row0 + _TILE_ROWS]
        b_row = b[k, col0:col0 + _TILE_COLS]
        for r in range(_TILE_ROWS):
            for c in range(_TILE_COLS):
                acc[r, c] += a_col[r] * b_row[c]
    for r in range(min(_TILE_ROWS, out.shape[0] - row0)):
        out_row = out[row0 + r]
        for c in range(min(_TILE_COLS, ncols)):
            out_row[out_col0 + c] = acc[r, c]


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
            (pairs + CHUNKS - 1) // CHUNKS)


@pjit
def _attention_forward(qkv, n_head, out, lse):
    B, T, C, hs, hp, Tr, Tc, scale, pairs, per_chunk = _attention_layout(qkv, n_head)
    dt = qkv.dtype
    one = dt.type(1.0)
    for chunk in prange(CHUNKS):
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
                    _tile_product(q, t0, kt, j0, hs, P, j0, _TILE_COLS, one)
                for t in range(t0, t0 + _TILE_ROWS):                       # softmax rows
                    row = P[t]
                    if t >= T:
                        row[:jend] = 0.0
                        continue
                    m = row[0]
                    for j in range(1, t + 1):
                        m = max(m, row[j])
                    for j in range(t + 1):
                        row[j] = exp_nonpositive(row[j] - m)
                    row[t + 1:jend] = 0.0                                  # the future
                    total = row[0] * 0
                    for j in range(t + 1):
                        total += row[j]
                    lse[b, h, t] = m + math.log(total)
                    inv = one / total
                    for j in range(t + 1):
                        row[j] *= inv
                for d0 in range(0, hs, _TILE_COLS):                        # y = P v
                    _tile_product(P, t0, v, d0, jend, y, qo + d0, hs - d0, one)


class AttentionCache(NamedTuple):
    qkv: np.ndarray           # (B, T, 3C) the input
    out: np.ndarray           # (B, T, C)  y, for D_t = dy_t . y_t
    lse: np.ndarray           # (B, H, T)  log-sum-exp of each row's scores
    n_head: int


def attention_forward(qkv, n_head, *, empty=np.empty):
    # qkv (B, T, 3C) -> out (B, T, C)
    qkv = np.ascontiguousarray(qkv)
    B, T, C3 = qkv.shape
    out = empty((B, T, C3 // 3), qkv.dtype)
    lse = np.empty((B, n_head, T), dtype=qkv.dtype)
    _attention_forward(qkv, n_head, out, lse)
    return out, AttentionCache(qkv, out, lse, n_head)


@pjit
def _attention_backward(dout, qkv, out, lse, n_head, dqkv):
    B, T, C, hs, hp, Tr, Tc, scale, pairs, per_chunk = _attention_layout(qkv, n_head)
    dt = qkv.dtype
    one = dt.type(1.0)
    for chunk in prange(CHUNKS):
        q = np.zeros((Tc, hp), dtype=dt)               # scaled queries
        dy = np.zeros((Tc, hp), dtype=dt)              # this head's output gradient
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
                    dy[t, d] = dout[b, t, qo + d]
                    k[t, d] = kt[d, t] = x[t, ko + d]
                    vt[d, t] = x[t, vo + d]
                    acc += dout[b, t, qo + d] * out[b, t, qo + d]
                D[t] = acc
            for t0 in range(0, Tr, _TILE_ROWS):
                jend = _key_end(t0, T)
                for j0 in range(0, jend, _TILE_COLS):
                    _tile_product(q, t0, kt, j0, hs, P, j0, _TILE_COLS, one)      # S
                    _tile_product(dy, t0, vt, j0, hs, dS, j0, _TILE_COLS, one)    # dP
                for t in range(t0, t0 + _TILE_ROWS):
                    prow, drow = P[t], dS[t]
                    if t >= T:                                             # padding rows
                        prow[:jend] = 0.0
                        drow[:jend] = 0.0
                        continue
                    l = lse[b, h, t]
                    for j in range(t + 1):
                        prow[j] = exp_nonpositive(prow[j] - l)              # P = e^(S - lse)
                    prow[t + 1:jend] = 0.0
                    Dt = D[t]
                    for j in range(jend):
                        drow[j] = prow[j] * (drow[j] - Dt)                 # dS
                for d0 in range(0, hs, _TILE_COLS):                        # dq = dS k * scale
                    _tile_product(dS, t0, k, d0, jend, dx, qo + d0, hs - d0, scale)
            for j0 in range(0, Tr, _TILE_ROWS):            # keys j0..j0+3: rows t >= j0 only
                for d0 in range(0, hs, _TILE_COLS):
                    _tile_product_transposed(dS, j0, q, d0, Tr, dx, ko + d0, hs - d0)  # dk
                    _tile_product_transposed(P, j0, dy, d0, Tr, dx, vo + d0, hs - d0)  # dv


def attention_backward(dout, cache, *, empty=np.empty):
    # dout (B, T, C) -> (dqkv (B, T, 3C),)
    dqkv = empty(cache.qkv.shape, cache.qkv.dtype)
    _attention_backward(np.ascontiguousarray(dout), cache.qkv, cache.out, cache.lse,
                        cache.n_head, dqkv)
    return (dqkv,)
