"""The checks across a config's keys, one function per section, that `check_config` runs before any model
or data loads: the declared ranges and choices, each section's rules, then the files, models and packages
the config names; `check_runtime`: what the device and the process count allow. The settings only one
method reads are that method's `check` (`dpokit.methods`); the schema is `dpokit.config`.
"""

from __future__ import annotations

from dpokit import models
from dpokit.config import F_DIVERGENCE, SECTIONS, Config, LoraSection
from dpokit.data.sources import missing_file
from dpokit.data.tokenize import chat_template_text
from dpokit.errors import ConfigError
from dpokit.fields import check_fields
from dpokit.objectives.registry import OBJECTIVES, names_where
from dpokit.trackers import check_report_to

SMOOTHED = names_where(lambda o: o.smoothing)


def check_config(cfg: Config, *, need_data: bool = True) -> None:
    """Every check of every section; each failure is one clear line. `need_data=False`: data.train may
    be missing (a memory estimate from the config alone)."""
    for section in SECTIONS:
        check_fields(getattr(cfg, section), section)
    for check in (_check_model, _check_lora, _check_data, _check_objective, _check_reference, _check_train,
                  _check_distributed):
        check(cfg)
    _check_environment(cfg, need_data=need_data)  # the rules first, then the disk and packages


def _check_model(cfg: Config) -> None:
    q = cfg.model.quantization
    if q == "none":
        return
    if not cfg.lora.enabled:
        raise ConfigError(f"model.quantization={q} trains LoRA adapters on a frozen quantized base: add "
                          "lora.enabled=true")
    if cfg.reference.strategy == "copy":
        raise ConfigError(f"model.quantization={q}: the reference is the quantized base with its adapters off "
                          "(reference.strategy=adapters, or precomputed), not a copy")
    if cfg.distributed.strategy == "fsdp":
        raise ConfigError(f"model.quantization={q} does not shard under FSDP2; use distributed.strategy=ddp")
    if cfg.lora.merge_on_export:
        raise ConfigError(f"model.quantization={q}: merging adapters into quantized weights would export a "
                          "quantized model; export the adapter (lora.merge_on_export=false) and merge it "
                          "into the float base")


def _check_lora(cfg: Config) -> None:
    # a LoRA option set to something other than its default has no effect without LoRA: say so; the
    # same option at its default (e.g. in the full config.yaml a run writes) is harmless
    defaults = LoraSection()
    keys = sorted(k for k in cfg.explicit if k.startswith("lora.") and k != "lora.enabled"
                  and getattr(cfg.lora, k[5:]) != getattr(defaults, k[5:]))
    if keys and not cfg.lora.enabled:
        raise ConfigError(f"{keys[0]} is set but LoRA is off: add lora.enabled=true or remove it")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(f"data.max_prompt_length ({d.max_prompt_length}) must be less than data.max_length "
                          f"({d.max_length}) to leave room for the completion")
    if d.eval is not None and d.eval_fraction:
        raise ConfigError("data.eval and data.eval_fraction are both set; use one")


def _check_objective(cfg: Config) -> None:
    """The objective's names and weights, and the options that apply to it (`objectives.registry`)."""
    o = cfg.objective
    names = o.losses
    if not names or len(set(names)) < len(names):
        raise ConfigError(f"objective.loss must name each objective once; got {o.loss!r}")
    if o.loss_weights and len(o.loss_weights) != len(names):
        raise ConfigError(f"objective.loss_weights has {len(o.loss_weights)} weights for {len(names)} objectives")
    if any(w < 0 for w in o.loss_weights):
        raise ConfigError(f"objective.loss_weights must be >= 0; got {o.loss_weights}")
    infos = [OBJECTIVES[n] for n in names]
    single = [n for n in names if OBJECTIVES[n].single_completions]
    if single and len(names) > 1:
        raise ConfigError(f"objective.loss={single[0]} trains on single completions; it cannot be summed with pair "
                          "objectives")
    if o.label_smoothing and not any(i.smoothing for i in infos):
        raise ConfigError(f"objective.label_smoothing applies to {', '.join(SMOOTHED)}, not {o.name}")
    for name, info in zip(names, infos):
        for key in info.required:
            if not getattr(o, key):
                raise ConfigError(f"objective.loss={name} needs objective.{key} > 0 ({info.note})")
    if o.f_divergence != "reverse_kl" and not all(i.f_divergence for i in infos):
        raise ConfigError(f"objective.f_divergence={o.f_divergence} applies to {', '.join(F_DIVERGENCE)}; "
                          f"not to {o.name}")
    if o.wpo and not all(i.pair_weights for i in infos):
        sorting = names_where(lambda i: not i.pair_weights)
        sorting = ", ".join(sorting[:-1]) + " and " + sorting[-1]
        raise ConfigError(f"objective.wpo weights pairs, which {sorting} sort apart")
    if o.ld_alpha is not None and not single:
        # LD-DPO reweighs the sums every objective reads; it is defined on DPO's log-ratios, where the
        # NLL term and the reference-free losses' token means must stay plain
        plain = [n for n in names if n in ("simpo", "orpo", "unlikelihood")]
        if plain or o.nll_weight:
            what = f"objective.loss={plain[0]}" if plain else "objective.nll_weight"
            raise ConfigError(f"objective.ld_alpha (LD-DPO) weighs the log-ratios of DPO's family; {what} reads "
                              "plain token means, which it would reweigh: drop one of them")
    if single and (o.ld_alpha is not None or o.wpo or o.nll_weight or o.loss_weights):
        raise ConfigError(f"objective.loss={single[0]} takes no ld_alpha, wpo, nll_weight or loss_weights (they are "
                          "defined on pairs); kto_desirable_weight and kto_undesirable_weight weigh its completions")


