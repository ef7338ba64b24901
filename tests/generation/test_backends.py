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
