"""randyGPT: a GPT language model with hand-written forward and backward passes on NumPy."""
from . import threads as _threads

_threads.apply()   # before NumPy/numba load: they read their thread settings once

from .config import PRESETS, ModelConfig, TrainConfig
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "TrainConfig", "PRESETS", "Checkpoint", "load_checkpoint",
           "save_checkpoint", "__version__"]
