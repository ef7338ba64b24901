"""Run under torchrun by tests/test_distributed.py: several trainings in one process group.

usage: torchrun --nproc-per-node 2 tests/distributed_worker.py RUNS.json
RUNS.json: {"name": [override, ...], ...}; a name starting "sft-", "reward-", "ppo-" or "online-" trains that method
(DPO otherwise); a name ending in "-crash" raises at step 2 (both ranks, after the step-2 checkpoint), then the
same run resumes to the end.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from dpokit.config_loader import load_config
from dpokit.methods.dpo import DPO
from dpokit.methods.online_dpo import OnlineDPO
from dpokit.methods.ppo import PPO
from dpokit.methods.reward import RewardModel
from dpokit.methods.sft import SFT
from dpokit.trainer import Trainer, train


def method_of(name: str) -> type:
    return {"sft": SFT, "reward": RewardModel, "ppo": PPO, "online": OnlineDPO}.get(name.split("-")[0], DPO)


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    real_step = Trainer.train_step
    for name, overrides in runs.items():
        cfg = load_config(None, overrides)
        if name.endswith("-crash"):
            def crash(self, ids):
                if self.step == 2:
                    raise RuntimeError("simulated crash")
                return real_step(self, ids)

            Trainer.train_step = crash
            try:
                train(cfg, method=method_of(name))
            except RuntimeError as e:
                assert "simulated crash" in str(e)
            Trainer.train_step = real_step
            train(cfg, resume=True, method=method_of(name))
        else:
            train(cfg, method=method_of(name))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
