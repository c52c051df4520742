"""The fused backend: fast twins of ops/reference.py for the training hot path, numba kernels
by family, each tested against its reference twin (tests/test_fused.py).

    fused.backend(own_sgemm=None, buffer_pool=True, keep_freed_memory=True) -> Backend

Every op returns what its reference twin returns (outputs and gradients), to float32
round-off; only the caches passed from a forward to its backward differ, and they are
smaller:

  - linear (linear.py): x is reshaped to 2-D so one large product replaces one per batch
    item; with own_sgemm the float32 products run on our own sgemm (sgemm.py).
  - attention (attention.py) never stores the (B, H, T, T) probabilities: forward keeps the
    log-sum-exp of each row (B, H, T) and backward recomputes the probabilities from it.
  - rmsnorm and squared ReLU (elementwise.py) keep only their outputs, which the model holds
    anyway for the next matmul's backward (xhat = out / g, relu(x) = sqrt(out)).
  - dropout stores no mask: the cache is the key of the reference's hash, so both paths drop
    the same units, and backward hashes again. It is fused with the residual add.
  - cross-entropy keeps the logits and one log-sum-exp per row, not a probability matrix.
  - large outputs come from a pool of recycled memory (memory.py), not fresh pages.
  - AdamW (optimizer.py) is one parallel pass over the flat buffers.

Ops this package lacks (kv_attention_forward, for generation) are the reference's, by
construction of contract.make_backend. How the kernels are compiled: jit.py.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from ... import threads
from ..contract import Backend, make_backend
from . import attention, elementwise, linear, memory, optimizer, sgemm

FAMILIES = (elementwise, attention, linear, optimizer)


def backend(own_sgemm: bool | None = None, buffer_pool=True,
            keep_freed_memory: bool = True) -> Backend:
    """The fused ops with these options; backends with different options coexist.

    own_sgemm: float32 products on the own sgemm where it beats OpenBLAS (sgemm.takes_rows,
        takes_deep). None: sgemm.own_sgemm_default(), i.e. on where the CPU has AVX-512
        unless RANDYGPT_OWN_SGEMM=0.
    buffer_pool: large outputs in recycled memory: True (the process's shared pool), False
        (a fresh np.empty each time), or a memory.BufferPool to draw from.
    keep_freed_memory: ask glibc to keep freed memory for reuse (threads.keep_freed_memory).
        A process-wide setting: once a backend has made it, it holds for every array."""
    if own_sgemm is None:
        own_sgemm = sgemm.own_sgemm_default()
    pool = memory.shared_pool() if buffer_pool is True else buffer_pool
    if keep_freed_memory:
        threads.keep_freed_memory()
    # each op declares the options it reads as keyword-only parameters
    settings = {"empty": pool.empty if pool else np.empty, "own_sgemm": bool(own_sgemm)}
    table = {}
    for family in FAMILIES:
        for name in family.OPS:
            fn = getattr(family, name)
            wanted = {k: settings[k] for k in (fn.__kwdefaults__ or {})}
            table[name] = partial(fn, **wanted) if wanted else fn
    return make_backend("fused", table, {"own_sgemm": bool(own_sgemm),
                                         "buffer_pool": buffer_pool,
                                         "keep_freed_memory": keep_freed_memory})
