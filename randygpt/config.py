"""Model and training configuration, and the preset table.

Every field here is a flag of `randygpt train`; a preset fills in the model shape and the
batch geometry, and any flag given explicitly overrides it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import UserError


# The architecture's variable parts, as data: the model composes ops by these names, and the
# ops contract (ops/contract.py) provides each. Only today's values exist; another norm or
# activation is a new op pair plus a name here.
NORMS = ("rmsnorm",)
ACTIVATIONS = ("squared_relu",)


@dataclass
class ModelConfig:
    vocab_size: int = 0       # set from the tokenizer (0: not known yet)
    block_size: int = 64      # context length T
    n_layer: int = 6
    n_embd: int = 128         # channels C
    n_head: int = 8
    dropout: float = 0.1
    norm: str = "rmsnorm"             # the norm before attention, MLP and the LM head
    norm_eps: float = 1e-5
    activation: str = "squared_relu"  # the MLP's nonlinearity: relu(x)^2
    bias: bool = False                # biases on the linear layers
    tied_head: bool = False           # LM head = wte^T (no separate lm_head matrix)

    def validate(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{{field}} {getattr(self, name)} must be at least 1", name)
        if self.n_embd % self.n_head:
            raise UserError(f"{{field}} {self.n_embd} is not divisible by the number of heads "
                            f"({self.n_head}); choose a multiple of it", "n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{{field}} {self.dropout} must be in [0, 1)", "dropout")
        if self.norm not in NORMS:
            raise UserError(f"{{field}} {self.norm!r} is not one of {', '.join(NORMS)}", "norm")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"{{field}} {self.activation!r} is not one of "
                            f"{', '.join(ACTIVATIONS)}", "activation")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise UserError(f"{{field}} {self.norm_eps} must be a positive number", "norm_eps")
        if self.bias or self.tied_head:
            raise UserError("biases and a tied LM head are not implemented yet", "bias"
                            if self.bias else "tied_head")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    iters: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100          # iterations of linear warmup
    decay_frac: float = 0.3    # the final fraction of the run that decays the LR (cosine)
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337

    def validate(self) -> None:
        if self.iters < 1:
            raise ValueError(f"--iters {self.iters} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"--batch {self.batch_size} must be at least 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}) and --lr > 0")
        if self.warmup < 0:
            raise ValueError(f"--warmup {self.warmup} must be >= 0")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"--decay-frac {self.decay_frac} must be in [0, 1]")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError("--beta1 and --beta2 must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay {self.weight_decay} must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip {self.grad_clip} must be >= 0 (0 turns clipping off)")
        if self.eval_interval < 1 or self.eval_iters < 1:
            raise ValueError("--eval-interval and --eval-iters must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The seed's size table. "small" is the seed's v0.5 config (~1.2M parameters with a 65-char
# vocabulary). Block and batch are part of the preset because they set the cost of a step.
PRESETS: dict[str, dict] = {
    "tiny":   dict(n_layer=2,  n_embd=64,  n_head=4,  block_size=64,  batch_size=32),
    "small":  dict(n_layer=6,  n_embd=128, n_head=8,  block_size=64,  batch_size=32),
    "medium": dict(n_layer=6,  n_embd=256, n_head=8,  block_size=128, batch_size=32),
    "large":  dict(n_layer=12, n_embd=512, n_head=16, block_size=256, batch_size=16),
}
DEFAULT_PRESET = "small"
