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
import os
import time

import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

VECTOR_BITS = ("auto", "256")


def use_512_bit_vectors(environ=os.environ) -> bool:
    """Compile for 512-bit vectors where the CPU has AVX-512: LLVM's tuning for Intel's
    AVX-512 CPUs prefers 256-bit ones (its AMD tunings do not), and then the own sgemm's
    6 x 64 register block needs 48 ymm registers of 16 and spills. Measured on an Intel Xeon
    (family 6 model 167): 215 vector moves to the stack in its block product with LLVM's
    tuning, 59 without; 44 -> 95 GFLOP/s on a (2048 x 128) @ (128 x 384) product; with
    OpenBLAS pinned to its Haswell kernels it then beats OpenBLAS on most training shapes
    (choose.py still times both). Attention and the elementwise kernels measured the same
    either way. RANDYGPT_VECTOR_BITS=256 keeps LLVM's tuning; NUMBA_CPU_NAME or
    NUMBA_CPU_FEATURES, set by the user, win. Must run before the first compilation (numba
    reads these when its code generator starts). Returns whether it changed anything."""
    choice = environ.get("RANDYGPT_VECTOR_BITS", "auto").strip().lower()
    if choice not in VECTOR_BITS:
        from ...errors import UserError
        raise UserError(f"RANDYGPT_VECTOR_BITS={choice!r} is not a choice; use auto (512-bit "
                        "vectors where the CPU has AVX-512) or 256", "backend")
    if choice == "256" or numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return False
    numba.config.CPU_NAME = llvm.get_host_cpu_name()
    numba.config.CPU_FEATURES = features + ",-prefer-256-bit"
    return True


def vector_tuning() -> str:
    """How this process's kernels are compiled, for choose.py's decision key."""
    return "512-bit" if "-prefer-256-bit" in str(numba.config.CPU_FEATURES) else "as LLVM tunes"


use_512_bit_vectors()

# No nnan/ninf: a diverging run must still produce the inf/nan that train() checks for.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
jit = njit(cache=True, fastmath=FASTMATH, error_model="numpy")
_parallel_jit = njit(cache=True, fastmath=FASTMATH, error_model="numpy", parallel=True)


class ParallelKernel:
    """A parallel numba kernel, called with the thread count measured fastest on this machine
    for its size (choose.ThreadChoice): for small arrays, waking numba's sleeping threads costs
    more than the work. Attributes are the numba dispatcher's (its cache, signatures)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.__name__ = dispatcher.__name__.lstrip("_")
        self.__doc__ = dispatcher.__doc__
        self._choice, self._decided = None, {}          # first array's size -> threads

    def __getattr__(self, name):
        return getattr(self.dispatcher, name)

    def __call__(self, *args):
        from .choose import thread_choice
        choice, all_threads = thread_choice(), numba.config.NUMBA_NUM_THREADS   # the pool
        if choice is not self._choice:
            self._choice, self._decided = choice, {}
        n = self._decided.get(args[0].size)             # the hot path: one lookup
        if n == all_threads:
            return self.dispatcher(*args)
        trial = None
        if n is None:
            n, trial = choice.threads(self, args, all_threads)
            if trial is None:
                self._decided[args[0].size] = n
        started = time.perf_counter()
        if n != all_threads:
            numba.set_num_threads(n)
        try:
            return self.dispatcher(*args)
        finally:
            if n != all_threads:
                numba.set_num_threads(all_threads)
            if trial is not None:
                choice.observe(trial, n, time.perf_counter() - started)


def pjit(fn) -> ParallelKernel:
    """A parallel kernel (prange loops), compiled once and cached on disk, threads chosen."""
    return ParallelKernel(_parallel_jit(fn))

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


def on_disk(kernel, dtype="float32") -> bool:
    """Whether numba's disk cache holds a `dtype` version of `kernel` for this CPU (so the
    first call loads it instead of compiling). Reads the cache's index, numba's own format:
    an index that cannot be read counts as cached, so at worst a notice is missed."""
    cache = getattr(kernel, "_cache", None)
    if cache is None or not hasattr(kernel, "targetctx"):
        return True
    try:
        magic = kernel.targetctx.codegen().magic_tuple()
        index = cache._cache_file._load_index()
        return any(key[1] == magic and dtype in str(key[0]) for key in index)
    except Exception:
        return True


def uncached(modules, dtype="float32") -> list:
    """The kernels of `modules` that numba's disk cache holds no `dtype` version of for this
    CPU: what the first use will compile."""
    return [kernel for module in modules for kernel in vars(module).values()
            if getattr(kernel, "_cache", None) is not None and hasattr(kernel, "targetctx")
            and not on_disk(kernel, dtype)]
