"""The objective registry: one entry per objective.loss, each naming a loss function that takes the inputs
and options it lists; the config and the frontier read their facts from it."""

from __future__ import annotations

import inspect

import pytest

from dpokit.config import F_DIVERGENCE, ObjectiveSection
from dpokit.objectives import losses
from dpokit.objectives.registry import OBJECTIVES, names_where


def test_every_objective_has_a_function_taking_its_inputs_and_options():
    options = {f for f in ObjectiveSection.__dataclass_fields__}
    for name, info in OBJECTIVES.items():
        params = inspect.signature(getattr(losses, name)).parameters
        positional = [p for p, v in params.items() if v.kind is v.POSITIONAL_OR_KEYWORD][:len(info.inputs)]
        assert tuple(positional) == info.inputs, name
        assert set(info.options) <= set(params), name
        assert set(info.options.values()) <= options, name  # each option is an objective.* key


def test_the_facts_the_config_used_to_spell_out():
    assert names_where(lambda i: not i.needs_reference) == ("simpo", "unlikelihood", "orpo")
    assert F_DIVERGENCE == ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "discopop")
    assert names_where(lambda i: i.smoothing) == ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
    assert names_where(lambda i: not i.pair_weights) == ("aot", "aot_unpaired")
    assert [n for n, i in OBJECTIVES.items() if not i.uses_beta] == ["unlikelihood", "orpo"]
    assert tuple(ObjectiveSection.__dataclass_fields__["loss"].metadata["choices"]) == tuple(OBJECTIVES)


@pytest.mark.parametrize("name", [n for n, i in OBJECTIVES.items() if not i.single_completions])
def test_build_objective_calls_the_registered_function(name):
    """The built objective of each entry equals its function called by hand on the same log-probs."""
    import torch

    from dpokit.logps import SequenceLogps

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(3, generator=g) * 10 for _ in range(4))
    lengths = torch.tensor([3.0, 5.0, 7.0])
    policy = SequenceLogps(pc, pr, lengths, lengths + 1, rejected_unlikely=-torch.rand(3, generator=g))
    reference = SequenceLogps(rc, rr, lengths, lengths + 1)
    cfg = ObjectiveSection(loss=name, label_smoothing=0.1 if OBJECTIVES[name].smoothing else 0.0)
    got = losses.build_objective(cfg)(policy, reference)
    tensors = {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "len_c": lengths, "len_r": lengths + 1,
               "ur": policy.rejected_unlikely}
    info = OBJECTIVES[name]
    expected = getattr(losses, name)(*(tensors[k] for k in info.inputs),
                                     **{k: getattr(cfg, key) for k, key in info.options.items()})
    torch.testing.assert_close(got.losses, expected.losses)
