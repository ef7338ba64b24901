"""Completion log-probs: prompt and padding excluded, summed over completion tokens, the same in every layout."""


import pytest
import torch

from dpokit import models
from dpokit.data.layouts import collate
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import CompletionLogProbs
from tests.helpers import random_pairs, tiny_llama


def brute_force(model, prompt, completion):
    """Each sequence alone, no padding: Σ_t log softmax(logits[t-1])[y_t] over completion positions."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(completion))


def test_padded_logps_sum_completion_tokens_only():
    model = tiny_llama(vocab_size=100)
    pairs = random_pairs()
    batch = collate(pairs, range(len(pairs)), "padded", pad_id=0)
    assert (batch.attention_mask == 0).any()  # the batch really has padding
    with torch.no_grad():
        out = CompletionLogProbs(model)(batch)
    for i, p in enumerate(pairs):
        assert out.chosen[i].item() == pytest.approx(brute_force(model, list(p.prompt), list(p.chosen)), abs=1e-4)
        assert out.rejected[i].item() == pytest.approx(brute_force(model, list(p.prompt), list(p.rejected)), abs=1e-4)
        assert out.chosen_lengths[i] == len(p.chosen) and out.rejected_lengths[i] == len(p.rejected)


def test_padding_and_prompt_tokens_do_not_change_the_result():
    model = tiny_llama(vocab_size=100)
    pair = random_pairs(1)[0]
    long = TokenizedPair(pair.prompt, pair.chosen, pair.rejected + (5,) * 30, "y")  # forces 30+ pad tokens on chosen
    with torch.no_grad():
        alone = CompletionLogProbs(model)(collate([pair], [0], "padded", 0)).chosen
        padded = CompletionLogProbs(model)(collate([long], [0], "padded", 0)).chosen
        for pad_id in (0, 7, 99):  # whatever the pad token, it is masked
            assert CompletionLogProbs(model)(collate([long], [0], "padded", pad_id)).chosen.item() == pytest.approx(
                padded.item(), abs=1e-5)
    assert alone.item() == pytest.approx(padded.item(), abs=1e-5)


def tiny(kind):
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(1)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": lambda: tiny_llama(vocab_size=100, seed=1),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common, sliding_window=None)),
        "gemma": lambda: GemmaForCausalLM(GemmaConfig(**common, head_dim=8)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                                   bos_token_id=1, eos_token_id=2)),
    }[kind]()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma", "gpt2"])
def test_layouts_and_lm_heads_agree_with_the_plain_path(kind):
    pairs = random_pairs(4, seed=3)
    results = {}
    for layout in ("padded", "packed", "prefix_shared"):
        for head in ("full", "selective"):
            model = tiny(kind).eval()
            models.use_layout(model, layout)
            out = CompletionLogProbs(model, lm_head=head, chunk_tokens=5)(collate(pairs, range(4), layout, 0))
            (out.chosen - 2 * out.rejected).sum().backward()
            grad = model.get_input_embeddings().weight.grad
            results[layout, head] = torch.cat([out.chosen, out.rejected]).detach(), grad
    plain_logps, plain_grad = results["padded", "full"]
    for key, (logps, grad) in results.items():
        assert torch.allclose(logps, plain_logps, atol=1e-5), key
        assert torch.allclose(grad, plain_grad, atol=1e-5), key


def test_selective_head_never_builds_full_logits(monkeypatch):
    """The LM head sees only completion positions, in chunks of at most chunk_tokens rows."""
    import dpokit.logps as logps_mod

    model = tiny_llama(vocab_size=100)
    pairs = random_pairs(4, seed=5)
    batch = collate(pairs, range(4), "padded", 0)
    shapes = []
    real = logps_mod._head_logps
    monkeypatch.setattr(logps_mod, "_head_logps", lambda h, *a: shapes.append(tuple(h.shape)) or real(h, *a))
    CompletionLogProbs(model, chunk_tokens=4)(batch)
    n_targets = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    assert sum(s[0] for s in shapes) == n_targets < batch.input_ids.numel()
    assert max(s[0] for s in shapes) <= 4


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_a_pair_with_an_empty_rejected_side_scores_its_chosen_completion_alone(layout):
    from dpokit.logps import logps_table

    model = tiny_llama(vocab_size=100)
    models.use_layout(model, layout)
    pairs = random_pairs(3)
    singles = [TokenizedPair(p.prompt, p.chosen, (), p.source) for p in pairs]
    mixed = [singles[0], pairs[1], singles[2]]
    module = CompletionLogProbs(model)
    table = logps_table(module, mixed, pad_id=0, batch_pairs=3, layout=layout)
    for i, p in enumerate(mixed):
        assert table[i, 0].item() == pytest.approx(brute_force(model, list(p.prompt), list(p.chosen)), abs=1e-4)
    assert table[0, 1].item() == 0.0 and table[2, 1].item() == 0.0
    assert table[1, 1].item() == pytest.approx(brute_force(model, list(pairs[1].prompt), list(pairs[1].rejected)),
                                               abs=1e-4)
    with torch.no_grad():
        lengths = module(collate(mixed, range(3), layout, 0)).rejected_lengths
    assert lengths.tolist() == [0, len(pairs[1].rejected), 0]
