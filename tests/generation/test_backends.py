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


def test_greedy_decoding_is_transformers_generate_s_rows_finishing_early_included(tokenizer):
    """Prefill, positions under left padding, a prompt shared by two rows and a row leaving the batch when
    it stops: greedy, the loop writes exactly what transformers' `generate` writes."""
    import torch
    from transformers import GenerationConfig

    model = tiny_llama()
    prompts = [tokenizer.encode("The movie was"), tokenizer.encode("I think that the plot"), tokenizer.encode("No")]
    prompts.append(prompts[0])
    free = generate(model, prompts, temperature=0.0, top_p=1.0, max_new_tokens=8, stop_ids=[2], pad_id=2, seed=0)
    stop = free[1].ids[2]  # the second row stops by its third token, another runs on
    ours = generate(model, prompts, temperature=0.0, top_p=1.0, max_new_tokens=8, stop_ids=[stop], pad_id=2, seed=0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=[stop], pad_token_id=2)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    assert [list(c.ids) for c in ours] == [row[:len(c.ids)] for row, c in zip(plain, ours)]
    assert ours[1].finished and ours[1].ids == free[1].ids[:free[1].ids.index(stop) + 1]
    assert any(len(c.ids) == 8 and not c.finished for c in ours)
    assert ours[0].ids == ours[3].ids and ours[0].logp == pytest.approx(ours[3].logp, abs=1e-4)


def test_inverse_cdf_draws_each_token_with_its_probability():
    """Block by block, then within the block: the frequencies of 60,000 draws are the probabilities within
    5 standard errors, over a vocabulary that is not a multiple of the block; tokens without mass are
    never drawn, at the uniform's extremes included."""
    import torch

    from dpokit.generation.backends import inverse_cdf

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(300, generator=g) ** 4
    probs[[0, 5, 255, 256, 299]] = 0.0  # around the block edge and at both ends
    probs /= probs.sum()
    n = 60_000
    drawn = inverse_cdf(probs.expand(n, -1), torch.rand((n, 1), generator=g, dtype=torch.float64), block=256)
    freq = torch.bincount(drawn, minlength=300).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all()
    assert freq[[0, 5, 255, 256, 299]].sum() == 0
    edges = inverse_cdf(probs.expand(2, -1), torch.tensor([[0.0], [1.0 - 1e-16]], dtype=torch.float64), block=256)
    assert edges.tolist() == [1, 298]


def test_block_sums_are_one_float64_reduction_s_bit_for_bit():
    """The draws stand on these sums (and every published sample with them): taken 16 rows at a time for
    speed, they are the whole batch's single reduction exactly, for batches that split unevenly and for
    flat, peaked and extreme distributions."""
    import torch

    from dpokit.generation.backends import block_sums

    for seed, rows, scale in [(0, 40, 1.0), (1, 128, 8.0), (2, 7, 60.0), (3, 17, 20.0)]:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(rows, 49152, generator=g) * scale
        blocks = (logits - torch.logsumexp(logits, -1, keepdim=True)).exp().reshape(rows, 192, 256)
        assert torch.equal(block_sums(blocks), blocks.sum(dim=-1, dtype=torch.float64))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.5), (1.3, 0.7)])
