"""The backend contract: the ops every backend provides, one calling convention, a registry.

Every differentiable op is a pair with one convention:

    out, cache = X_forward(*inputs)          # inputs: arrays, then static settings
    grads      = X_backward(dout, cache)     # a tuple: input gradient(s), then parameter
                                             # gradient(s); dout has the shape of out

    op                 forward inputs              backward returns
    embedding          wte, wpe, idx               (None, dwte, dwpe)   ids have no gradient
    rmsnorm            x, g, eps                   (dx, dg)
    layernorm          x, g, b, eps                (dx, dg, db)
    linear             x, w                        (dx, dw)
    linear_bias        x, w, b                     (dx, dw, db)
    attention          qkv, n_head                 (dqkv,)              causal, fused q|k|v
    squared_relu       x                           (dx,)
    gelu               x                           (dx,)                tanh approximation
    residual_dropout   x, fx, p, rng, row0=0       (dx, dfx)            x + dropout(fx); rows
                                                                        row0.. of a batch
    cross_entropy      logits, targets             (dlogits,)           dout is dloss (1.0)

and two that have no backward:

    kv_attention_forward(q, k, v, lengths) -> y          attention of the newest position
                                                         over a KV cache (generation)
    adamw_update(params, grad, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, t)
                                                         in place, on flat buffers

What each cache holds is the backend's business: only its own backward reads it.

A backend is a name, an op table and its options. `make_backend` builds the table from a
module of fast twins: every op the module lacks is the reference's, so a backend that
implements nothing yet is already complete and correct, and one that implements a few ops is
tested against the reference for exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ..errors import UserError
from . import reference

PAIRS = ("embedding", "rmsnorm", "layernorm", "linear", "linear_bias", "attention",
         "squared_relu", "gelu", "residual_dropout", "cross_entropy")
FORWARD_ONLY = ("kv_attention_forward", "adamw_update")
OP_NAMES = tuple(f"{p}_{d}" for p in PAIRS for d in ("forward", "backward")) + FORWARD_ONLY


def _same(x):
    return x


@dataclass
class Backend:
    """A named op table. `own` lists the ops the backend implements itself (the rest are the
    reference's); `options` are its settings, e.g. the fused backend's kernels (which
    kernel runs each product, ops/fused/choose.py). `xp` is the array module its arrays live
    in (the model allocates its buffers there); `to_device` and `to_host` move an array in
    and out of it (identity for the NumPy backends)."""
    name: str
    ops: SimpleNamespace
    own: frozenset = frozenset()
    options: dict = field(default_factory=dict)
    xp: object = np
    to_device: object = _same
    to_host: object = _same

    def __getattr__(self, name):          # backend.linear_forward(...) == backend.ops.linear_forward
        if name in OP_NAMES:
            return getattr(self.ops, name)
        raise AttributeError(name)


def make_backend(name: str, module_or_table, options: dict | None = None,
                 **arrays) -> Backend:
    """A Backend whose ops come from `module_or_table` (a module, object or dict) where it
    has them, and from the reference everywhere else. `arrays`: xp, to_device, to_host."""
    get = (module_or_table.get if isinstance(module_or_table, dict)
           else lambda n, default=None: getattr(module_or_table, n, default))
    table, own = {}, set()
    for op in OP_NAMES:
        fn = get(op, None)
        if fn is not None and fn is not getattr(reference, op):
            own.add(op)
        table[op] = fn if fn is not None else getattr(reference, op)
    return Backend(name, SimpleNamespace(**table), frozenset(own), dict(options or {}),
                   **arrays)


def _reference_backend(**options) -> Backend:
    if options:
        raise UserError(f"the reference backend has no options ({', '.join(options)})",
                        "backend")
    return make_backend("reference", reference)


def _fused_backend(**options) -> Backend:
    from . import fused          # numba loads here, only for a run that asks for it
    return fused.backend(**options)


def _cupy_backend(**options) -> Backend:
    from . import cupy           # CuPy and numba-cuda load here, only for a run that asks
    return cupy.backend(**options)


# name -> factory(**options) -> Backend
BACKENDS = {"reference": _reference_backend, "fused": _fused_backend, "cupy": _cupy_backend}


def get_backend(name="fused", **options) -> Backend:
    """The backend called `name` (a Backend passes through unchanged)."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise UserError(f"{{field}} {name!r} is not a backend; choose one of "
                        f"{', '.join(BACKENDS)}", "backend")
    return BACKENDS[name](**options)
