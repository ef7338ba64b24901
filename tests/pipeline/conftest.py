"""Fixtures of the pipeline tests: tiny models whose greedy replies are known in advance."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def saying(tmp_path_factory, tokenizer):
    """`saying(text)`: the directory of a tiny Llama (with the SmolLM2 tokenizer and chat template) whose
    every next token is `text` (one token), whatever it is shown: greedy, it answers `text` repeated.
    Built from a config: every position's hidden state is the same vector, which only `text`'s row of the
    output layer matches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict[str, str] = {}

    def make(text: str) -> str:
        if text not in made:
            (token,) = tokenizer.encode(text, add_special_tokens=False)
            cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
            model = LlamaForCausalLM(cfg).eval()
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(1.0)
                for layer in model.model.layers:  # blocks add nothing to the residual stream
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
                model.lm_head.weight.zero_()
                model.lm_head.weight[token] = 1.0
            path = tmp_path_factory.mktemp("saying")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[text] = str(path)
        return made[text]

    return make
