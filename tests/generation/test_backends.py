"""The generation backend seam: the default backend satisfies the protocol, and every sampler goes through it."""

from __future__ import annotations

import pytest

from dpokit.errors import ConfigError
from dpokit.generation.backends import GenerationBackend, TransformersBackend, build_backend, generate
from dpokit.generation.sampling import Sampler, SamplingSettings
from tests.helpers import tiny_llama


def test_the_default_backend_is_a_generation_backend_and_samples_as_generate_does(tokenizer):
    model = tiny_llama()
    backend = build_backend("transformers", model)
    assert isinstance(backend, GenerationBackend) and isinstance(backend, TransformersBackend)
    prompts = [tokenizer.encode("The movie was"), tokenizer.encode("I think")]
    kwargs = dict(temperature=1.0, top_p=1.0, max_new_tokens=5, stop_ids=[2], pad_id=2, seed=7)
    assert backend.generate(prompts, **kwargs) == generate(model, prompts, **kwargs)
    with pytest.raises(ConfigError, match="generation.backend: unknown backend 'vllm'; choose from transformers"):
        build_backend("vllm", model)


def test_the_sampler_draws_through_its_backend(tokenizer):
    class Counting(TransformersBackend):
        def __init__(self, model):
            super().__init__(model)
            self.calls = []

        def generate(self, prompt_ids, **kwargs):
            self.calls.append(len(prompt_ids))
            return super().generate(prompt_ids, **kwargs)

    model = tiny_llama()
    backend = Counting(model)
    settings = SamplingSettings(n=2, max_new_tokens=4, batch_size=4, template="none")
    rows = Sampler(model, tokenizer, settings, backend=backend).sample(["a", "b", "c"])
    plain = Sampler(model, tokenizer, settings).sample(["a", "b", "c"])
    assert backend.calls == [4, 2] and rows == plain


def generate_plainly(model, prompt_ids, *, temperature, top_p, max_new_tokens, pad_id, seed):
    """transformers' own temperature and top-p (its GenerationConfig), as `generate` asked for them before it
    recorded log-probs: the samples must not change."""
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    greedy = temperature == 0
    config = GenerationConfig(do_sample=not greedy, temperature=None if greedy else temperature,
                              top_p=None if greedy else top_p, top_k=0 if not greedy else None,
                              max_new_tokens=max_new_tokens, eos_token_id=[pad_id], pad_token_id=pad_id)
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.0, 1.0)])
def test_recording_log_probs_leaves_the_samples_as_generate_draws_them(tokenizer, temperature, top_p):
    model = tiny_llama()
    prompts = [tokenizer.encode("The movie was"), tokenizer.encode("I think that the plot"), tokenizer.encode("No")]
    ours = generate(model, prompts, temperature=temperature, top_p=top_p, max_new_tokens=6, stop_ids=[2], pad_id=2,
                    seed=11)
    plain = generate_plainly(model, prompts, temperature=temperature, top_p=top_p, max_new_tokens=6, pad_id=2, seed=11)
    assert [list(c.ids) for c in ours] == [row[:len(c.ids)] for row, c in zip(plain, ours)]
    assert all(len(c.ids) == 6 or c.finished for c in ours)


def test_recorded_log_probs_equal_the_trainers_own(tokenizer):
    """Summed over each completion from the generation's logits (left-padded prompts of different lengths,
    temperature and top-p on): the trainer's CompletionLogProbs on the same ids, within 1e-4 in fp32."""
    from dpokit.generation.sampling import completion_logps

    model = tiny_llama()
    prompts = [tokenizer.encode(t) for t in ("The movie was", "I think that the plot of this film", "No")] * 2
    drawn = generate(model, prompts, temperature=0.7, top_p=0.9, max_new_tokens=8, stop_ids=[2], pad_id=2, seed=3)
    recomputed = completion_logps(model, prompts, [c.ids for c in drawn], pad_id=2)
    assert all(c.logp is not None and c.logp < 0 for c in drawn)
    assert [c.logp for c in drawn] == pytest.approx(recomputed, abs=1e-4)
    # a backend that records none: the sampler recomputes them
    settings = SamplingSettings(n=2, max_new_tokens=4, batch_size=4, template="none")
    sampler = Sampler(model, tokenizer, settings)
    per_prompt = sampler.sample_ids(prompts[:2])
    bare = [[type(c)(c.ids, c.finished) for c in cs] for cs in per_prompt]
    assert sampler.completion_logps(prompts[:2], bare) == pytest.approx(
        sampler.completion_logps(prompts[:2], per_prompt), abs=1e-4)
