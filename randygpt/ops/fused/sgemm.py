"""randyGPT's own float32 matrix product (numba, compiled for the host CPU).

A 6 x 64 block of the output held in vector registers (`_gemm_block_product`: 24 zmm
registers with AVX-512, 48 ymm with AVX2). It reached ~265 GFLOP/s per core on an AMD Zen 5
whose OpenBLAS was pinned to its Haswell kernels (~125), and 0.25-0.48x OpenBLAS on an Intel
Xeon running OpenBLAS's SkylakeX kernels: whether it wins depends on the CPU and the BLAS, so
choose.py times it against OpenBLAS per shape and the faster runs. Two drivers:

  - `sgemm`: rows of the output split over threads, each 6-row block of A meeting B's
    64-column panels straight from memory (the layers' x @ W and dout @ W^T: many rows).
  - `sgemm_deep`: the weight gradient x^T dout, a long sum over positions into a small
    output. The sum is cut into 8 fixed parts multiplied in parallel and added in a fixed
    order (the same result for any thread count); blocks of A and B are packed into panels
    contiguous in k first.

Both take any shapes and float dtypes. `benchmarks/bench_sgemm.py` compares them with
OpenBLAS on every training shape; tests/test_fused.py checks them against NumPy's matmul.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .jit import FASTMATH as _FASTMATH, stack_block


_GEMM_ROWS, _GEMM_COLS = 6, 64        # the block of C one micro-kernel call keeps in registers
_GEMM_CHUNK = 96                      # rows of C per parallel work item
_gemm_block = stack_block(_GEMM_ROWS * _GEMM_COLS)


@njit(inline="always")
def _zero_block(acc):
    for r in range(_GEMM_ROWS):
        for j in range(_GEMM_COLS):
            acc[r, j] = 0


@njit(inline="always")
def _store_block(acc, c, i0, j0, nrows, ncols, accumulate):
    # c[i0 + r, j0 + j] (+)= acc[r, j] for r < nrows, j < ncols
    for r in range(nrows):
        c_row = c[i0 + r]
        if accumulate:
            for j in range(ncols):
                c_row[j0 + j] += acc[r, j]
        else:
            for j in range(ncols):
                c_row[j0 + j] = acc[r, j]


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _gemm_block_product(a, i0, b, j0, K, c, nrows, ncols):
    """c[i0 + r, j0 + j] = sum_k a[i0 + r, k] * b[k, j0 + j] for r < nrows, j < ncols; b's
    columns j0..j0+63 must exist (padding). The 6 x 64 block of sums stays in registers."""
    acc = numba.carray(_gemm_block(a.dtype), (_GEMM_ROWS, _GEMM_COLS))
    _zero_block(acc)
    if nrows == _GEMM_ROWS:                            # the constant trip count unrolls
        for k in range(K):
            b_row = b[k, j0:j0 + _GEMM_COLS]
            for r in range(_GEMM_ROWS):
                a_rk = a[i0 + r, k]
                for j in range(_GEMM_COLS):
                    acc[r, j] += a_rk * b_row[j]
    else:
        for k in range(K):
            b_row = b[k, j0:j0 + _GEMM_COLS]
            for r in range(nrows):
                a_rk = a[i0 + r, k]
                for j in range(_GEMM_COLS):
                    acc[r, j] += a_rk * b_row[j]
    _store_block(acc, c, i0, j0, nrows, ncols, False)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", parallel=True)
def _gemm(a, b, c):
    # c (M, N) = a (M, K) @ b (K, >= N columns, padded to whole 64-column panels)
    M, K = a.shape
    N = c.shape[1]
    for chunk in prange((M + _GEMM_CHUNK - 1) // _GEMM_CHUNK):
        i_end = min(M, (chunk + 1) * _GEMM_CHUNK)
        for i0 in range(chunk * _GEMM_CHUNK, i_end, _GEMM_ROWS):
            for j0 in range(0, N, _GEMM_COLS):
                _gemm_block_product(a, i0, b, j0, K, c, min(_GEMM_ROWS, i_end - i0),
                                    min(_GEMM_COLS, N - j0))


# The weight gradient x^T dout sums over all positions (K = B*T, long) into a small C (IN x
# OUT), so rows of C are too few to split. Instead K is cut into _GEMM_SPLITS fixed parts,
# multiplied in parallel into partial C's and summed in a fixed order (the same result for
# any thread count). Within a part, K goes in blocks of _GEMM_DEPTH: each block's B is
# packed into 64-column panels and A into 6-row panels, contiguous in k, which keeps strided
# reads (A is x^T, a transposed view) out of the inner loop.

_GEMM_SPLITS, _GEMM_DEPTH = 8, 256


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _gemm_panel_product(a_panel, b_panel, depth, c, i0, j0, nrows, ncols, accumulate):
    """c[i0 + r, j0 + j] (+)= sum_k a_panel[k, r] * b_panel[k, j], k < depth: packed panels
    a_panel (>= depth, 6), b_panel (>= depth, 64); the 6 x 64 block of sums in registers."""
    acc = numba.carray(_gemm_block(a_panel.dtype), (_GEMM_ROWS, _GEMM_COLS))
    _zero_block(acc)
    for k in range(depth):
        a_k, b_k = a_panel[k], b_panel[k]
        for r in range(_GEMM_ROWS):
            a_rk = a_k[r]
            for j in range(_GEMM_COLS):
                acc[r, j] += a_rk * b_k[j]
    _store_block(acc, c, i0, j0, nrows, ncols, accumulate)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", parallel=True)
def _gemm_deep(a, b, c):
    # c (M, N) = a (M, K) @ b (K, N) for K >> M (any layouts)
    M, K = a.shape
    N = c.shape[1]
    n_panels = (N + _GEMM_COLS - 1) // _GEMM_COLS
    n_row_panels = (M + _GEMM_ROWS - 1) // _GEMM_ROWS
    per_split = (K + _GEMM_SPLITS - 1) // _GEMM_SPLITS
    partial = np.empty((_GEMM_SPLITS, M, N), dtype=c.dtype)
    for split in prange(_GEMM_SPLITS):
        b_packed = np.zeros((n_panels, _GEMM_DEPTH, _GEMM_COLS), dtype=c.dtype)
        a_packed = np.zeros((n_row_panels, _GEMM_DEPTH, _GEMM_ROWS), dtype=c.dtype)
        k_start, k_end = split * per_split, min(K, (split + 1) * per_split)
        for k0 in range(k_start, k_end, _GEMM_DEPTH):
            depth = min(_GEMM_DEPTH, k_end - k0)
            for k in range(depth):
                for j in range(N):
                    b_packed[j // _GEMM_COLS, k, j % _GEMM_COLS] = b[k0 + k, j]
                for i in range(M):
                    a_packed[i // _GEMM_ROWS, k, i % _GEMM_ROWS] = a[i, k0 + k]
            for p in range(n_panels):
                for m in range(n_row_panels):
                    _gemm_panel_product(a_packed[m], b_packed[p], depth, partial[split],
                                        m * _GEMM_ROWS, p * _GEMM_COLS,
                                        min(_GEMM_ROWS, M - m * _GEMM_ROWS),
                                        min(_GEMM_COLS, N - p * _GEMM_COLS), k0 > k_start)
        if k_start >= k_end:
            partial[split] = 0
    for i in prange(M):
        for j in range(N):
            total = partial[0, i, j]
            for split in range(1, _GEMM_SPLITS):
                total += partial[split, i, j]
            c[i, j] = total


def sgemm(a, b, out=None):
    """a (M, K) @ b (K, N): rows of the output split over threads (any float dtype; made for
    float32). b is padded to whole 64-column panels, and copied when not C-contiguous."""
    a = np.ascontiguousarray(a)
    M, K = a.shape
    N = b.shape[1]
    if N % _GEMM_COLS:                                  # whole panels
        padded = np.zeros((K, -(-N // _GEMM_COLS) * _GEMM_COLS), dtype=b.dtype)
        padded[:, :N] = b
        b = padded
    b = np.ascontiguousarray(b)                         # rows of B read as 64-wide vectors
    out = np.empty((M, N), dtype=a.dtype) if out is None else out
    _gemm(a, b, out)
    return out


def sgemm_deep(a, b, out):
    """a (M, K) @ b (K, N) into out (M, N) for K much larger than M (a weight gradient)."""
    _gemm_deep(a, b, out)
    return out
