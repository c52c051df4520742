"""How the fused kernels are compiled, shared by every kernel family.

Kernels are compiled on first use (~12 s for all of them) and cached on disk (`cache=True`:
in __pycache__ next to these files, or numba's per-user cache directory when that is not
writable, or NUMBA_CACHE_DIR); later runs load them in well under a second. Elementwise
kernels are a plain `prange` over rows or elements (LLVM vectorises those bodies; a loop over
a sub-range inside a prange of chunks came out scalar, 4x slower); reductions and attention
split rows or (batch, head) pairs into a fixed number of chunks, so that their sums do not
depend on the number of threads. float32 and float64 both work (float64 for the
finite-difference tests); `fastmath` allows the reassociation that vectorised reductions
need, but not nnan/ninf.
"""
import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# No nnan/ninf: a diverging run must still produce the inf/nan that train() checks for.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
jit = njit(cache=True, fastmath=FASTMATH, error_model="numpy")
pjit = njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)

CHUNKS = 16    # work chunks of parallel loops: fixed, so results do not depend on threads

# The register tiles (attention, sgemm) need LLVM's SLP (straight-line) vectoriser, which
# numba leaves off by default; it is read at each compilation, so this must run before the
# first one (every kernel module imports this one first).
numba.config.SLP_VECTORIZE = 1


def stack_block(n):
    """An intrinsic giving a pointer to n scratch values of a dtype on the stack (an alloca,
    which LLVM promotes to registers when every index into it is a constant)."""
    @intrinsic
    def alloca_block(typingctx, dtype):
        def codegen(context, builder, signature, args):
            size = context.get_constant(types.intp, n)
            return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=size)
        return types.CPointer(dtype.dtype)(dtype), codegen
    return alloca_block


def rows(x):
    """x (..., D) -> a C-contiguous (N, D) view (or copy)."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def flat(x):
    """x -> a C-contiguous (n,) view (or copy)."""
    return np.ascontiguousarray(x).reshape(-1)


def uncached(modules, dtype="float32") -> list:
    """The kernels of `modules` that numba's disk cache holds no `dtype` version of for this
    CPU: what the first use will compile. (Reads the cache's index, numba's own format: a
    kernel whose index cannot be read counts as cached, so at worst a notice is missed.)"""
    cold = []
    for module in modules:
        for kernel in vars(module).values():
            cache = getattr(kernel, "_cache", None)
            if cache is None or not hasattr(kernel, "targetctx"):
                continue
            try:
                magic = kernel.targetctx.codegen().magic_tuple()
                index = cache._cache_file._load_index()
                warm = any(key[1] == magic and dtype in str(key[0]) for key in index)
            except Exception:
                warm = True
            if not warm:
                cold.append(kernel)
    return cold
