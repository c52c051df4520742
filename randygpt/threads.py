"""Thread policy, applied by randygpt/__init__.py before NumPy (OpenBLAS) or numba load.

Two thread pools take turns on the same few cores during training: OpenBLAS's (the matmuls)
and numba's OpenMP pool (the fused kernels). Whichever pool has just finished keeps its
threads spinning for a while, waiting for more work, and the other pool's threads then share
the cores with spinners: on 2 cores that made a training step ~18x slower (measured; see
benchmarks/compare_pytorch.py and the README). These defaults make an idle pool sleep at once.
They only fill in what the user has not set: an exported variable always wins. The libraries
read them once, when they load, which is why this runs before any of them is imported.
"""
from __future__ import annotations

import os

DEFAULTS = {
    # numba's OpenMP threads sleep after a parallel region instead of spinning
    "OMP_WAIT_POLICY": "passive",
}


def apply(environ=os.environ) -> dict:
    """Set each default the environment does not already have; return the ones set."""
    applied = {}
    for name, value in DEFAULTS.items():
        if name not in environ:
            environ[name] = value
            applied[name] = value
    return applied
