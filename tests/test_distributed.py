"""torchrun with 2 CPU processes (gloo): the same losses and weights as 1 process with the same global batch,
for DDP and FSDP2, full fine-tuning and LoRA, and for SFT, the reward model and PPO; resume in the 2-rank run
(DPO under DDP and FSDP2, with LoRA dropout, and PPO under FSDP2);
the CLI under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpokit.config_loader import load_config
from dpokit.metrics import read_metrics
from dpokit.trainer import train
from tests.helpers import PAIRS, write_jsonl

pytestmark = pytest.mark.slow  # torchrun launches

CASES = {
    "ddp-full": ["distributed.strategy=ddp"],
    "ddp-lora": ["distributed.strategy=ddp", "lora.enabled=true", "lora.r=4", "train.lr=5e-3"],
    "fsdp-full": ["distributed.strategy=fsdp"],
    "fsdp-lora": ["distributed.strategy=fsdp", "lora.enabled=true", "lora.r=4", "train.lr=5e-3"],
    # FSDP2's CPUOffloadPolicy: sharded parameters, gradients and optimizer state in CPU memory (on a CPU-only
    # machine the copies to and from the device are CPU to CPU; what a GPU saves is not measured here)
    "fsdp-offload": ["distributed.strategy=fsdp", "distributed.cpu_offload=true"],
}

# the other methods on the loop, each under DDP and FSDP2 (PPO samples its rollouts through FSDP2's root)
METHOD_CASES = {f"{method}-{strategy}": [f"distributed.strategy={strategy}", *extra]
                for method, extra in (("sft", ["data.use=chosen"]), ("reward", []),
                                      ("reward-lora", ["lora.enabled=true", "lora.r=4", "train.lr=5e-3"]),
                                      ("ppo", ["ppo.judge=length", "ppo.max_new_tokens=8", "ppo.template=none",
                                               "ppo.minibatch_size=2", "ppo.epochs=2", "train.precision=fp32"]),
                                      ("online", ["online.judge=length", "online.max_new_tokens=8",
                                                  "online.template=none", "online.samples=3", "train.precision=fp32"]))
                for strategy in ("ddp", "fsdp")}


def torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": " " + c, "rejected": " " + r}
                                              for p, c, r in PAIRS * 2])

    def overrides(name, *extra):
        return [f"model.name={tiny_model_dir}", f"data.train={data}", f"output.dir={root / name}",
                "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.max_steps=4",
                "train.epochs=2", "checkpoint.every=2", "output.tensorboard=false", "output.overwrite=true",
                f"reference.cache_dir={root / 'refcache'}", *extra]

    runs = {f"{name}-2rank": overrides(f"{name}-2rank", *extra) for name, extra in (CASES | METHOD_CASES).items()}
    runs["ddp-full-2rank-crash"] = overrides("ddp-full-2rank-crash", *CASES["ddp-full"])
    runs["fsdp-lora-2rank-crash"] = overrides("fsdp-lora-2rank-crash", *CASES["fsdp-lora"])
    # LoRA dropout: each rank draws its own masks, as many numbers as its batch's tokens, so its RNG is its own
    for name in ("ddp-lora-dropout-2rank", "ddp-lora-dropout-2rank-crash"):
        runs[name] = overrides(name, *CASES["ddp-lora"], "lora.dropout=0.1")
    runs["ppo-fsdp-2rank-crash"] = overrides("ppo-fsdp-2rank-crash", *METHOD_CASES["ppo-fsdp"])
    spec = root / "runs.json"
    spec.write_text(json.dumps(runs))
    torchrun(str(Path(__file__).with_name("distributed_worker.py")), str(spec))
    return root, overrides


def weights(run_dir: Path) -> dict:
    model = run_dir / "model"
    name = "adapter_model.safetensors" if (model / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(model / name))


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_rank(setup, name):
    root, overrides = setup
    one = train(load_config(None, overrides(f"{name}-1rank", *CASES[name])))
    two = root / f"{name}-2rank"
    losses_1 = [r["loss"] for r in read_metrics(one.run_dir) if "loss" in r]
    losses_2 = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert len(losses_2) == 4
    assert losses_2 == pytest.approx(losses_1, abs=1e-5)
    margins = [r["rewards/margins"] for r in read_metrics(two) if "loss" in r]
    assert abs(margins[-1]) > 1e-4  # the runs moved away from the reference
    w1, w2 = weights(one.run_dir), weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_other_methods_on_two_ranks_match_one_rank(setup, name):
    from .distributed_worker import method_of

    root, overrides = setup
    one = train(load_config(None, overrides(f"{name}-1rank", *METHOD_CASES[name])), method=method_of(name))
    losses_1 = [r["loss"] for r in read_metrics(one.run_dir) if "loss" in r and "step" in r]
    losses_2 = [r["loss"] for r in read_metrics(root / f"{name}-2rank") if "loss" in r and "step" in r]
    assert len(losses_2) == 4 and losses_2 == pytest.approx(losses_1, abs=1e-5)
    w1, w2 = weights(one.run_dir), weights(root / f"{name}-2rank")
    # the losses agree to 1e-5; the weights within 1e-4: on an AMD EPYC, SFT's differed by 2.2e-5 after 4 AdamW
    # steps at lr 1e-3 (gloo's all-reduce sums in another order, and Adam divides tiny gradients by tinier moments)
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


@pytest.mark.parametrize("name", ["ddp-full", "fsdp-lora", "ddp-lora-dropout", "ppo-fsdp"])
def test_two_rank_run_resumes_exactly(setup, name):
    root, _ = setup
    straight, resumed = weights(root / f"{name}-2rank"), weights(root / f"{name}-2rank-crash")
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k
    steps = [r["step"] for r in read_metrics(root / f"{name}-2rank-crash") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_cli_under_torchrun_with_precomputed_reference(setup, tmp_path):
    """`torchrun -m dpokit train CONFIG` with no other change; the reference pass is split over ranks."""
    root, overrides = setup
    cfg = load_config(None, overrides("cli", "reference.strategy=precomputed", f"reference.cache_dir={tmp_path}"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = torchrun("-m", "dpokit", "train", str(path))
    assert "2 process(es) on cpu" in proc.stdout
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # one cache for both ranks
    two = [r["loss"] for r in read_metrics(root / "cli") if "loss" in r]
    one = train(load_config(None, overrides("cli-1rank", "reference.strategy=precomputed",
                                            f"reference.cache_dir={tmp_path}")))
    assert two == pytest.approx([r["loss"] for r in read_metrics(one.run_dir) if "loss" in r], abs=1e-5)


def test_iterate_under_torchrun_matches_one_process(tmp_path, tiny_model_dir):
    """`torchrun -m dpokit iterate`: rank 0 alone samples, judges and writes each round's files, every rank trains
    the round's DPO; 2 rounds on 2 ranks give 1 process's pairs files, byte for byte, and its final weights."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _, _ in PAIRS * 2])

    def overrides(name):
        return [f"model.name={tiny_model_dir}", f"data.train={prompts}", f"output.dir={tmp_path / name}",
                "online.judge=length", "online.samples=4", "online.max_new_tokens=8", "online.template=none",
                "iterate.rounds=2", "iterate.reference=previous", "train.batch_size=4", "train.micro_batch_size=2",
                "train.lr=1e-3", "train.epochs=2", "checkpoint.every=0", "output.report_to=[]",
                "train.precision=fp32", f"reference.cache_dir={tmp_path / 'refcache'}"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "dpokit", "iterate", *overrides("one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-4000:]
    two = torchrun("-m", "dpokit", "iterate", *overrides("two"))
    assert two.stdout.count("[round 2/2] sample") == 1  # rank 0 alone samples
    for r in (1, 2):
        a, b = (tmp_path / name / f"round-{r}" / "pairs.jsonl" for name in ("one", "two"))
        assert a.read_bytes() == b.read_bytes() and a.read_text().strip(), r
    w1, w2 = weights(tmp_path / "one" / "round-2"), weights(tmp_path / "two" / "round-2")
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