def test_sampling_draws_from_the_model_s_warped_distribution(tokenizer, temperature, top_p):
    """The first tokens of 6,000 samples of one prompt: frequencies within 5 standard errors of transformers'
    temperature and top-p warpers applied to the model's logits, nothing outside top-p; the same seed, the
    same samples."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    model = tiny_llama(vocab_size=64, initializer_range=0.3)
    prompt = [5, 9, 17]
    kwargs = dict(temperature=temperature, top_p=top_p, max_new_tokens=1, stop_ids=[2], pad_id=2, seed=4)
    drawn = generate(model, [prompt] * 6000, **kwargs)
    with torch.no_grad():
        scores = model(torch.tensor([prompt])).logits[:, -1]
    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores))
    probs = torch.softmax(scores, dim=-1)[0].double()
    freq = torch.bincount(torch.tensor([c.ids[0] for c in drawn]), minlength=64).double() / len(drawn)
    se = (probs * (1 - probs) / len(drawn)).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-12).all()
    assert freq[probs == 0].sum() == 0 and (top_p == 1.0 or (probs == 0).any())
    assert generate(model, [prompt] * 50, **kwargs) == drawn[:50]
    assert generate(model, [prompt] * 50, **{**kwargs, "seed": 5}) != drawn[:50]


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


def test_a_policy_set_for_packed_layouts_samples_from_left_padded_prompts_as_the_plain_model(tokenizer):
    """The training policy's attention is dpokit's segment kernel (packed layouts); generation's left padding
    must still be masked: greedy tokens and recorded log-probs as the same weights with transformers' SDPA."""
    import copy

    from dpokit import models

    plain = tiny_llama()
    policy = copy.deepcopy(plain)
    models.use_layout(policy, "prefix_shared")
    prompts = [tokenizer.encode(t) for t in ("The movie was", "I think that the plot of this film", "No")]
    for temperature in (0.0, 1.0):
        kwargs = dict(temperature=temperature, top_p=1.0, max_new_tokens=8, stop_ids=[2], pad_id=2, seed=5)
        ours, theirs = generate(policy, prompts, **kwargs), generate(plain, prompts, **kwargs)
        assert [c.ids for c in ours] == [c.ids for c in theirs]
        assert [c.logp for c in ours] == pytest.approx([c.logp for c in theirs], abs=1e-4)


def test_a_process_whose_rows_are_done_steps_with_the_others_and_draws_nothing(monkeypatch):
    from dpokit.generation import backends

    model = tiny_llama(vocab_size=4, seed=0).eval()  # 4 tokens: stop token 2 ends most rows within a few steps
    prompts = [(1, 3)] * 32
    plain = generate(model, prompts, temperature=1.0, top_p=1.0, max_new_tokens=12, stop_ids=[2], pad_id=0, seed=5)
    assert sum(c.finished for c in plain) > 16
    # under FSDP another process may still be sampling: this one keeps stepping with it, to the last step
    monkeypatch.setattr(backends, "_any_running", lambda count, device: True)
    synced = generate(model, prompts, temperature=1.0, top_p=1.0, max_new_tokens=12, stop_ids=[2], pad_id=0, seed=5,
                      synced=True)
    assert synced == plain  # and no draw from the finished rows' last logits (an IndexError before)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.5), (0.0, 1.0)])
def test_each_draw_s_log_prob_is_its_log_softmax(temperature, top_p):
    """Whatever the warping, the log-prob returned with a token is log softmax(logits)[token] (float64)."""
    import torch
    from transformers import TopPLogitsWarper

    from dpokit.generation.backends import next_tokens

    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 4
    warper = TopPLogitsWarper(top_p) if top_p < 1 else None
    sampled, logp = next_tokens(logits, temperature=temperature, top_p_warper=warper,
                                rng=torch.Generator().manual_seed(2))
    expected = torch.log_softmax(logits.double(), dim=-1).gather(1, sampled[:, None]).squeeze(1)
    assert logp.dtype == torch.float64 and torch.allclose(logp, expected, atol=1e-5)
    if temperature == 0:
        assert torch.equal(sampled, logits.argmax(-1))


def test_rows_moved_into_finished_rows_places_draw_what_rows_kept_in_order_draw(monkeypatch):
    """Finished rows' places are filled from the batch's end; every sequence still gets the uniform of its
    place among the sequences running, so the samples are those of a batch kept in order."""
    from dpokit.generation import backends

    model = tiny_llama(vocab_size=8, seed=1, initializer_range=0.3).eval()
    prompts = [(1, 3), (4, 5, 6), (3,), (7, 1)] * 6
    kwargs = dict(temperature=1.0, top_p=1.0, max_new_tokens=10, stop_ids=[2, 6], pad_id=0, seed=3)
    moved = generate(model, prompts, **kwargs)

    def keep_order(cache, running):
        keep = running.nonzero().squeeze(1)
        cache.batch_select_indices(keep)
        return keep

    monkeypatch.setattr(backends, "drop_finished", keep_order)
    in_order = generate(model, prompts, **kwargs)
    lengths = {len(c.ids) for c in in_order}
    assert sum(c.finished for c in in_order) > 12 and len(lengths) > 4  # rows finish at many different steps
    assert [c.ids for c in moved] == [c.ids for c in in_order]
    # A row's place in the batch can change how a product sums it, so the last bits may differ (seen on an AMD EPYC)
    assert [c.logp for c in moved] == pytest.approx([c.logp for c in in_order], rel=1e-6)
