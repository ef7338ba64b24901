"""Tokenizing records with the embedded SmolLM2 tokenizer: the boundary, EOS, chat templates, truncation."""

from __future__ import annotations

import pytest

from dpokit.data.records import PreferenceRecord, Problems
from dpokit.data.tokenize import (
    TokenizeSettings,
    encode_records,
    render,
    tokenize_records,
    truncate_pairs,
)
from dpokit.errors import DataError

HINT = " (set data.skip_invalid=true to skip such rows)"
WIDE = TokenizeSettings(max_length=100_000, max_prompt_length=50_000)


def ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def one(record: PreferenceRecord, tokenizer, settings: TokenizeSettings = WIDE):
    problems = Problems()
    pairs, stats = tokenize_records([record], tokenizer, settings, problems)
    assert len(pairs) == 1
    return pairs[0], stats


def test_prompt_and_completion_are_tokenized_separately(tokenizer):
    eos = tokenizer.eos_token_id
    record = PreferenceRecord("Hello wor", "ld, how are you?", "ld peace.", "t:1")
    pair, _ = one(record, tokenizer)
    assert list(pair.prompt) == ids(tokenizer, "Hello wor", special=True)
    assert list(pair.chosen) == ids(tokenizer, "ld, how are you?") + [eos]
    assert list(pair.rejected) == ids(tokenizer, "ld peace.") + [eos]
    # tokenized together, "wor" + "ld" merge into one token across the boundary; separately they cannot
    joint = ids(tokenizer, "Hello world, how are you?", special=True)
    assert joint != list(pair.prompt) + list(pair.chosen[:-1])
    assert tokenizer.decode(pair.prompt) == "Hello wor"
    assert tokenizer.decode(pair.chosen[:-1]) == "ld, how are you?"
    assert pair.source == "t:1" and pair.num_tokens == 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)


def test_boundary_is_the_same_for_every_pair_in_a_batch(tokenizer):
    records = [PreferenceRecord(p, c, r, f"t:{i}") for i, (p, c, r) in
               enumerate([("Hello wor", "ld", "m"), ("2+2=", "4", "5"), ("Say:", " yes", " no")])]
    pairs = encode_records(records, tokenizer)
    for record, pair in zip(records, pairs):
        assert list(pair.prompt) == ids(tokenizer, record.prompt, special=True)
        assert tokenizer.decode(pair.chosen[:-1]) == record.chosen


def test_eos_is_appended_once(tokenizer):
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    pair, _ = one(PreferenceRecord("Q?", "Paris.", f"Rome.{eos_text}", "t:1"), tokenizer)
    assert pair.chosen[-1] == eos and pair.chosen.count(eos) == 1
    assert pair.rejected[-1] == eos and pair.rejected.count(eos) == 1  # already there: not doubled


def test_empty_prompt_gets_a_start_token(tokenizer):
    pair, _ = one(PreferenceRecord("", "Paris.", "Rome.", "t:1"), tokenizer)
    assert pair.prompt == (tokenizer.bos_token_id,)


def test_conversations_are_rendered_with_the_chat_template(tokenizer):
    eos = tokenizer.eos_token_id
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    chosen, rejected = [{"role": "assistant", "content": "4."}], [{"role": "assistant", "content": "It is 5."}]
    record = PreferenceRecord(prompt, chosen, rejected, "t:1")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert render(record, tokenizer) == (prompt_text, "4.<|im_end|>", "It is 5.<|im_end|>")

    pair, _ = one(record, tokenizer)
    assert list(pair.prompt) == ids(tokenizer, prompt_text)
    assert list(pair.chosen) == ids(tokenizer, "4.<|im_end|>") and pair.chosen.count(eos) == 1
    full = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    # prompt + completion is the whole conversation, less the newline after the last end-of-turn
    assert tokenizer.decode(pair.prompt + pair.chosen) == full.rstrip("\n")


