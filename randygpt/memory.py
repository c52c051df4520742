"""How much memory a training run needs, before it allocates any: estimate, print, refuse.

    training_memory(cfg, batch_size, backend) -> MemoryEstimate   the parts, in bytes
    available_memory() -> int | None                              what the OS can still give
    check_fits(estimate, available)                               UserError when it cannot fit
    fitting_batch(cfg, preferred, budget)                         the largest batch that fits

The estimate counts what one step keeps alive at its peak (end of forward, start of backward),
per position of a (batch, block) window, from the caches the ops keep (ops/fused/__init__.py
lists them):

    weights, gradients, AdamW's m and v, its decay mask     5 P
    each block: norms' caches, qkv (3C), attention out (C),
      the MLP activation's cache and output (4C each)       ~10-16 C per position
    the logits and their gradient                           2 V per position (4 on the reference)
    the head's weight gradient and backward's temporaries   V C + 8 C per position
    the fused backend's runtime (kernels, pooled blocks)    256 MiB

benchmarks/bench_gpt2.py compares it with the peak resident memory of real GPT-2 steps (at
124M, 4 x 64 tokens: 2991 MiB measured, 2755 MiB estimated without the runtime part, which
is sized from that gap).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError

GiB = 1 << 30
DEFAULT_BUDGET = 24 * GiB   # what a default fine-tune batch aims to fit: a 24 GiB machine

NORM_CACHE = {"rmsnorm": 1, "layernorm": 2}          # (C)-rows each norm keeps (fused ops)
ACTIVATION_CACHE = {"squared_relu": 4, "gelu": 8}    # (C)-rows: output (4C), + input for GELU
FUSED_RUNTIME = 256 << 20   # compiled kernels and the buffer pool's free blocks (measured)


@dataclass
class MemoryEstimate:
    parts: dict = field(default_factory=dict)          # name -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        items = " + ".join(f"{k} {_gib(v)}" for k, v in self.parts.items())
        return f"{_gib(self.total)} ({items})"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def training_memory(cfg, batch_size: int, backend: str = "fused",
                    dtype=np.float32) -> MemoryEstimate:
    """Bytes a training run of `cfg` at `batch_size` windows of cfg.block_size will allocate."""
    from .model import count_parameters
    item = np.dtype(dtype).itemsize
    P, C, V, T = count_parameters(cfg), cfg.n_embd, cfg.vocab_size, cfg.block_size
    N = batch_size * T                                           # positions per step
    per_block = (2 * NORM_CACHE.get(cfg.norm, 2) + 3 + 1 + ACTIVATION_CACHE.get(
        cfg.activation, 8)) * C
    if backend == "reference":     # softmax probabilities; RMSNorm's xhat, relu(x) besides
        per_block += cfg.n_head * T + C * (2 * (cfg.norm == "rmsnorm")
                                           + 4 * (cfg.activation == "squared_relu"))
    logits = (4 if backend == "reference" else 2) * V           # + softmax temporaries
    parts = {"weights/grads/AdamW": 5 * P * item,
             "activations": cfg.n_layer * per_block * N * item,
             "logits": logits * N * item,
             "backward": (V * C + 8 * C * N) * item}
    if backend != "reference":
        parts["runtime"] = FUSED_RUNTIME
    return MemoryEstimate(parts)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo (Linux: free plus reclaimable), else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(estimate: MemoryEstimate, available: int | None = None) -> None:
    """Refuse a run whose estimate exceeds the memory available (unknown: allowed)."""
    available = available_memory() if available is None else available
    if available is not None and estimate.total > available:
        raise UserError(f"this run needs about {estimate.describe()}, but only "
                        f"{_gib(available)} is available; lower {{field}} (the estimate grows "
                        "with batch x block) or free memory", "batch_size")


def fitting_batch(cfg, preferred: int, budget: int | None = None,
                  backend: str = "fused") -> int:
    """The largest batch <= preferred (halving from it) whose estimate fits `budget` (default:
    the available memory, at most DEFAULT_BUDGET); 1 if none does (check_fits then refuses)."""
    if budget is None:
        budget = min(available_memory() or DEFAULT_BUDGET, DEFAULT_BUDGET)
    batch = preferred
    while batch > 1 and training_memory(cfg, batch, backend).total > budget:
        batch //= 2
    return batch
