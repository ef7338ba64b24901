"""The run configuration: one dataclass per section, every key with its default, one-line description and
range or choices (`fields.opt`).

The checks across keys, one function per section, are `config_checks`'s; they run before any model or
data loads. Reading a YAML file and `section.key=value` overrides is `config_loader`'s job; the objectives'
facts are `objectives.registry`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dpokit import models
from dpokit.data.formats import FORMATS
from dpokit.fields import describe_fields, opt
from dpokit.objectives.registry import OBJECTIVES, names_where

F_DIVERGENCE = names_where(lambda o: o.f_divergence)


@dataclass
class ModelSection:
    name: str = opt(models.DEFAULT_MODEL,
                    f"policy to train: hub id, local HF directory, .gguf file, or the alias {models.DEFAULT_MODEL}")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) when `name` is a hub id")
    trust_remote_code: bool = opt(False, "allow model code shipped with a hub model to run (off unless asked)")
    attn_implementation: str = opt("sdpa", "attention kernel for the padded layout",
                                   choices=("sdpa", "eager", "flash_attention_2"))
    quantization: str = opt("none", "QLoRA: load the frozen base weights quantized with bitsandbytes (nf4: 4-bit "
                            "NormalFloat, int8: LLM.int8()) and train LoRA adapters on them; the reference is the "
                            "quantized base with adapters off", choices=("none", "nf4", "int8"))


@dataclass
class LoraSection:
    enabled: bool = opt(False, "train LoRA adapters (peft) instead of all weights")
    r: int = opt(16, "LoRA rank", min=1)
    alpha: float = opt(32.0, "LoRA scaling numerator (scale = alpha / r)", min=0, min_exclusive=True)
    dropout: float = opt(0.0, "dropout on the LoRA branch", min=0.0, max=1.0)
    target_modules: list[str] = opt(["all-linear"], "modules that get adapters ('all-linear' = every linear but the LM head)")
    merge_on_export: bool = opt(False, "merge the adapters into the base weights in the exported model")


@dataclass
class DataSection:
    train: str | None = opt(None, "training pairs (or KTO's unpaired rows, see `format`): .jsonl/.json/.parquet/.csv "
                            "file, datasets directory, or hub dataset name; messages may carry tool_calls and rows a "
                            "`tools` column, rendered through the chat template (a row it cannot render is refused)")
    train_split: str = opt("train", "split to read when `train` is a datasets dataset")
    eval: str | None = opt(None, "held-out pairs, same formats as `train`")
    eval_split: str = opt("test", "split to read when `eval` is a datasets dataset")
    eval_fraction: float = opt(0.0, "share of `train` held out for evaluation when `eval` is not given", min=0.0, max=0.5)
    max_length: int = opt(1024, "most tokens in prompt + completion; longer pairs are truncated", min=2)
    max_prompt_length: int = opt(512, "prompt tokens kept when a pair is over `max_length`", min=1)
    truncation_mode: str = opt("keep_end", "which end of an over-long prompt to keep, or `error` to reject such rows",
                               choices=("keep_end", "keep_start", "error"))
    skip_invalid: bool = opt(False, "skip invalid rows (counted by reason and listed in the run directory) instead of stopping")
    use: str = opt("auto", "what the rows are: pairs (prompt/chosen/rejected), chosen (the chosen side of pairs, "
                   "for sft: Preferred-FT), completion (prompt/completion or messages rows, for sft); auto: pairs "
                   "for train, completion for sft", choices=("auto", "pairs", "chosen", "completion"))
    format: str = opt("auto", "the rows' schema: standard (dpokit's/TRL's fields), hh_rlhf (Anthropic HH transcripts), "
                      "ultrafeedback (UltraFeedback-binarized), summarize_from_feedback (OpenAI TL;DR comparisons), "
                      "shp (Stanford SHP), kto (unpaired prompt/completion/label); auto: detected from the fields "
                      "where they name a schema (all but hh_rlhf), else standard", choices=FORMATS)
    chat_template: str | None = opt(None, "a Jinja chat template, or a file holding one, used instead of the "
                                    "tokenizer's (and saved with the exported model)")


@dataclass
class ObjectiveSection:
    loss: str | list[str] = opt("sigmoid", "preference objective, or a list of them summed with `loss_weights` "
                                "(TRL's loss_type list, e.g. MPO: [sigmoid, bco_pair])", choices=tuple(OBJECTIVES))
    loss_weights: list[float] = opt([], "weight of each objective in `loss`, in order (empty: 1 each)")
    beta: float = opt(0.1, "β: strength of the KL constraint (τ for IPO, reward scale for SimPO; ORPO and "
                      "unlikelihood do not use it)", min=0.0, min_exclusive=True)
    label_smoothing: float = opt(0.0, "ε: assumed rate of flipped labels (cDPO with sigmoid, rDPO with robust, EXO's "
                                 "label smoothing with exo_pair: the paper suggests 1e-3; aot, aot_unpaired)",
                                 min=0.0, max=0.4999)
    ipo_form: str = opt("length_normalized", "IPO on per-token log-ratios (TRL) or on summed log-ratios (authors)",
                        choices=("length_normalized", "summed"))
    simpo_gamma: float = opt(0.5, "γ: target reward margin of SimPO", min=0.0)
    nll_weight: float = opt(0.0, "weight of the chosen completion's token-mean NLL added to the loss (RPO)", min=0.0)
    unlikelihood_alpha: float = opt(1.0, "α: weight of the rejected completion's token unlikelihood term "
                                    "(objective.loss=unlikelihood; the DPO paper tried 0.05 to 1)", min=0.0)
    discopop_tau: float = opt(0.05, "τ: temperature of DiscoPOP's log-ratio modulation (the paper's 0.05)", min=0.0,
                              min_exclusive=True)
    dpop_lambda: float = opt(50.0, "λ: DPO-Positive's penalty on the chosen log-prob falling below the reference's "
                             "(Pal et al. 2024 used 50)", min=0.0)
    orpo_lambda: float = opt(0.1, "λ: weight of ORPO's odds-ratio term next to the NLL (Hong et al. 2024: 0.1; TRL's "
                             "ORPO beta)", min=0.0)
    kto_desirable_weight: float = opt(1.0, "λ_D: weight of KTO's desirable completions (keep λ_D n_D / (λ_U n_U) in "
                                      "[1, 4/3], the paper advises)", min=0.0, min_exclusive=True)
    kto_undesirable_weight: float = opt(1.0, "λ_U: weight of KTO's undesirable completions", min=0.0,
                                        min_exclusive=True)
    f_divergence: str = opt("reverse_kl", "f-DPO (Wang et al. 2023): the divergence to the reference, reverse_kl being "
                            "DPO's; for the losses of the log-ratio difference (" + ", ".join(F_DIVERGENCE) + ")",
                            choices=("reverse_kl", "forward_kl", "js", "alpha"))
    f_alpha: float = opt(0.5, "α of f_divergence=alpha, f'(u) = (u^(α-1) - 1)/(α-1) (TRL's f_alpha_divergence_coef; "
                         "Wang et al.'s Table 1 writes (1 - u^(-α))/α: their α is 1 - this one)",
                         min=0.0, min_exclusive=True)
    ld_alpha: float | None = opt(None, "LD-DPO (Liu et al. 2024): weight of the log-probs of tokens past the shorter "
                                 "completion's length, in policy and reference alike (0: ignore them, 1: plain "
                                 "DPO); null: off", min=0.0, max=1.0)
    wpo: bool = opt(False, "WPO (Zhou et al. 2024): weight each pair by the policy's length-normalised probability of "
                    "both completions (TRL's use_weighting)")
    weight_field: str | None = opt("weight", "the row field holding a per-pair loss weight (a number >= 0) that "
                                   "scales the pair's loss; used when the rows have it, null to ignore it")

    @property
    def losses(self) -> list[str]:
        """`loss` as a list: one objective, or the ones a run sums."""
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    @property
    def name(self) -> str:
        return "+".join(self.losses)

    @property
    def needs_reference(self) -> bool:
        return any(OBJECTIVES[name].needs_reference if name in OBJECTIVES else True for name in self.losses)


@dataclass
class ReferenceSection:
    name: str | None = opt(None, "a reference model other than the policy's start: hub id, local HF directory, "
                           ".gguf file, LoRA adapter directory (on its base), or a dpokit run or checkpoint; it must "
                           "use the policy's tokenizer (default: the policy's start, model.name)")
    strategy: str = opt("auto", "reference model: auto | copy | adapters (LoRA) | precomputed | none (reference-free)",
                        choices=("auto", "copy", "adapters", "precomputed", "none"))
    dtype: str | None = opt(None, "dtype of the frozen copy (default: the policy's)", choices=(None, *models.DTYPES))
    cache_dir: str = opt("~/.cache/dpokit/reference-logps", "where precomputed reference log-probs are cached")
    sync_every: int = opt(0, "TR-DPO (Gorbatovski et al. 2024): every this many steps the reference moves toward "
                          "the policy, π_ref ← α π_θ + (1-α) π_ref (soft: 1 with α < 1; hard: e.g. 512 with α = 1; "
                          "TRL's ref_model_sync_steps); 0: a fixed reference", min=0)
    sync_alpha: float = opt(1.0, "α of reference.sync_every: the policy's share in the new reference (1: a copy of "
                            "the policy; TRL's ref_model_mixup_alpha)", min=0.0, max=1.0, min_exclusive=True)


@dataclass
class RewardSection:
    center_coefficient: float = opt(0.0, "dpokit reward: c, weight of the reward-centering term c·(r_w + r_l)² "
                                    "(TRL's center_rewards_coefficient; 0.01 is the value it suggests)", min=0.0)
    margin_field: str | None = opt("margin", "dpokit reward: the row field holding a per-pair margin m, "
                                   "loss −log σ(r_w − r_l − m) (TRL's margin column); used when the rows have it, "
                                   "null to ignore it")


@dataclass
class PPOSection:
    judge: str | None = opt(None, "dpokit ppo: the sequence reward, any judge (sentiment, length, keywords, "
                            "module:function: PPO-GT) or a trained reward model (reward-model with judge_model DIR)")
    judge_model: str | None = opt(None, "dpokit ppo: the judge's model (a reward model's directory or hub id)")
    judge_options: list[str] = opt([], "dpokit ppo: the judge's key=value options (as --judge-option)")
    template: str = opt("auto", "dpokit ppo: chat template for the prompts (data.train): auto applies it to "
                        "conversations, and to string prompts when the model has one; none continues plain text",
                        choices=("auto", "chat", "none"))
    max_new_tokens: int = opt(53, "dpokit ppo: most tokens per rollout (TRL's response_length, the N+ details' 53)",
                              min=1)
    epochs: int = opt(4, "dpokit ppo: passes over each rollout batch (TRL's num_ppo_epochs; the N+ details: 4)", min=1)
    minibatch_size: int = opt(0, "dpokit ppo: rollouts per optimizer update, a divisor of train.batch_size "
                              "(0: the whole batch, TRL's num_mini_batches=1)", min=0)
    clip_range: float = opt(0.2, "dpokit ppo: ε of the clipped policy ratio (TRL's cliprange)", min=0.0,
                            min_exclusive=True)
    value_clip_range: float | None = opt(0.2, "dpokit ppo: c of the clipped value loss (TRL's cliprange_value); "
                                         "null: unclipped", min=0.0)
    vf_coef: float = opt(0.1, "dpokit ppo: weight of the value loss (TRL's vf_coef)", min=0.0)
    gamma: float = opt(1.0, "dpokit ppo: γ, discount of GAE (TRL, the N+ details: 1)", min=0.0, max=1.0)
    lam: float = opt(0.95, "dpokit ppo: λ of GAE (TRL, the N+ details: 0.95)", min=0.0, max=1.0)
    kl_coef: float = opt(0.05, "dpokit ppo: β of the per-token KL penalty (TRL, the N+ details: 0.05); the start "
                         "value when target_kl is set", min=0.0)
    target_kl: float | None = opt(None, "dpokit ppo: sequence KL the adaptive controller steers β toward (Ziegler "
                                  "et al. 2019: 6 on sentiment; the DPO paper: 3, 6, 9, 12); null: β fixed",
                                  min=0.0, min_exclusive=True)
    kl_horizon: int = opt(10000, "dpokit ppo: horizon of the adaptive controller in rollouts (Ziegler et al., TRL: "
                          "10000)", min=1)
    missing_eos_penalty: float | None = opt(None, "dpokit ppo: subtracted from the reward of a rollout cut at "
                                            "max_new_tokens without EOS (the N+ details' EOS trick; TRL's "
                                            "missing_eos_penalty); null: none", min=0.0)
    whiten_rewards: bool = opt(False, "dpokit ppo: whiten the KL-shaped per-token rewards of each batch before "
                               "GAE (TRL's whiten_rewards)")
    normalize_scores: bool = opt(True, "dpokit ppo: shift and scale the judge's scores to mean 0, std 1 on the "
                                 "first batch, sampled from the start policy, for the whole run, so that β_KL and "
                                 "ppo.missing_eos_penalty are in its std's units (the N+ details only shift the "
                                 "reward model, to mean 0 on reference samples); false: scores as given")


@dataclass
class OnlineSection:
    judge: str | None = opt(None, "dpokit online: the judge that ranks each prompt's samples, any judge (sentiment, length, "
                            "keywords, module:function, llm with mode=score; llm comparing pairs ranks each sample by its "
                            "mean win probability over the prompt's others) or a trained reward model (reward-model "
                            "with judge_model DIR)")
    judge_model: str | None = opt(None, "dpokit online: the judge's model (a reward model's directory or hub id)")
    judge_options: list[str] = opt([], "dpokit online: the judge's key=value options (as --judge-option)")
    template: str = opt("auto", "dpokit online: chat template for the prompts (data.train): auto applies it to "
                        "conversations, and to string prompts when the model has one; none continues plain text",
                        choices=("auto", "chat", "none"))
    samples: int = opt(2, "dpokit online: K, completions sampled per prompt at every step from the current policy "
                       "(Guo et al. 2024: 2)", min=2)
    pairing: str = opt("best-vs-worst", "dpokit online: which pairs train: best-vs-worst (one a prompt) or all-pairs "
                       "(every two samples of a prompt)", choices=("best-vs-worst", "all-pairs"))
    margin: float = opt(0.0, "dpokit online: drop pairs whose scores differ by less than this; ties are always dropped "
                        "(and counted, as every dropped pair)", min=0.0)
    temperature: float = opt(1.0, "dpokit online: sampling temperature", min=0.0, min_exclusive=True)
    top_p: float = opt(1.0, "dpokit online: nucleus mass, 1 for off", min=0.0, min_exclusive=True, max=1.0)
    max_new_tokens: int = opt(53, "dpokit online: most tokens a sample", min=1)
    missing_eos_penalty: float | None = opt(None, "dpokit online, iterate: subtracted from the score of a sample "
                                            "cut at max_new_tokens without EOS before ranking (as "
                                            "ppo.missing_eos_penalty); null: none", min=0.0)
    beta_schedule: list[float] = opt([], "dpokit online: β by step, [b0, ..., b(n-1)]: step s of T uses b(min(n-1, "
                                     "s*n // T)), so each value holds for an n-th of the run (TRL's per-epoch beta "
                                     "list, over steps); empty: objective.beta throughout")


@dataclass
class IterateSection:
    rounds: int = opt(3, "dpokit iterate: R, rounds of sample → judge → pairs → DPO, each from the latest policy "
                      "(RLHFlow's recipe: 3); the samples, the judge and the pairing are the online section's",
                      min=1)
    reference: str = opt("start", "dpokit iterate: each round's reference, the start model (Xiong et al.'s KL to the "
                         "initial policy) or the previous round's policy (RLHFlow's run_loop.sh since 2024-10)",
                         choices=("start", "previous"))
    prompts_per_round: int = opt(0, "dpokit iterate: P, prompts sampled a round: round r takes data.train's prompts "
                                 "(r-1)·P to r·P-1, wrapping at its end, so the rounds see different prompts "
                                 "(RLHFlow splits its prompt set by iteration); 0: every prompt every round", min=0)


@dataclass
class GenerationSection:
    backend: str = opt("transformers", "what samples completions during training (PPO's rollouts, train.sample_every): "
                       "transformers (dpokit's decode loop on the live policy); the seam a vLLM backend plugs into, "
                       "dpokit.generation.backends", choices=("transformers",))


OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "rmsprop")
# train.preset: each preset's settings, applied to the keys the user did not set. `batch_size` stands for the value
# of train.batch_size (one forward pass per update: optimizer_in_backward allows no gradient accumulation).
PRESETS = {
    "lean": {
        "reference.strategy": "precomputed",  # no reference model in memory (objectives that need one)
        "train.gradient_checkpointing": True,  # keep each decoder layer's input, recompute the rest
        "train.optimizer": "adamw8bit",  # 2 bytes of optimizer state a parameter instead of 8
        "train.optimizer_in_backward": True,  # no full set of gradients
        "train.micro_batch_size": "batch_size",  # in-backward updates allow no accumulation
        "train.max_grad_norm": 0.0,  # nor global-norm clipping
        "train.release_freed_memory": True,  # on a CPU, freed temporaries leave the process's memory at once
    },
}


@dataclass
class TrainSection:
    epochs: int = opt(1, "passes over the training pairs", min=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)", min=0)
    batch_size: int = opt(8, "pairs per optimizer step, over all processes", min=1)
    micro_batch_size: int = opt(4, "pairs per forward pass on one process (gradient accumulation makes up the rest)", min=1)
    optimizer: str = opt("adamw", "optimizer: adamw (fp32 state, 8 bytes a parameter), adamw8bit (bitsandbytes, "
                         "block-wise 8-bit moments, 2 bytes a parameter), adamw4bit (torchao, 4-bit moments, 1 byte), "
                         "rmsprop", choices=OPTIMIZERS)
    optimizer_in_backward: bool = opt(False, "update each parameter and free its gradient as soon as its gradient is "
                                      "complete in the backward pass, so the gradients never all exist at once; "
                                      "excludes gradient accumulation (micro_batch_size = batch_size), global-norm "
                                      "clipping (max_grad_norm=0) and multi-process runs")
    lr: float = opt(1e-6, "peak learning rate", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (RMSprop)", min=0.0)
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW β1, β2")
    eps: float = opt(1e-8, "optimizer ε", min=0.0, min_exclusive=True)
    schedule: str = opt("linear", "learning-rate decay after warm-up", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warm-up steps (overrides warmup_ratio when > 0)", min=0)
    warmup_ratio: float = opt(0.0, "warm-up as a share of all steps", min=0.0, max=1.0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)", min=0.0)
    precision: str = opt("auto", "fp32, bf16-mixed (autocast), bf16 (weights in bf16), or auto (bf16-mixed where the "
                         "hardware has fast bf16 matmul, else fp32)", choices=("auto", "fp32", "bf16-mixed", "bf16"))
    layout: str = opt("prefix_shared", "batch layout: prefix_shared (packed, each prompt computed once per pair), "
                      "packed (no padding), or padded (TRL's)",
                      choices=("padded", "packed", "prefix_shared"))
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    activation_offload: bool = opt(False, "GPU only: keep the activations saved for the backward pass in pinned CPU "
                                   "memory (with gradient checkpointing: the decoder layers' inputs), copied back "
                                   "when the backward pass needs them")
    preset: str = opt("none", "lean: the least memory for the speed (sets, unless given: " + "; ".join(
        f"{k}={v}" for k, v in PRESETS["lean"].items()) + ")", choices=("none", *PRESETS))
    compile: bool = opt(False, "torch.compile the decoder layers")
    lm_head: str = opt("selective", "selective: LM head only where a completion token is predicted, in chunks; "
                       "full: all logits (the plain path, for comparison)", choices=("selective", "full"))
    logps_chunk_tokens: int = opt(128, "completion tokens per LM-head chunk (bounds the logits memory: 128 fp32 rows "
                                  "of a 49k vocabulary are 25 MB, under the size from which glibc maps each "
                                  "temporary anew)", min=1)
    release_freed_memory: bool = opt(False, "CPU only: give freed tensor memory back to the system at once (glibc's "
                                     "mmap threshold fixed at 64 kB, dpokit.host_memory) instead of keeping it in the "
                                     "heap: a lower peak for 20-30% more time per step; nothing on a GPU")
    reuse_freed_memory: bool = opt(False, "CPU only: keep all freed tensor memory in glibc's heap for reuse (no "
                                   "mappings, no trimming, dpokit.host_memory) instead of mapping large blocks anew "
                                   "at every step: measured 12-14% less time per fp32 step, its peak the same to 8% "
                                   "higher; nothing on a GPU")
    huge_pages: bool = opt(True, "back PyTorch's CPU tensors of 2 MB and up with transparent huge pages (PyTorch's "
                           "THP_MEM_ALLOC_ENABLE, dpokit.host_memory), unless the environment sets that switch: "
                           "measured 9-13% less time per CPU step on an AMX Xeon, the same time and a 0.5 GB "
                           "lower peak on an AMD EPYC; read at the process's first tensor, so set before the model "
                           "loads")
    seed: int = opt(42, "seed for data order and initialisation")
    eval_every: int = opt(0, "evaluate on held-out pairs every N steps (0: before and after training only)", min=0)
    log_every: int = opt(1, "log metrics every N steps", min=1)
    max_nonfinite_steps: int = opt(3, "stop after this many steps with a non-finite loss or gradient (each is skipped)", min=1)
    sample_every: int = opt(0, "every N steps, generate for a fixed set of held-out prompts and write them to "
                            "<run>/samples.jsonl and the trackers (0: never)", min=0)
    sample_prompts: str | None = opt(None, "prompt file of those prompts (.jsonl/.json rows with 'prompt', or .txt "
                                     "lines); default: the first prompts of the held-out pairs")
    sample_count: int = opt(4, "how many prompts to generate for", min=1)
    sample_max_new_tokens: int = opt(64, "most tokens per generation", min=1)
    sample_temperature: float = opt(0.0, "sampling temperature of the generations, 0 for greedy", min=0.0)
    sample_top_p: float = opt(1.0, "nucleus mass of the generations, 1 for off", min=0.0, min_exclusive=True, max=1.0)
    sample_judge: str | None = opt(None, "a judge that scores the generations (as --judge: sentiment, llm, ...); its "
                                   "mean is logged as samples/score")
    sample_judge_model: str | None = opt(None, "the judge's model (as --judge-model)")
    sample_judge_options: list[str] = opt([], "the judge's key=value options (as --judge-option)")


@dataclass
class CheckpointSection:
    every: int = opt(100, "write a checkpoint every N steps (0: only when the run stops)", min=0)
    keep: int = opt(2, "most recent checkpoints kept whole (resumable)", min=1)
    keep_models: int = opt(0, "older checkpoints whose model alone is kept, for evaluation along the run", min=0)


@dataclass
class OutputSection:
    dir: str = opt("runs/dpo", "run directory: metrics, checkpoints, final model")
    report_to: list[str] = opt(["tensorboard"], "experiment trackers, any of tensorboard, wandb, mlflow, trackio "
                               "([]: none; wandb, mlflow and trackio are pip extras: pip install dpokit[wandb]); "
                               "replaces output.tensorboard, still read: true adds tensorboard, false removes it")
    project: str = opt("dpokit", "W&B / trackio project and MLflow experiment the run is logged under")
    run_name: str | None = opt(None, "the tracker run's name (default: the run directory's name)")
    wandb_mode: str | None = opt(None, "W&B mode: online or offline (default: W&B's own, WANDB_MODE, else online)",
                                 choices=(None, "online", "offline"))
    mlflow_tracking_uri: str | None = opt(None, "MLflow store: sqlite:///mlflow.db, http://host:5000, ... (default: "
                                          "MLflow's own, MLFLOW_TRACKING_URI)")
    overwrite: bool = opt(False, "start over in a run directory that already holds a run (else: error, or --resume)")


@dataclass
class DistributedSection:
    strategy: str = opt("ddp", "multi-process strategy under torchrun: ddp (replicated) or fsdp (FSDP2 sharded)",
                        choices=("ddp", "fsdp"))
    backend: str = opt("auto", "process-group backend (auto: nccl on GPU, gloo on CPU)", choices=("auto", "gloo", "nccl"))
    cpu_offload: bool = opt(False, "with strategy=fsdp: keep the sharded parameters, gradients and optimizer state "
                            "in CPU memory (FSDP2's CPUOffloadPolicy); the optimizer steps on the CPU")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "lora": LoraSection,
    "data": DataSection,
    "objective": ObjectiveSection,
    "reference": ReferenceSection,
    "reward": RewardSection,
    "ppo": PPOSection,
    "online": OnlineSection,
    "iterate": IterateSection,
    "generation": GenerationSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "output": OutputSection,
    "distributed": DistributedSection,
}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    reward: RewardSection = field(default_factory=RewardSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    online: OnlineSection = field(default_factory=OnlineSection)
    iterate: IterateSection = field(default_factory=IterateSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output: OutputSection = field(default_factory=OutputSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    # keys the user set (YAML or overrides), so checks like "a LoRA option without LoRA" can tell them from defaults
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def apply_preset(self) -> None:
        """train.preset's settings (PRESETS) on the keys the user did not set; `load_config` calls it before
        `check_config`. The lean preset keeps the reference as it is with LoRA (disabled adapters take no
        memory) and for reference-free objectives."""
        for dotted, value in PRESETS.get(self.train.preset, {}).items():
            if dotted in self.explicit:
                continue
            if dotted == "reference.strategy" and (self.lora.enabled or not self.objective.needs_reference):
                continue
            section, _, key = dotted.partition(".")
            setattr(getattr(self, section), key, self.train.batch_size if value == "batch_size" else value)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def describe() -> str:
    """Every key with its default and description, for `dpokit train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"{section}:", *describe_fields(cls)]
    return "\n".join(lines)
