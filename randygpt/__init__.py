"""randyGPT: a GPT language model with hand-written forward and backward passes on NumPy."""
from .config import PRESETS, ModelConfig, TrainConfig
from .model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "TrainConfig", "PRESETS", "__version__"]
