"""dpokit: Direct Preference Optimization for causal language models.

    import dpokit
    cfg = dpokit.load_config("configs/quickstart.yaml", ["train.max_steps=10"])
    result = dpokit.train(cfg)                 # DPO (or its family: objective.loss)
    result = dpokit.train(cfg, method="sft")   # any method the CLI runs: dpo, sft, reward, ppo, online_dpo
    rounds = dpokit.iterate(cfg)               # iterative DPO: rounds of sample → judge → DPO
"""

from dpokit.config import Config
from dpokit.config_loader import load_config
from dpokit.errors import ConfigError, DataError, DpokitError, ModelError, TrainingError
from dpokit.methods.registry import METHODS

__version__ = "0.1.0"

__all__ = ["METHODS", "Config", "ConfigError", "DataError", "DpokitError", "ModelError", "TrainingError",
           "iterate", "load_config", "train"]


def train(config: Config, *, method: str | type = "dpo", resume: bool = False):
    """Train as configured with `method` (a name of `METHODS`: dpo, sft, reward, ppo, online_dpo); the function
    `dpokit train | sft | reward | ppo | online` call. Returns the `trainer.TrainResult`."""
    from dpokit.trainer import train as _train  # torch loads with the loop, not with `import dpokit`

    return _train(config, resume=resume, method=method)


def iterate(config: Config, *, resume: bool = False):
    """Iterative DPO, `iterate.rounds` rounds of sample → judge → pairs → DPO (`dpokit iterate`); returns the
    rounds (`pipeline.iterate.Round`), the last one's policy in `<output.dir>/round-R/model`."""
    from dpokit.pipeline.iterate import iterate as _iterate

    return _iterate(config, resume=resume)
