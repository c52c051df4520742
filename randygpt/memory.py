"""How much memory a training run needs, estimated before anything is allocated.

A step keeps, per layer and per token, what its backward needs (counted from
model.block_forward: the norms' inputs, qkv and its q/k/v views, y, the MLP's 4C hidden and
activation, residuals, dropout masks: about 22 C floats) plus one row of attention
probabilities (H x T floats); attention's forward and backward briefly hold ~3 more (B, H, T, T)
score arrays for one layer; the head holds logits, probabilities and their gradient
(3 V floats per token). Parameters, their gradients and AdamW's two moments are 4 floats per
parameter. tests/test_memory.py checks the estimate against tracemalloc's peak of real steps.

    estimate = estimate_training_bytes(model_cfg, train_cfg)
    check_memory(estimate)        # a UserError naming the estimate when it cannot fit
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

FLOAT = 4     # float32


@dataclass(frozen=True)
class MemoryEstimate:
    activations: int        # bytes kept by one forward for its backward, plus transients
    parameters: int         # weights and their gradients
    optimizer: int          # AdamW's m and v
    data: int = 0           # the text and its tokens

    @property
    def total(self) -> int:
        return self.activations + self.parameters + self.optimizer + self.data

    def describe(self) -> str:
        return (f"about {gib(self.total)} (activations {gib(self.activations)}, weights and "
                f"gradients {gib(self.parameters)}, optimizer {gib(self.optimizer)}"
                + (f", data {gib(self.data)}" if self.data else "") + ")")


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


def estimate_training_bytes(mcfg, tcfg, n_params: int | None = None, data_bytes: int = 0,
                            float_bytes: int = FLOAT) -> MemoryEstimate:
    """The memory of one training step of batch tcfg.batch_size x mcfg.block_size tokens."""
    B, T, C = tcfg.batch_size, mcfg.block_size, mcfg.n_embd
    H, L, V = mcfg.n_head, mcfg.n_layer, mcfg.vocab_size
    tokens = B * T
    kept = tokens * (L * (22 * C + H * T) + 3 * V + 4 * C)
    transient = 3 * B * H * T * T
    from .model import count_parameters
    P = count_parameters(mcfg) if n_params is None else n_params
    return MemoryEstimate(activations=(kept + transient) * float_bytes,
                          parameters=2 * P * float_bytes, optimizer=2 * P * float_bytes,
                          data=data_bytes)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); None where
    there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(estimate: MemoryEstimate, available: int | None = None,
                 field: str = "batch_size") -> None:
    """Refuse a run whose estimate exceeds the available memory, before it allocates."""
    available = available_bytes() if available is None else available
    if available is not None and estimate.total > available:
        raise UserError(f"this run needs {estimate.describe()}, but this machine has "
                        f"{gib(available)} available; lower {{field}} or the block size, or "
                        "use a smaller model", field)
