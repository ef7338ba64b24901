"""Everything known about each `objective.loss` value, in one entry: what its loss function reads, which
`objective.*` options apply to it, whether it needs a reference model, its display name and its source.

Torch-free: the config checks, `dpokit --help` and the frontier's series names read it without loading
torch. `losses.build_objective` calls each entry's function (`losses.<name>`) with the inputs and options
listed here. Adding an objective is an entry here, its function in `losses.py` and its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the per-pair tensors a loss function can take, by the name its arguments use (`losses` module docstring)
RATIOS = ("pc", "pr", "rc", "rr")  # policy and reference log-probs of chosen and rejected
LENGTHS = ("len_c", "len_r")  # completion lengths in tokens
POLICY = ("pc", "pr")


@dataclass(frozen=True)
class ObjectiveInfo:
    display: str  # the series name on the frontier, the name in tables
    source: str  # the paper (and equation) the formula follows
    inputs: tuple[str, ...] = RATIOS  # the loss function's positional tensors, in order (`ur`: unlikelihood terms)
    options: dict[str, str] = field(default_factory=lambda: {"beta": "beta"})  # function keyword → objective key
    needs_reference: bool = True
    f_divergence: bool = False  # a loss of the difference of the log-ratios, which f-DPO generalises
    sorts_batch: bool = False  # sorts the micro-batch: its per-rank terms belong to no pair
    single_completions: bool = False  # trains on single completions (KTO), not pairs
    required: tuple[str, ...] = ()  # objective keys that must be > 0 for it (EXO's ε)
    note: str = ""  # why a required key is needed, for the error

    @property
    def uses_beta(self) -> bool:
        return "beta" in self.options.values()

    @property
    def smoothing(self) -> bool:
        """Whether objective.label_smoothing (ε) applies."""
        return "label_smoothing" in self.options.values()

    @property
    def pair_weights(self) -> bool:
        """Whether per-pair weights and WPO apply (not to losses whose terms belong to no pair)."""
        return not self.sorts_batch


SMOOTHED = {"beta": "beta", "label_smoothing": "label_smoothing"}

OBJECTIVES: dict[str, ObjectiveInfo] = {
    "sigmoid": ObjectiveInfo("DPO", "Rafailov et al. 2023, eq. 7; cDPO (Mitchell 2023) with ε", options=SMOOTHED,
                             f_divergence=True),
    "ipo": ObjectiveInfo("IPO", "Azar et al. 2023, eq. 17", inputs=RATIOS + LENGTHS,
                         options={"beta": "beta", "form": "ipo_form"}, f_divergence=True),
    "hinge": ObjectiveInfo("hinge (RSO)", "Liu et al. 2024 (RSO hinge-norm; SLiC-HF without a reference)",
                           f_divergence=True),
    "robust": ObjectiveInfo("rDPO", "Chowdhury et al. 2024, eq. 9", options=SMOOTHED, f_divergence=True),
    "simpo": ObjectiveInfo("SimPO", "Meng et al. 2024, eq. 6", inputs=POLICY + LENGTHS,
                           options={"beta": "beta", "gamma": "simpo_gamma"}, needs_reference=False),
    "unlikelihood": ObjectiveInfo("Unlikelihood", "Rafailov et al. 2023, §6; Welleck et al. 2019",
                                  inputs=POLICY + LENGTHS + ("ur",), options={"alpha": "unlikelihood_alpha"},
                                  needs_reference=False),
    "sigmoid_norm": ObjectiveInfo("DPO (length-normalised)", "TRL's sigmoid_norm", inputs=RATIOS + LENGTHS,
                                  f_divergence=True),
    "exo_pair": ObjectiveInfo("EXO", "Ji et al. 2024, eq. 16", options=SMOOTHED, f_divergence=True,
                              required=("label_smoothing",), note="EXO's ε; the paper: 1e-3"),
    "nca_pair": ObjectiveInfo("NCA", "Chen et al. 2024 (Noise Contrastive Alignment)"),
    "bco_pair": ObjectiveInfo("BCO", "Jung et al. 2024; TRL's bco_pair"),
    "sppo_hard": ObjectiveInfo("SPPO (hard)", "Wu et al. 2024, eq. 4.7"),
    "aot": ObjectiveInfo("AOT", "Melnyk et al. 2024", options=SMOOTHED, sorts_batch=True),
    "aot_unpaired": ObjectiveInfo("AOT (unpaired)", "Melnyk et al. 2024", options=SMOOTHED, sorts_batch=True),
    "apo_zero": ObjectiveInfo("APO-zero", "D'Oosterlinck et al. 2024, eq. 7"),
    "apo_down": ObjectiveInfo("APO-down", "D'Oosterlinck et al. 2024, eq. 8"),
    "discopop": ObjectiveInfo("DiscoPOP", "Chris Lu et al. 2024, eq. 5", options={"beta": "beta", "tau": "discopop_tau"},
                              f_divergence=True),
    "dpop": ObjectiveInfo("DPOP", "Pal et al. 2024 (Smaug), eq. 3", options={"beta": "beta", "lam": "dpop_lambda"}),
    "orpo": ObjectiveInfo("ORPO", "Hong et al. 2024, eqs. 2-7", inputs=POLICY + LENGTHS,
                          options={"lam": "orpo_lambda"}, needs_reference=False),
    "kto": ObjectiveInfo("KTO", "Ethayarajh et al. 2024, eq. 7", inputs=("logratios",),
                         options={"beta": "beta", "desirable_weight": "kto_desirable_weight",
                                  "undesirable_weight": "kto_undesirable_weight"}, single_completions=True),
}


def names_where(predicate) -> tuple[str, ...]:
    """The objectives whose entry satisfies `predicate`, in registry order."""
    return tuple(name for name, info in OBJECTIVES.items() if predicate(info))
