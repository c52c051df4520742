"""Model and training configuration, and the preset table.

The fields made with `setting()` are the flags of `randygpt train` (the CLI builds them from
this metadata: name, help, default); a preset fills in the model shape and the batch geometry,
and any flag given explicitly overrides it. The architecture's description (norm, activation,
biases, tied head) is data, not flags: randyGPT's own (RMSNorm, squared ReLU, no biases,
a separate head) and GPT-2's (LayerNorm, GELU, biases, tied head; randygpt/hf.py imports it).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from .errors import UserError


# The architecture's variable parts, as data: the model composes ops by these names, and the
# ops contract (ops/contract.py) provides each; another norm or activation is a new op pair
# plus a name here. "layernorm" and "gelu" (tanh approximation) are GPT-2's.
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("squared_relu", "gelu")


def setting(default, help: str, *, flag: str | None = None, preset: bool = False,
            positive: bool = False, parse=None):
    """A config field that is a flag of `randygpt train`: its help, its flag's name (default:
    the field name with dashes), whether a preset sets it, whether it must be at least 1, and
    a parser of its text when it is not a plain number (raises ValueError)."""
    return field(default=default, metadata=dict(
        help=help, flag=flag, preset=preset, positive=positive, parse=parse))


def parse_duration(text: str) -> float:
    """'180', '180s', '3m', '1h30m', '2.5m' -> seconds (a number alone is seconds)."""
    s = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?", s)
    if not s or parts is None or not any(parts.groups()):
        raise ValueError(f"{text!r} is not a duration: write e.g. 180s, 3m or 1h30m")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + sec


def flag_fields(cls) -> list:
    """The fields of a config class that are flags, in declaration order."""
    return [f for f in fields(cls) if "help" in f.metadata]


class _Config:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ModelConfig(_Config):
    vocab_size: int = 0       # set from the tokenizer (0: not known yet)
    block_size: int = setting(64, "context length in tokens", flag="block", preset=True,
                              positive=True)
    n_layer: int = setting(6, "number of transformer blocks", flag="layers", preset=True,
                           positive=True)
    n_embd: int = setting(128, "embedding width C", flag="dim", preset=True, positive=True)
    n_head: int = setting(8, "attention heads (must divide the width)", flag="heads",
                          preset=True, positive=True)
    dropout: float = setting(0.1, "dropout probability")
    # the architecture's description: data, not flags (GPT-2's comes from its config.json)
    norm: str = "rmsnorm"             # the norm before attention, MLP and the LM head
    norm_eps: float = 1e-5
    activation: str = "squared_relu"  # the MLP's nonlinearity: relu(x)^2, or "gelu"
    bias: bool = False                # biases on the four linear layers of each block
    tied_head: bool = False           # LM head = wte^T (no separate lm_head matrix)

    def validate(self, need_vocab: bool = True) -> None:
        """need_vocab=False: the shape alone, before a tokenizer has set vocab_size."""
        sizes = ("n_layer", "n_embd", "n_head", "block_size") + ("vocab_size",) * need_vocab
        for name in sizes:
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
        for name in ("bias", "tied_head"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{{field}} {getattr(self, name)!r} must be true or false", name)


@dataclass
class TrainConfig(_Config):
    iters: int = setting(2000, "total training iterations (the target when resuming)",
                         positive=True)
    batch_size: int = setting(32, "sequences per micro-batch (per rank under mpiexec)",
                              flag="batch", preset=True, positive=True)
    grad_accum: int = setting(1, "micro-batches per step and rank, their gradients summed: the "
                              "step's batch is batch x grad-accum x ranks", positive=True)
    lr: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup: int = setting(100, "linear warmup iterations")
    decay_frac: float = setting(0.3, "final fraction of the run over which the LR decays "
                                "(cosine)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.99, "AdamW beta2")
    weight_decay: float = setting(0.01, "AdamW decoupled weight decay (matrices only)")
    grad_clip: float = setting(1.0, "clip the global gradient L2 norm to this (0 = off)")
    eval_interval: int = setting(250, "evaluate every N iterations", positive=True)
    eval_iters: int = setting(20, "batches per loss estimate", positive=True)
    seed: int = setting(1337, "seed for init, batches and dropout; same seed + threads = same "
                        "losses")
    # when to stop, besides --iters (schedule.py)
    time_budget: float = setting(0.0, "stop after this much wall time, start-up and the final "
                                 "evaluation included (e.g. 180s, 3m, 1h30m; 0 = none); the LR "
                                 "schedule is fitted to it and --iters only caps it",
                                 parse=parse_duration)
    lr_on_plateau: int = setting(0, "multiply the LR by --plateau-factor when the val loss has "
                                 "not improved for N evaluations (0 = off)")
    plateau_factor: float = setting(0.5, "the LR factor of each plateau reduction")
    early_stop: int = setting(0, "stop when the val loss has not improved for N evaluations "
                              "(0 = off)")

    def validate(self) -> None:
        for f in fields(self):          # inf/NaN pass comparisons below, and JSON holds neither
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"{{field}} {getattr(self, f.name)} must be a finite number",
                                f.name)
        for name in ("iters", "batch_size", "grad_accum", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise UserError(f"{{field}} {getattr(self, name)} must be at least 1", name)
        if not self.lr > 0:
            raise UserError(f"{{field}} {self.lr} must be > 0", "lr")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"{{field}} {self.min_lr} must lie between 0 and the peak learning "
                            f"rate ({self.lr})", "min_lr")
        for name, low in (("warmup", 0), ("weight_decay", 0), ("grad_clip", 0),
                          ("time_budget", 0), ("lr_on_plateau", 0), ("early_stop", 0)):
            if getattr(self, name) < low:
                raise UserError(f"{{field}} {getattr(self, name)} must be >= 0", name)
        if not 0.0 <= self.decay_frac <= 1.0:
            raise UserError(f"{{field}} {self.decay_frac} must be in [0, 1]", "decay_frac")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{{field}} {getattr(self, name)} must be in [0, 1)", name)
        if not 0.0 < self.plateau_factor < 1.0:
            raise UserError(f"{{field}} {self.plateau_factor} must be in (0, 1)",
                            "plateau_factor")


# The seed's size table. "small" is the seed's v0.5 config (~1.2M parameters with a 65-char
# vocabulary). Block and batch are part of the preset because they set the cost of a step.
PRESETS: dict[str, dict] = {
    "tiny":   dict(n_layer=2,  n_embd=64,  n_head=4,  block_size=64,  batch_size=32),
    "small":  dict(n_layer=6,  n_embd=128, n_head=8,  block_size=64,  batch_size=32),
    "medium": dict(n_layer=6,  n_embd=256, n_head=8,  block_size=128, batch_size=32),
    "large":  dict(n_layer=12, n_embd=512, n_head=16, block_size=256, batch_size=16),
}
DEFAULT_PRESET = "small"
