"""The fused backend: fast twins of ops/reference.py for the training hot path, numba kernels
by family, each tested against its reference twin (tests/test_fused.py).

    fused.backend(own_sgemm=None, buffer_pool=True, keep_freed_memory=True) -> Backend

Every op returns what its reference twin returns, to float32 round-off; only the caches
differ, and they are smaller: attention keeps one log-sum-exp per row, not the (B, H, T, T)
probabilities; rmsnorm and squared ReLU keep their outputs (which the model holds anyway);
dropout keeps the key of the reference's hash, not a mask; cross-entropy the logits and one
log-sum-exp per row. Linear runs one 2-D product (optionally on our own sgemm), large
outputs come from recycled memory (memory.py), AdamW is one pass. Each family's module says
how.

Ops this package lacks (kv_attention_forward, for generation) are the reference's, by
construction of contract.make_backend. How the kernels are compiled: jit.py.
"""
from functools import partial

import numpy as np

from ... import threads
from ...errors import UserError
from ..contract import OP_NAMES, Backend, make_backend
from . import attention, elementwise, linear, memory, optimizer, sgemm

FAMILIES = (elementwise, attention, linear, optimizer)


def backend(own_sgemm: bool | None = None, buffer_pool=True, keep_freed_memory: bool = True,
            **unknown) -> Backend:
    """The fused ops with these options; backends with different options coexist.

    own_sgemm: float32 products on the own sgemm where it beats OpenBLAS (sgemm.takes_rows,
        takes_deep). None: sgemm.own_sgemm_default(), i.e. on where the CPU has AVX-512
        unless RANDYGPT_OWN_SGEMM=0.
    buffer_pool: large outputs in recycled memory: True (the process's shared pool), False
        (a fresh np.empty each time), or a memory.BufferPool to draw from.
    keep_freed_memory: ask glibc to keep freed memory for reuse (threads.keep_freed_memory).
        A process-wide setting: once a backend has made it, it holds for every array."""
    if unknown:
        raise UserError(f"the fused backend has no option {', '.join(unknown)} (it has "
                        "own_sgemm, buffer_pool, keep_freed_memory)", "backend")
    if own_sgemm is None:
        own_sgemm = sgemm.own_sgemm_default()
    pool = memory.SHARED if buffer_pool is True else buffer_pool
    if keep_freed_memory:
        threads.keep_freed_memory()
    # each op declares the options it reads as keyword-only parameters
    settings = {"empty": pool.empty if pool else np.empty, "own_sgemm": bool(own_sgemm)}
    table = {}
    for family in FAMILIES:
        for name in OP_NAMES:
            if hasattr(family, name):
                fn = getattr(family, name)
                wanted = {k: settings[k] for k in (fn.__kwdefaults__ or {})}
                table[name] = partial(fn, **wanted) if wanted else fn
    return make_backend("fused", table, {"own_sgemm": bool(own_sgemm),
                                         "buffer_pool": buffer_pool,
                                         "keep_freed_memory": keep_freed_memory})