def _check_reference(cfg: Config) -> None:
    """The reference strategy against the objective and LoRA, and the reference a TR-DPO run moves."""
    r, o = cfg.reference, cfg.objective
    ref, loss, needs = r.strategy, o.name, o.needs_reference
    if ref == "adapters" and not cfg.lora.enabled:
        raise ConfigError("reference.strategy=adapters needs LoRA (lora.enabled=true)")
    if not needs and ref not in ("auto", "none"):
        raise ConfigError(f"objective.loss={loss} is reference-free; reference.strategy={ref} does not apply")
    if needs and ref == "none":
        free = list(names_where(lambda i: not i.needs_reference))
        free = ", ".join(free[:-1]) + " or " + free[-1]
        raise ConfigError(f"objective.loss={loss} needs a reference model; reference.strategy=none only fits {free}")
    if r.name is not None:
        if not needs:
            raise ConfigError(f"objective.loss={loss} is reference-free; reference.name does not apply")
        if ref == "adapters":
            raise ConfigError("reference.strategy=adapters computes the reference as the policy with its adapters "
                              "disabled; with reference.name use copy or precomputed")
    if r.sync_every:
        if not needs:
            raise ConfigError(f"reference.sync_every (TR-DPO) moves the reference; objective.loss={loss} has none")
        if ref not in ("auto", "copy"):
            raise ConfigError(f"reference.sync_every (TR-DPO) moves the reference, which reference.strategy="
                              f"{ref} keeps fixed; use auto or copy")
        if r.name is not None:
            raise ConfigError("reference.sync_every (TR-DPO) moves the policy's starting weights toward it; it "
                              "does not take a reference.name")
        if cfg.distributed.strategy == "fsdp":
            raise ConfigError("reference.sync_every (TR-DPO) is not implemented for sharded weights; use "
                              "distributed.strategy=ddp")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    if t.release_freed_memory and t.reuse_freed_memory:
        raise ConfigError("train.release_freed_memory and train.reuse_freed_memory pull opposite ways: set one "
                          "(train.preset=lean sets release_freed_memory unless it is given)")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size})")
    if t.optimizer_in_backward:
        why = "train.optimizer_in_backward=true updates each parameter as soon as its gradient is complete, so"
        if t.micro_batch_size != t.batch_size:
            raise ConfigError(f"{why} it allows no gradient accumulation: set train.micro_batch_size equal to "
                              f"train.batch_size ({t.batch_size}), or turn it off")
        if t.max_grad_norm:
            raise ConfigError(f"{why} no global gradient norm exists to clip by: set train.max_grad_norm=0, or "
                              "turn it off")
    if t.sample_every and cfg.distributed.strategy == "fsdp":
        raise ConfigError("train.sample_every generates on one process and does not work with "
                          "distributed.strategy=fsdp (sharded weights); use ddp or sample after training")


def _check_environment(cfg: Config, *, need_data: bool = True) -> None:
    """What the sections name outside the config: files, models and the trackers' packages."""
    d = cfg.data
    if d.chat_template is not None:
        chat_template_text(d.chat_template)
    if cfg.reference.name is not None and models.missing_path(cfg.reference.name):
        raise ConfigError(f"reference.name: not found: {cfg.reference.name}")
    wrong = cfg.reference.name is not None and models.reward_model_error(cfg.reference.name)
    if wrong:
        raise ConfigError(f"reference.name: {wrong}")
    for key in ("train", "eval"):
        source = getattr(d, key)
        if source is not None and missing_file(source):
            raise ConfigError(f"data.{key}: file not found: {source}")
    if d.train is None and need_data:
        raise ConfigError("data.train is required: a preference file, datasets directory or hub dataset name")
    if models.missing_path(cfg.model.name):
        raise ConfigError(f"model.name: not found: {cfg.model.name}")
    check_report_to(cfg.output.report_to, cfg.output.mlflow_tracking_uri)
    t = cfg.train
    if t.sample_prompts is not None and missing_file(t.sample_prompts):
        raise ConfigError(f"train.sample_prompts: file not found: {t.sample_prompts}")


def _check_distributed(cfg: Config) -> None:
    if cfg.distributed.cpu_offload and cfg.distributed.strategy != "fsdp":
        raise ConfigError("distributed.cpu_offload is FSDP2's CPUOffloadPolicy: it needs distributed.strategy=fsdp")


def check_runtime(cfg: Config, runtime) -> None:
    """What the device and the process count of `runtime` (a `distributed.Runtime`) allow: the train section's
    rules that need the runtime; `dpokit.trainer` runs them once the runtime is up, before anything loads."""
    t = cfg.train
    if t.optimizer_in_backward and runtime.distributed:
        raise ConfigError("train.optimizer_in_backward=true runs in one process: under torchrun the gradients "
                          "are complete only after DDP's all-reduce or FSDP's reduce-scatter; turn it off")
    if t.activation_offload and runtime.device.type != "cuda":
        raise ConfigError("train.activation_offload=true moves saved activations from GPU to CPU memory; on "
                          f"{runtime.device.type} there is nothing to offload: turn it off")

