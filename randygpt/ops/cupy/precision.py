"""Matrix products at a chosen precision: float32, TF32, or bf16 operands with float32
accumulation; and the linear op built on them.

    precision   operands                         accumulation    where
    float32     float32                          float32         any array module
    tf32        float32, rounded by the tensor   float32         cuBLAS (CUBLAS_COMPUTE_32F_FAST_TF32)
                cores to 10 mantissa bits
    bf16        bfloat16 (8 mantissa bits)       float32         cuBLAS gemmEx, CUDA_R_16BF in,
                                                                 CUDA_R_32F out, COMPUTE_32F

The master weights, their gradients and AdamW's moments stay float32: only the operands of
the products are rounded, each time a product is taken. NumPy has no bfloat16, so the
rounding is done by bit manipulation on float32 (round to nearest, ties to even: add 0x7FFF
plus the lowest kept bit, then clear the low 16 bits); a bf16 value is a float32 whose low
16 bits are zero. On a GPU the rounded operands are stored as 16-bit patterns (half the
memory of the float32 activations that linear's backward keeps) and multiplied by cuBLAS;
with NumPy standing in for CuPy the same rounded operands are multiplied in float32, which
is what cuBLAS computes up to the order of its float32 sums.
"""
from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "tf32", "bf16")

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1


def bf16_bits(x, xp=np):
    """float32 array -> uint16 bit patterns of the nearest bfloat16 (ties to even; NaN stays
    a quiet NaN, +-inf stays inf, values past bf16's largest finite round to inf)."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    lsb = (u >> 16) & xp.uint32(1)
    rounded = (u + xp.uint32(0x7FFF) + lsb) >> 16
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    return xp.where(nan, (u >> 16) | xp.uint32(0x0040), rounded).astype(xp.uint16)


def bf16_value(bits, xp=np):
    """uint16 bit patterns -> the float32 values they denote (exact)."""
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def round_to_bf16(x, xp=np):
    """float32 -> float32 holding the nearest bfloat16 value."""
    return bf16_value(bf16_bits(x, xp), xp)


class Matmul:
    """Products `a @ b`, `a @ b.T`, `a.T @ b` of 2-D float32 operands at one precision.

    Operands are prepared once (`operand`) and may be reused by several products (linear's
    forward prepares x and W; its backward reuses them with the prepared dout). With
    `cublas=False` (NumPy standing in for CuPy, or a CuPy without the bindings) a bf16
    operand is its rounded float32 value and the product is float32 math on it."""

    def __init__(self, precision: str, xp=np, cublas: bool = False):
        self.precision, self.xp, self.cublas = precision, xp, cublas

    def operand(self, x):
        """What a product takes: float32 (float32, tf32) or bf16 (bits on cuBLAS, else the
        rounded float32 values)."""
        if self.precision != "bf16":
            return x
        if self.cublas:
            return bf16_bits(x, self.xp)
        return round_to_bf16(x, self.xp)

    def __call__(self, a, b, trans_a=False, trans_b=False):
        """op(a) @ op(b), op = transpose where asked; a, b 2-D prepared operands; float32."""
        if not self.cublas or self.precision == "float32":
            return (a.T if trans_a else a) @ (b.T if trans_b else b)
        return self._gemm_ex(a, b, trans_a, trans_b)

    def _gemm_ex(self, a, b, trans_a, trans_b):
        # cuBLAS is column-major: a row-major (M, N) C = op(A) op(B) is the column-major
        # C^T = op(B)^T op(A)^T, so we pass B first, with the same transpose flags.
        import cupy
        from cupy.cuda import cublas, device
        M = a.shape[1] if trans_a else a.shape[0]
        K = a.shape[0] if trans_a else a.shape[1]
        N = b.shape[0] if trans_b else b.shape[1]
        a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
        c = cupy.empty((M, N), dtype=cupy.float32)
        dtype = CUDA_R_16BF if self.precision == "bf16" else CUDA_R_32F
        compute = (CUBLAS_COMPUTE_32F_FAST_TF32 if self.precision == "tf32"
                   else CUBLAS_COMPUTE_32F)
        one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)   # host pointer mode
        cublas.gemmEx(device.get_cublas_handle(),
                      CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
                      CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
                      N, M, K, one.ctypes.data,
                      b.data.ptr, dtype, b.shape[1],
                      a.data.ptr, dtype, a.shape[1],
                      zero.ctypes.data, c.data.ptr, CUDA_R_32F, N,
                      compute, CUBLAS_GEMM_DEFAULT)
        return c


# --------------------------------------------------------------------------------------------
# Linear (no bias) at the Matmul's precision: out = x @ W, the products' operands prepared
# once in forward and kept for backward (dx = dout @ W^T, dW = x^T dout).

def linear_forward(x, w, *, matmul: Matmul):
    # x (..., IN), w (IN, OUT) -> out (..., OUT); cache the prepared x (N, IN) and W
    IN, OUT = w.shape
    xa, wa = matmul.operand(x.reshape(-1, IN)), matmul.operand(w)
    out = matmul(xa, wa).reshape(*x.shape[:-1], OUT)
    return out, (xa, wa, x.shape)


def linear_backward(dout, cache, *, matmul: Matmul):
    xa, wa, x_shape = cache
    OUT = wa.shape[1]
    da = matmul.operand(dout.reshape(-1, OUT))                   # (N, OUT)
    dx = matmul(da, wa, trans_b=True).reshape(x_shape)           # (N, IN)
    dw = matmul(xa, da, trans_a=True)                            # (IN, OUT)
    return dx, dw
