"""`dpokit estimate`: the peak memory of a training step per device, before any weights load.

The model's shapes come from its config, built on the meta device (no weights read). The peak is the sum of what
is resident while the backward pass begins, the largest moment of a step:

    runtime      the process itself (Python, torch, transformers, the tokenizer); on a GPU, PyTorch's own
                 allocations only (the CUDA context, ~0.5 GB, is outside them)
    freed heap   on a CPU, what glibc keeps of the heap freed by earlier steps (nothing with
                 train.release_freed_memory, see dpokit.host_memory); on a GPU nothing, as
                 torch.cuda.max_memory_allocated does not count the caching allocator's free blocks.
                 How much glibc keeps depends on the order of allocations, not on sizes alone: in the
                 benchmark 0.4 GB for the default full fine-tuning, up to 0.43 × one micro-batch's activations
                 for full fine-tuning (padded rows) and 1.38 × with LoRA and QLoRA (QLoRA int8; the same
                 LoRA run kept 2.7 GB at the benchmark's lengths and 0.5 at half of them). The estimate
                 counts 0.45 GB and reports the most measured as `heap_allowance` (0.45 and 1.4 × the
                 activations, less the 0.45 GB counted).
    weights      the policy (quantized linear layers with model.quantization, plus LoRA adapters)
    gradients    every trainable parameter's (with optimizer_in_backward: the two largest tensors at most)
    optimizer    AdamW 8 bytes a parameter, adamw8bit 2 (+ block scales), adamw4bit 1, RMSprop 4; tensors
                 under 4096 values keep 32-bit state in the low-bit optimizers
    reference    a frozen copy's weights (reference.strategy=copy); nothing for adapters, precomputed or none
    activations  what autograd keeps for the backward pass of one micro-batch: per token and decoder layer
                 8d + 2·kv + 4·ff + 2·head_dim values for a Llama-type layer (measured with saved-tensor hooks on
                 SmolLM2: 11,190 values, the formula 11,264); in the padded layout 2·(q − kv) + width more, as
                 transformers' SDPA path with a padding mask repeats keys and values to every query head and
                 keeps each layer's [rows, width, width] mask (measured: 1,180 more at width 421, the formula
                 1,189); with gradient checkpointing d per layer plus one layer's full set while it is recomputed
    LM head      the selective head's chunk of logits, its log-softmax and their gradient: 3 · chunk · V
                 (train.lm_head=full: the [2B, width, V] logits, or their gradient in the backward pass, and
                 the completion rows gathered from them with their log-softmax: (positions + 2 · completion) · V)

Two more candidates for the peak, and the estimate is the largest of the three: on a CPU the loading (the weights
file is memory-mapped while the weights are copied out of it, and a reference copy made), and the optimizer step
once the activations are freed, when an optimizer needs working memory: bitsandbytes' 8-bit AdamW on a CPU holds
fp32 working copies of the tensor it updates (measured on SmolLM2's 28M-value embedding, the lean preset's last
step of the backward pass: +0.56 GB, 20 bytes a value with the embedding's fresh gradient). Under FSDP2 the
weights, gradients and optimizer state are divided by the number of processes (plus two decoder layers gathered
at a time); with distributed.cpu_offload they live in host memory instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpokit import models
from dpokit.config_checks import check_config
from dpokit.config_loader import set_value
from dpokit.data.dataset import prepare_data
from dpokit.errors import ConfigError, ModelError

GB = 1e9
CPU_RUNTIME_BYTES = 0.45e9  # python + torch + transformers + tokenizer, measured as a process's RSS before loading
CPU_FREED_HEAP_BYTES = 0.45e9  # freed heap glibc keeps resident after the first steps (see the module's docstring)
# the most freed heap glibc was measured keeping, × one micro-batch's activations (not checkpointed): full
# fine-tuning (padded rows: 0.43) and adapters (QLoRA int8: 1.38)
CPU_HEAP_RETENTION = {"full": 0.45, "adapters": 1.4}
SMALL_TENSOR = 4096  # bitsandbytes and torchao keep 32-bit state for tensors with fewer values
CPU_ADAMW8BIT_STEP_BYTES = 20  # per value of the tensor bitsandbytes' CPU 8-bit step updates (see the docstring)


@dataclass
class Shape:
    """What the estimate needs to know of a model, from its config on the meta device."""

    params: int  # unique parameters (tied embeddings once)
    linear_params: int  # the decoder's linear layers (what quantization and LoRA apply to)
    linear_shapes: list[tuple[str, int, int]]  # (name, in, out) of each of them
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # keys' (and values') width: key-value heads × head_dim
    q_dim: int  # queries' width: attention heads × head_dim
    head_dim: int
    vocab: int
    tensors: list[int]  # numel of every parameter tensor
    file_bytes: int  # size of the weights as stored (fp32 unless the config says otherwise)
    tied_head: bool = True  # the output layer shares the input embedding's weight

    @property
    def activation_values(self) -> int:
        """Values autograd saves per token and decoder layer without checkpointing (Llama-type layer)."""
        return 8 * self.hidden + 2 * self.kv_dim + 4 * self.intermediate + 2 * self.head_dim


def model_shape(name: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Shape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = models.loadable_source(name)
    path = src.path
    try:  # a hub id is probed once as training probes it: an unknown one fails at once, not after retries
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                            local_files_only=models.local_files_only(src, revision))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the config of model {name!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    params = list(model.parameters())
    dtype = getattr(config, "dtype", None)
    stored = 2 if str(dtype).endswith(("bfloat16", "float16")) else 4
    return Shape(params=sum(p.numel() for p in params), linear_params=sum(i * o for _, i, o in linears),
                 linear_shapes=linears, layers=text.num_hidden_layers, hidden=text.hidden_size,
                 intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, kv_dim=kv * head_dim,
                 q_dim=heads * head_dim, head_dim=head_dim, vocab=head.weight.shape[0], tensors=[p.numel() for p in params],
                 file_bytes=stored * sum(p.numel() for p in params),
                 tied_head=head.weight is model.get_input_embeddings().weight)


# ------------------------------------------------------------------------------------------ lengths

SINGLE_COMPLETION = ("sft", "ppo")  # the methods whose items are one completion, not a pair
SAMPLED = {"ppo": "ppo", "online_dpo": "online"}  # the methods that train on their own samples: their section


@dataclass
class Lengths:
    """One micro-batch as the layout computes it."""

    tokens: int  # positions the decoder runs over
    completion_tokens: int  # positions the selective LM head scores
    pairs: int
    source: str


def micro_batch_lengths(pairs: list[tuple[int, int, int]], layout: str, source: str) -> Lengths:
    """`pairs`: (prompt, chosen, rejected) token counts of one micro-batch; a rejected count of 0 is a single
    completion (SFT, PPO's rollouts), one sequence."""
    if layout == "padded":
        width = max(p + max(c, r) for p, c, r in pairs)
        tokens = sum(1 + bool(r) for _, _, r in pairs) * width
    elif layout == "packed":
        tokens = sum((1 + bool(r)) * p + c + r for p, c, r in pairs)
    else:
        tokens = sum(p + c + r for p, c, r in pairs)
    return Lengths(tokens, sum(c + r for _, c, r in pairs), len(pairs), source)


def configured_lengths(cfg, method: str = "dpo") -> Lengths:
    """The configured worst case of `method`'s micro-batch: micro_batch_size items with the longest prompt
    truncation keeps (max_prompt_length) and completions filling max_length (PPO and online DPO: their samples of
    ppo.max_new_tokens, online.max_new_tokens); two completions an item for the pair methods, one for SFT and PPO."""
    d = cfg.data
    p = d.max_prompt_length
    sampled = SAMPLED.get(method)
    c = getattr(cfg, sampled).max_new_tokens if sampled else d.max_length - p
    settings = f"{sampled}.max_new_tokens" if sampled else "data.max_prompt_length, data.max_length"
    single = method in SINGLE_COMPLETION
    items = [(p, c, 0 if single else c)] * cfg.train.micro_batch_size
    counted = f"{c}" if single else f"2 × {c}"
    noun = "pairs" if not single else ("rollouts" if method == "ppo" else "sequences")
    return micro_batch_lengths(items, cfg.train.layout, f"{cfg.train.micro_batch_size} {noun} of {p} prompt + "
                                                        f"{counted} completion tokens ({settings})")


def data_lengths(cfg, tokenizer, method: str = "dpo") -> Lengths:
    """The largest micro-batch the training data can form: its micro_batch_size longest items."""
    if method in SAMPLED:
        raise ConfigError(f"--from-data: {method}'s completions are sampled while it trains; its estimate uses "
                          f"data.max_prompt_length and {SAMPLED[method]}.max_new_tokens")
    use = ("completion" if cfg.data.use == "auto" else cfg.data.use) if method == "sft" else "pairs"
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed, use=use)
    sizes = sorted(((len(x.prompt), len(x.chosen), len(x.rejected)) for x in data.train), key=sum, reverse=True)
    return micro_batch_lengths(sizes[:cfg.train.micro_batch_size], cfg.train.layout,
                               f"the {cfg.train.micro_batch_size} longest {data.noun} of {cfg.data.train}")


