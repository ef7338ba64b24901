"""dpokit: Direct Preference Optimization for causal language models."""

from dpokit.config import Config
from dpokit.errors import ConfigError, DataError, DpokitError, ModelError, TrainingError

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "DataError", "DpokitError", "ModelError", "TrainingError", "train"]


def train(config: Config, *, resume: bool = False):
    """Run DPO training as configured; the same function `dpokit train` calls."""
    from dpokit.train import train as _train

    return _train(config, resume=resume)
