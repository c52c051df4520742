"""The fused backend: fast twins of ops/reference.py for the training hot path, numba kernels
by family, each tested against its reference twin (tests/test_fused.py).

    fused.backend(kernels=None, buffer_pool=True, keep_freed_memory=True) -> Backend

Every op returns what its reference twin returns, to float32 round-off; only the caches
differ, and they are smaller: attention keeps one log-sum-exp per row, not the (B, H, T, T)
probabilities; rmsnorm and squared ReLU keep their outputs (which the model holds anyway);
dropout keeps the key of the reference's hash, not a mask; cross-entropy the logits and one
log-sum-exp per row. Linear runs one 2-D product (on OpenBLAS or our own sgemm, whichever
measures faster here for that shape: choose.py), large
outputs come from recycled memory (memory.py), AdamW is one pass. Each family's module says
how.

Ops this package lacks (kv_attention_forward, for generation) are the reference's, by
construction of contract.make_backend. Generation's one-token steps run as one compiled call
instead (decode.py: the backend's decode_step option, traced from the model's blocks). How the kernels are compiled: jit.py.
"""
from functools import partial

import numpy as np

from ... import threads
from ...errors import UserError
from ..contract import OP_NAMES, Backend, make_backend
from . import attention, choose, decode, elementwise, jit, linear, memory, optimizer

FAMILIES = (elementwise, attention, linear, optimizer)
COMPILE_SECONDS = 1.0     # per kernel, cold: an estimate (all ~20 took ~12 s on a Zen 5)


def compile_seconds(kernels: choose.KernelChoice, dtype="float32") -> float:
    """About how long a first training run will spend compiling kernels that numba's disk
    cache lacks (0 when every one is cached): the notice a first run prints. Kernels compile
    lazily, on first use: the own sgemm only where it is timed or forced; the decode step
    not for a short sample (decode.COMPILE_AFTER_S)."""
    from . import sgemm
    modules = [elementwise, attention, optimizer] + (
        [sgemm] if kernels.mode != "blas" else [])
    return COMPILE_SECONDS * len(jit.uncached(modules, dtype))


def backend(kernels=None, buffer_pool=True, keep_freed_memory: bool = True,
            own_sgemm: bool | None = None, **unknown) -> Backend:
    """The fused ops with these options; backends with different options coexist.

    kernels: which kernel runs each float32 product (choose.py): "auto" (time OpenBLAS and
        the own sgemm on first use of a shape, keep the faster, remember it on disk), "blas",
        "own", or a choose.KernelChoice to share. None: RANDYGPT_SGEMM, else "auto".
    own_sgemm: the older switch: True is kernels="own", False kernels="blas".
    buffer_pool: large outputs in recycled memory: True (the process's shared pool), False
        (a fresh np.empty each time), or a memory.BufferPool to draw from.
    keep_freed_memory: ask glibc to keep freed memory for reuse (threads.keep_freed_memory).
        A process-wide setting: once a backend has made it, it holds for every array."""
    if unknown:
        raise UserError(f"the fused backend has no option {', '.join(unknown)} (it has "
                        "kernels, buffer_pool, keep_freed_memory)", "backend")
    if kernels is None and own_sgemm is not None:
        kernels = "own" if own_sgemm else "blas"
    if not isinstance(kernels, choose.KernelChoice):
        kernels = choose.KernelChoice(kernels)
    choose.thread_choice()              # RANDYGPT_KERNEL_THREADS checked now, not mid-step
    pool = memory.SHARED if buffer_pool is True else buffer_pool
    if keep_freed_memory:
        threads.keep_freed_memory()
    # each op declares the options it reads as keyword-only parameters
    settings = {"empty": pool.empty if pool else np.empty, "kernels": kernels}
    table = {}
    for family in FAMILIES:
        for name in OP_NAMES:
            if hasattr(family, name):
                fn = getattr(family, name)
                wanted = {k: settings[k] for k in (fn.__kwdefaults__ or {})}
                table[name] = partial(fn, **wanted) if wanted else fn
    return make_backend("fused", table, {"kernels": kernels, "buffer_pool": buffer_pool,
                                         "keep_freed_memory": keep_freed_memory,
                                         "compile_seconds": partial(compile_seconds, kernels),
                                         "decode_step": decode.trace})