def test_multi_turn_completion(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    chosen = [{"role": "assistant", "content": "4."}, {"role": "user", "content": "Sure?"},
              {"role": "assistant", "content": "Yes."}]
    rejected = [{"role": "assistant", "content": "5."}]
    _, chosen_text, rejected_text = render(PreferenceRecord(prompt, chosen, rejected, "t:1"), tokenizer)
    assert chosen_text == "4.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>"
    assert rejected_text == "5.<|im_end|>"
    assert "You are a helpful AI assistant" not in render(PreferenceRecord(prompt, chosen, rejected, "t:1"),
                                                          tokenizer)[0]  # the row's own system message replaces it


def test_conversations_need_a_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    record = PreferenceRecord([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                              [{"role": "assistant", "content": "No"}], "data.jsonl:3")
    with pytest.raises(DataError) as e:
        tokenize_records([record], tokenizer, WIDE, Problems("collect"))
    assert str(e.value) == (
        "data.jsonl:3: conversational rows need a tokenizer with a chat template (or data.chat_template)")


def test_a_prompt_rendered_otherwise_alone_continues_where_they_agree_and_warns_once(tokenizer, monkeypatch):
    import warnings

    from dpokit.data import tokenize

    monkeypatch.setattr(tokenize, "_PREFIX_MISMATCH_WARNED", False)
    template = ("{% for m in messages %}{% if m.role == 'user' %}U: {{ m.content }}\n{% else %}B: {{ m.content }}"
                "<|im_end|>{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    monkeypatch.setattr(tokenizer, "chat_template", template)
    record = PreferenceRecord([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                              [{"role": "assistant", "content": "No"}], "data.jsonl:7")
    with pytest.warns(UserWarning, match=r"data.jsonl:7: the chat template renders the prompt alone differently "
                                         r"from the start of prompt \+ completion \(they differ at character 6"):
        assert render(record, tokenizer) == ("U: Hi\nA: ", "B: Hello<|im_end|>", "B: No<|im_end|>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a process
        render(record, tokenizer)


# ---- truncation

PROMPT = "one two three four five six seven eight nine ten"
LONG = "alpha beta gamma delta epsilon zeta eta theta iota kappa"


def test_pairs_within_the_limit_are_unchanged(tokenizer):
    record = PreferenceRecord(PROMPT, LONG, "short", "t:1")
    full, _ = one(record, tokenizer)
    total = len(full.prompt) + len(full.chosen)
    pair, stats = one(record, tokenizer, TokenizeSettings(max_length=total, max_prompt_length=total - 1))
    assert pair == full
    assert (stats.truncated, stats.truncated_prompt, stats.truncated_completion) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_long_prompt_is_cut_first_then_completions(tokenizer, mode):
    record = PreferenceRecord(PROMPT, LONG, "short", "t:1")
    full, _ = one(record, tokenizer)
    assert len(full.prompt) == 10 and len(full.chosen) == 15  # the arithmetic below relies on these
    settings = TokenizeSettings(max_length=12, max_prompt_length=4, truncation_mode=mode)
    pair, stats = one(record, tokenizer, settings)
    kept = full.prompt[-4:] if mode == "keep_end" else full.prompt[:4]
    assert pair.prompt == kept
    assert pair.chosen == full.chosen[:8]  # room = 12 - 4
    assert pair.rejected == full.rejected  # short enough already
    assert tokenizer.decode(pair.prompt) == (" seven eight nine ten" if mode == "keep_end" else "one two three four")
    assert (stats.truncated, stats.truncated_prompt, stats.truncated_completion) == (1, 1, 1)
    assert stats.truncated_rows == ["t:1"]


def test_short_prompt_is_kept_and_completions_cut(tokenizer):
    record = PreferenceRecord("Hi", LONG, LONG + " lambda", "t:1")
    full, _ = one(record, tokenizer)
    pair, stats = one(record, tokenizer, TokenizeSettings(max_length=6, max_prompt_length=4))
    room = 6 - len(full.prompt)
    assert pair.prompt == full.prompt and pair.chosen == full.chosen[:room] and pair.rejected == full.rejected[:room]
    assert (stats.truncated, stats.truncated_prompt, stats.truncated_completion) == (1, 0, 1)


def test_truncation_mode_error_rejects_rows_over_the_limits(tokenizer):
    records = [PreferenceRecord(PROMPT, LONG, "short", "d.jsonl:1"),  # prompt 10 > 4, total 25 > 12
               PreferenceRecord("Hi", LONG + " " + LONG, "short", "d.jsonl:2"),  # prompt fits, completion too long
               PreferenceRecord("Hi", "Hello!", "Go away.", "d.jsonl:3")]  # fits
    settings = TokenizeSettings(max_length=12, max_prompt_length=4, truncation_mode="error")
    with pytest.raises(DataError) as e:
        tokenize_records(records, tokenizer, settings, Problems())
    assert str(e.value) == f"d.jsonl:1: prompt is 10 tokens, over data.max_prompt_length=4{HINT}"

    problems = Problems("collect")
    pairs, stats = tokenize_records(records, tokenizer, settings, problems)
    assert [p.source for p in pairs] == ["d.jsonl:3"] and stats.truncated == 0
    assert problems.counts() == {"prompt_too_long": 1, "too_long": 1}
    long_completion = len(ids(tokenizer, LONG + " " + LONG)) + 1
    assert [str(p) for p in problems.rows] == [
        "d.jsonl:1: prompt is 10 tokens, over data.max_prompt_length=4",
        f"d.jsonl:2: prompt + completion is {1 + long_completion} tokens, over data.max_length=12",
    ]


def test_tokenize_is_encode_then_truncate(tokenizer):
    records = [PreferenceRecord(PROMPT, LONG, "short", "t:1"), PreferenceRecord("Hi", "Hello!", "No.", "t:2")]
    settings = TokenizeSettings(max_length=12, max_prompt_length=4)
    a = tokenize_records(records, tokenizer, settings, Problems())
    b = truncate_pairs(encode_records(records, tokenizer), settings, Problems())
    assert a == b
    assert tokenize_records([], tokenizer, settings, Problems())[0] == []


def sentencepiece_tokenizer(legacy: bool):
    """A Llama-style tokenizer, BOS added: words start with "▁". `legacy`: as Llama 2's tokenizer.json, a
    normalizer prepends "▁" to every text and turns spaces into "▁"; else a Metaspace pre-tokenizer that
    marks only the start of the text (transformers' non-legacy Llama)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = "hello world the movie was great and it is good bad fine wonderful"
    tok.train_from_iterator([text] * 20, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz")))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_completion_ids_follow_the_prompt(legacy):
    """Tokenized apart, " great" would become a lone "▁" and "▁great" under Llama 2's normalizer, and "fine"
    (written against "was": "wasfine") "▁fine": the completion's ids are the joint text's after the prompt's."""
    tok = sentencepiece_tokenizer(legacy)
    eos = tok.eos_token_id
    apart = tok.convert_ids_to_tokens(ids(tok, " great"))
    assert apart[0] == "▁" if legacy else apart == ["▁great"]  # the defect the joint ids avoid
    records = [PreferenceRecord("the movie was", " great", " bad", "t:1"),
               PreferenceRecord("the movie was", "fine", "fine and bad", "t:2")]
    for record, pair in zip(records, encode_records(records, tok)):
        assert list(pair.prompt) == ids(tok, record.prompt, special=True)
        for text, completion in ((record.chosen, pair.chosen), (record.rejected, pair.rejected)):
            assert completion[-1] == eos
            assert list(pair.prompt) + list(completion[:-1]) == ids(tok, record.prompt + text, special=True)
    first, second = encode_records(records, tok)
    assert tok.convert_ids_to_tokens(list(first.chosen[:-1])) == ["▁great"]
    assert not tok.convert_ids_to_tokens(second.chosen[0]).startswith("▁")  # no space was written


def test_a_token_merging_across_the_boundary_leaves_the_completion_apart():
    tok = sentencepiece_tokenizer(legacy=False)
    # "the movie was goo" + "d": jointly "▁good" is one token, so the prompt's ids do not begin the joint text's
    (pair,) = encode_records([PreferenceRecord("the movie was goo", "d", "d and bad", "t:1")], tok)
    assert list(pair.prompt) == ids(tok, "the movie was goo", special=True)
    assert list(pair.chosen) == ids(tok, "d") + [tok.eos_token_id]
