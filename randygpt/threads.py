"""Thread and memory policy for training, applied before NumPy (OpenBLAS) or numba load.

Two thread pools take turns on the same few cores during a training step: OpenBLAS's (the
matmuls) and numba's OpenMP pool (the fused kernels). A pool that has just finished keeps its
threads spinning for a while, waiting for more work, and the other pool then shares the cores
with spinners (and with any other busy process, the worst case: one step of the small preset
took 3.9 s instead of 0.2 s while another job ran). The defaults below make an idle pool sleep
at once. Measured on this 2-core machine, small preset (`benchmarks/compare_pytorch.py
--ablation`, and the fused worker beside one busy process): OpenBLAS's timeout is worth 1.73x
idle; numba's passive pool costs about 4% idle (spinning 300k iterations first was 1.04x
faster) but is worth ~2.4x beside one other busy process (11k against 4-5k tokens/s), which
is the case this policy exists for. They only fill in what the
user has not set: an exported variable always wins. The libraries read them once, when they
load, which is why randygpt/__init__.py calls `apply()` before importing anything else (a
program that imports NumPy before randygpt keeps OpenBLAS's own default).

Ranks of an MPI job on one machine (`mpiexec -n N`) share its cores: each rank gets
cores // N threads in each pool (at least one), so N ranks do not run N x cores threads.
"""
from __future__ import annotations

import ctypes
import os
import sys

DEFAULTS = {
    # numba's OpenMP threads sleep after a parallel region instead of spinning
    "OMP_WAIT_POLICY": "passive",
    # OpenBLAS's threads spin 2^4 cycles (the minimum) after a matmul, not 2^28
    "OPENBLAS_THREAD_TIMEOUT": "4",
}


# Thread counts of OpenBLAS, numba and OpenMP, read when each loads.
THREAD_COUNTS = ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
# Set by MPI launchers in each rank: job size (MPICH/Hydra, Open MPI, PMIx) and ranks per machine
_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
_MPI_LOCAL_SIZE = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def launched_by_mpi(environ=os.environ) -> bool:
    """Whether an MPI launcher (mpiexec) started this process."""
    return any(name in environ for name in _MPI_SIZE)


def ranks_on_this_machine(environ=os.environ) -> int:
    for name in _MPI_LOCAL_SIZE:
        if environ.get(name, "").isdigit():
            return max(1, int(environ[name]))
    return 1


def apply(environ=os.environ) -> dict:
    """Set each default the environment does not already have; return the ones set."""
    applied = {}
    local = ranks_on_this_machine(environ) if launched_by_mpi(environ) else 1
    defaults = dict(DEFAULTS)
    if local > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        defaults.update({name: str(max(1, cores // local)) for name in THREAD_COUNTS})
    for name, value in defaults.items():
        if name not in environ:
            environ[name] = value
            applied[name] = value
    return applied


def keep_freed_memory() -> bool:
    """Ask glibc to serve arrays up to 32 MiB from its heap and keep freed memory for reuse.

    By default each array over ~128 KiB is a fresh mmap: every step's activations would be
    page-faulted in (and zeroed by the kernel) again, thousands of faults per step. Training
    allocates the same sizes every step, so reusing freed memory removes them. Returns False
    where there is no glibc (the setting is then simply absent)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
                    and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
