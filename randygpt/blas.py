"""The thread count of NumPy's BLAS (OpenBLAS), set at run time.

Generation multiplies one vector by a few small matrices per layer; a second BLAS thread only
adds synchronisation there, and when the cores are busy with other work, OpenBLAS threads that
wait for each other make small products up to a few hundred times slower (measured on a
2-core machine under load: a 33-token prefill of the small preset took 420-640 ms with the
default threads, 1.4 ms with one). So `randygpt generate` runs BLAS single-threaded.

OPENBLAS_NUM_THREADS works only before NumPy is imported; this calls OpenBLAS's own setter in
the library NumPy loaded (as threadpoolctl does). Best effort: with another BLAS, or when the
library cannot be found, nothing changes and the functions return None.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

_PREFIXES = ("scipy_openblas", "openblas")        # numpy >= 2 wheels use the first
_SUFFIXES = ("64_", "_64", "")


def _openblas_paths() -> list[str]:
    import numpy
    paths = []
    if sys.platform.startswith("linux"):
        try:                                          # the libraries this process has mapped
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 6 and "openblas" in os.path.basename(fields[-1]).lower():
                        paths.append(fields[-1])
        except OSError:
            pass
    root = os.path.dirname(numpy.__file__)
    for folder in (root + ".libs", os.path.join(root, ".libs"), os.path.join(root, ".dylibs")):
        paths += glob.glob(os.path.join(folder, "*openblas*"))
    return list(dict.fromkeys(p for p in paths if os.path.isfile(p)))


def _functions():
    for path in _openblas_paths():
        try:
            lib = ctypes.CDLL(path)                   # already loaded: the same library
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    return get, set_
    return None


_cached = []


def _blas():
    if not _cached:
        _cached.append(_functions())
    return _cached[0]


def get_blas_threads() -> int | None:
    f = _blas()
    return None if f is None else int(f[0]())


def set_blas_threads(n: int) -> int | None:
    """Use n BLAS threads from now on; returns the previous count (None: not OpenBLAS)."""
    f = _blas()
    if f is None:
        return None
    previous = int(f[0]())
    f[1](int(n))
    return previous