# ------------------------------------------------------------------------------------------ the estimate


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes of the step's peak, by what holds them
    loading: float  # bytes while the weights load (CPU), a peak of its own
    stepping: float  # bytes while the optimizer steps its largest tensor, activations freed (0: not a peak)
    host: dict[str, float]  # bytes kept in host memory instead (FSDP2 CPU offload)
    lengths: Lengths
    device: str
    notes: list[str] = field(default_factory=list)
    heap_allowance: float = 0.0  # on a CPU, freed heap glibc may keep on top of `parts["freed_heap"]`

    @property
    def step(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return max(self.step, self.loading, self.stepping)

    @property
    def bound(self) -> float:
        """The peak with the freed heap glibc may keep on top: what deciding whether a device fits uses."""
        return self.peak + self.heap_allowance


def estimate(cfg, *, lengths: Lengths | None = None, shape: Shape | None = None, world: int = 1,
             device: str = "cpu", method: str = "dpo") -> Estimate:
    """The expected peak memory per device of a training step of `method` (dpo, sft, reward, ppo, online_dpo: what
    each holds) under `cfg` (after its first update, with the optimizer state) for micro-batches of
    `lengths` (default: the configured worst case)."""
    t = cfg.train
    shape = shape or model_shape(cfg.model.name, revision=cfg.model.revision,
                                 trust_remote_code=cfg.model.trust_remote_code)
    lengths = lengths or configured_lengths(cfg, method)
    precision = t.precision if t.precision != "auto" else \
        ("bf16-mixed" if device == "cuda" or models.fast_bf16("cpu") else "fp32")  # the trainer's rule
    weight_bytes = 2 if precision == "bf16" else 4
    act_bytes = {"fp32": 4, "bf16": 2, "bf16-mixed": 3}[precision]  # autocast: matmul outputs in bf16, the rest fp32
    notes = []

    # weights: the base (quantized linears with QLoRA) and the adapters
    q = cfg.model.quantization if cfg.lora.enabled else "none"
    quant_bytes = {"none": weight_bytes, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}[q]
    rest = shape.params - shape.linear_params
    weights = shape.linear_params * quant_bytes + rest * weight_bytes
    if q == "int8":
        weights += 4 * sum(o for _, _, o in shape.linear_shapes)  # row scales
    trainable_tensors = shape.tensors
    if cfg.lora.enabled:
        targets = cfg.lora.target_modules
        chosen = [(i, o) for n, i, o in shape.linear_shapes
                  if targets == ["all-linear"] or any(n == x or n.endswith("." + x) for x in targets)]
        trainable_tensors = [x for i, o in chosen for x in (cfg.lora.r * i, cfg.lora.r * o)]
        weights += 4 * sum(trainable_tensors)
    trainable = sum(trainable_tensors)
    grad_bytes = 4 if cfg.lora.enabled else weight_bytes
    largest = sorted(trainable_tensors, reverse=True)[:2]
    gradients = grad_bytes * (sum(largest) if t.optimizer_in_backward else trainable)
    optimizer = _optimizer_bytes(t.optimizer, trainable_tensors, weight_bytes if not cfg.lora.enabled else 4)

    sharded = world > 1 and cfg.distributed.strategy == "fsdp"
    reference = _reference_bytes(cfg, method, shape, weight_bytes, notes, precision=precision, sharded=sharded)

    full_layer, activations, head = _activation_bytes(t, shape, lengths, act_bytes)
    if method == "reward":  # a scalar head reads one position a sequence: no vocabulary-wide logits
        head = 0.0
        notes.append("reward: a linear head to one score in place of the LM head")
    if method in SAMPLED:
        section = SAMPLED[method]
        rows = cfg.train.batch_size * (cfg.online.samples if section == "online" else 1)
        notes.append(f"{method}: the KV cache of its sampling ({rows} sequences of up to {cfg.data.max_prompt_length} "
                     f"+ {getattr(cfg, section).max_new_tokens} tokens) comes before the step, not counted")
    if t.activation_offload and device == "cuda":
        notes.append("activation_offload: the saved activations are in pinned host memory, one layer's on the GPU")
        activations = full_layer * 2

    # sharding and offload
    host = {}
    if sharded:
        layer = (shape.params - rest) / max(shape.layers, 1) * weight_bytes
        if cfg.distributed.cpu_offload:
            host = {"weights": weights / world, "gradients": gradients / world, "optimizer": optimizer / world}
            weights, gradients, optimizer = 2 * layer + rest * weight_bytes, 2 * layer, 0.0
        else:
            weights, gradients, optimizer = weights / world + 2 * layer, gradients / world + 2 * layer, optimizer / world
        reference = reference / world + (2 * layer if reference else 0)

    runtime = CPU_RUNTIME_BYTES if device == "cpu" else 0.0
    if device == "cuda":
        notes.append("GPU: PyTorch's allocations (torch.cuda.max_memory_allocated); the CUDA context adds ~0.5 GB")
    freed_heap, allowance = _cpu_freed_heap(cfg, shape, full_layer, notes) if device == "cpu" else (0.0, 0.0)
    parts = {"runtime": runtime, "freed_heap": freed_heap, "weights": weights, "gradients": gradients,
             "optimizer": optimizer, "reference": reference, "activations": activations, "lm_head": head}
    stepping = 0.0
    if device == "cpu" and t.optimizer == "adamw8bit" and trainable_tensors:
        resident = sum(v for k, v in parts.items() if k not in ("activations", "lm_head"))
        stepping = resident + CPU_ADAMW8BIT_STEP_BYTES * max(trainable_tensors) / (world if sharded else 1)
    # loading on a CPU: the file is mapped while the policy's weights are copied out of it (and the reference
    # copy made from the policy)
    loading = 0.0
    if device == "cpu":
        loading = runtime + shape.file_bytes + shape.params * weight_bytes + reference
    return Estimate(parts, loading, stepping, host, lengths, device, notes, allowance)


def _reference_bytes(cfg, method: str, shape: Shape, weight_bytes: float, notes: list[str], *, precision: str,
                     sharded: bool) -> float:
    """The reference model's weights, where `method` under `cfg` holds a copy of it (its linear layers in bf16
    where `reference.copy_in_bf16` says so)."""
    from dpokit.reference import copy_in_bf16, resolve_strategy

    needs_reference = {"sft": False, "reward": False, "ppo": True}.get(method, cfg.objective.needs_reference)
    strategy = resolve_strategy(cfg.reference.strategy, needs_reference=needs_reference,
                                lora=cfg.lora.enabled, named=cfg.reference.name is not None,
                                follows=bool(cfg.reference.sync_every))
    if strategy != "copy":
        return 0.0
    if cfg.reference.name is not None:
        notes.append(f"reference.name: assumed the size of {cfg.model.name}")
    if copy_in_bf16(cfg, precision, sharded):
        head = shape.vocab * shape.hidden
        in_bf16 = shape.linear_params + head  # a tied head gets a bf16 weight of its own beside the fp32 embedding
        return (shape.params - shape.linear_params - (0 if shape.tied_head else head)) * 4 + in_bf16 * 2
    return shape.params * {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.reference.dtype or "", weight_bytes)


def _cpu_freed_heap(cfg, shape: Shape, full_layer: float, notes: list[str]) -> tuple[float, float]:
    """On a CPU: (the freed heap glibc keeps, the allowance for more of it, measured up to a share of the
    layers' activations), none where train.release_freed_memory returns freed memory to the system."""
    t = cfg.train
    if t.reuse_freed_memory:
        notes.append("train.reuse_freed_memory keeps every freed block in the heap: not modelled; measured 0-8% above "
                     "glibc's default peak on the benchmark's default step")
    if t.release_freed_memory:
        return 0.0, 0.0
    retention = CPU_HEAP_RETENTION["adapters" if cfg.lora.enabled else "full"]
    return CPU_FREED_HEAP_BYTES, max(0.0, retention * shape.layers * full_layer - CPU_FREED_HEAP_BYTES)


def _activation_bytes(t, shape: Shape, lengths: Lengths, act_bytes: float) -> tuple[float, float, float]:
    """(one decoder layer's saved activations, the micro-batch's, the LM head's working set) under the train
    section `t`, in bytes."""
    n = lengths.tokens
    per_token = shape.activation_values
    if t.layout == "padded":  # keys and values repeated to every query head, and the layer's padding mask
        per_token += 2 * (shape.q_dim - shape.kv_dim) + n // (2 * lengths.pairs)
    full_layer = n * per_token * act_bytes
    if t.gradient_checkpointing:
        activations = shape.layers * n * (shape.hidden + 4) * act_bytes + full_layer
    else:
        activations = shape.layers * full_layer
    if t.lm_head == "full":
        head = (n + 2 * lengths.completion_tokens) * shape.vocab * 4
    else:
        head = 3 * min(t.logps_chunk_tokens, lengths.completion_tokens) * shape.vocab * 4
        head += lengths.completion_tokens * shape.hidden * act_bytes  # the gathered hidden states it keeps
    return full_layer, activations, head


def _optimizer_bytes(name: str, tensors: list[int], weight_bytes: int) -> float:
    small = sum(x for x in tensors if x < SMALL_TENSOR)
    big = sum(x for x in tensors if x >= SMALL_TENSOR)
    if name == "adamw":
        return 2 * weight_bytes * (small + big)
    if name == "adamw8bit":  # two uint8 moments, an fp32 absmax per 256 values each
        return 8 * small + big * (2 + 8 / 256)
    if name == "adamw4bit":  # two 4-bit moments, an fp32 scale per 128 values each
        return 8 * small + big * (1 + 8 / 128)
    if name == "rmsprop":
        return 4 * (small + big)
    raise ValueError(f"unknown optimizer {name!r}")


# ------------------------------------------------------------------------------------------ what fits

# settings to try when the estimate does not fit, cheapest in time first; each row adds to the ones before
SUGGESTIONS = [
    ("gradient checkpointing", ["train.gradient_checkpointing=true"]),
    ("precomputed reference", ["reference.strategy=precomputed"]),
    ("8-bit AdamW", ["train.optimizer=adamw8bit"]),
    ("lean preset", ["train.preset=lean"]),
    ("LoRA", ["train.preset=lean", "lora.enabled=true"]),
    ("QLoRA nf4", ["train.preset=lean", "lora.enabled=true", "model.quantization=nf4"]),
]


def suggestions(cfg, device_bytes: float, *, shape: Shape, lengths_of, world: int, device: str,
                method: str = "dpo") -> list[dict]:
    """Each suggestion's overrides on top of `cfg` (the earlier ones' too, unless the lean preset replaces them),
    its estimate and whether it fits `device_bytes` with its heap allowance, up to the first that fits; then
    halving micro_batch_size.
    A suggestion the config refuses (a reference-free objective has no reference to precompute) is left out,
    and so is one that lowers nothing (the peak is elsewhere)."""
    def row(label: str, overrides: list[str]) -> dict | None:
        try:
            trial = _with(cfg, overrides)
        except ConfigError:
            return None
        est = estimate(trial, lengths=lengths_of(trial), shape=shape, world=world, device=device, method=method)
        return {"label": label, "overrides": list(overrides), "peak": est.peak, "heap_allowance": est.heap_allowance,
                "fits": est.bound <= device_bytes, "micro_batch_size": trial.train.micro_batch_size}

    def bound(r: dict) -> float:
        return r["peak"] + r["heap_allowance"]

    rows: list[dict] = []
    accumulated: list[str] = []
    best = estimate(cfg, lengths=lengths_of(cfg), shape=shape, world=world, device=device,
                    method=method).bound  # to be lowered
    for label, extra in SUGGESTIONS:
        trying = extra if "train.preset=lean" in extra else accumulated + extra
        r = row(label, trying)
        if r is None:
            continue
        accumulated = trying
        if bound(r) < best:
            rows.append(r)
            best = bound(r)
            if r["fits"]:
                return rows
    base, mb = (rows[-1]["overrides"], rows[-1]["micro_batch_size"]) if rows else ([], cfg.train.micro_batch_size)
    while mb > 1:
        mb //= 2
        r = row(f"{mb} pair(s) per forward", base + [f"train.micro_batch_size={mb}",
                                                     "train.optimizer_in_backward=false"])
        if r is None or bound(r) >= best:  # refused, or the peak is not the activations
            break
        rows.append(r)
        best = bound(r)
        if r["fits"]:
            break
    return rows


def _with(cfg, overrides: list[str]):
    """A copy of `cfg` with `section.key=value` overrides, its preset applied and validated."""
    import copy

    import yaml

    new = copy.deepcopy(cfg)
    for item in overrides:
        key, _, raw = item.partition("=")
        set_value(new, key, yaml.safe_load(raw))
    new.apply_preset()
    check_config(new, need_data=new.data.train is not None)
    return new
