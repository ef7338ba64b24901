"""The pipeline commands' settings, typed like the config sections: each option's default, range or
choices is a field here, checked by `dpokit.fields.check_fields`, and `dpokit.fields.add_arguments`
turns the fields into command-line options. Light on imports: `dpokit --help` reads them."""

from __future__ import annotations

from dataclasses import dataclass

from dpokit import models
from dpokit.fields import check_fields, opt
from dpokit.generation.prompts import TEMPLATES


@dataclass(frozen=True)
class SamplingSettings:
    n: int = opt(4, "completions per prompt", min=1)
    temperature: float = opt(1.0, "sampling temperature, 0 for greedy", min=0.0)
    top_p: float = opt(1.0, "nucleus sampling mass, 1 for off", min=0.0, min_exclusive=True, max=1.0)
    max_new_tokens: int = opt(32, "most tokens per completion", min=1)
    seed: int = opt(0, "sampling seed")
    batch_size: int = opt(32, "sequences per generation batch", min=1)
    template: str = opt("auto", "chat template: auto applies it to conversations, and to string prompts when the "
                        "model has one; none continues strings as plain text", choices=TEMPLATES)

    def check(self) -> SamplingSettings:
        check_fields(self)
        return self


MODES = ("all-pairs", "best-vs-worst")


@dataclass(frozen=True)
class PairingSettings:
    mode: str = opt("all-pairs", "all-pairs: every two completions of a prompt (4 → 6 pairs); best-vs-worst: one pair",
                    choices=MODES)
    margin: float = opt(0.0, "drop pairs whose scores differ by less than this; ties are always dropped", min=0.0)

    def check(self) -> PairingSettings:
        check_fields(self)
        return self


@dataclass(frozen=True)
class ChatSettings:
    system: str = opt("", "a system message that begins every conversation (empty: none)")
    temperature: float = opt(0.7, "sampling temperature of the replies, 0 for greedy", min=0.0)
    top_p: float = opt(0.9, "nucleus sampling mass, 1 for off", min=0.0, min_exclusive=True, max=1.0)
    max_new_tokens: int = opt(256, "most tokens per reply", min=1)
    seed: int = opt(0, "sampling seed (reply k of a session is sampled with seed + k)")

    def check(self) -> ChatSettings:
        check_fields(self)
        return self


@dataclass(frozen=True)
class Placement:
    """Where the models run, and in which precision."""

    device: str = opt("auto", "cpu, cuda, cuda:1, ...; auto: cuda when available")
    # float32 unless asked (the experiments' published figures; evaluate's KL is a difference of log-probs under
    # two models); `dpokit sample`, `generate` and `chat` ask for auto
    dtype: str = opt("float32", "model weights dtype; auto: bfloat16 where bf16 matmul is fast (a bf16-capable GPU, a "
                     "CPU with AMX or AVX512-BF16), else float32", choices=models.PLACEMENT_DTYPES)
