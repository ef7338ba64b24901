"""Every judge behind the one interface: VADER, sequence classifiers, simple rules, user callables."""

import json
import re

import pytest

from dpokit.errors import ConfigError, DpokitError
from dpokit.generation.judges import Judge, build_judge, score_rows


def test_sentiment_judge_is_vader_compound_of_the_whole_review():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    judge = build_judge("sentiment")
    assert isinstance(judge, Judge)
    prompts = ["This movie was", "This movie was", "This movie was"]
    good, bad, flat = judge.score(prompts, [" wonderful, I loved it.", " awful and boring.", " released in May."])
    assert -1 <= bad < 0 == flat < good <= 1
    expected = SentimentIntensityAnalyzer().polarity_scores("This movie was wonderful, I loved it.")["compound"]
    assert good == pytest.approx(expected)
    # on=completion reads the completion alone: the prompt's words no longer count
    alone = build_judge("sentiment", options={"on": "completion"})
    assert alone.score(["I love this"], [" film."]) == [0.0]
    assert judge.score(["I love this"], [" film."])[0] > 0


def test_sentiment_judge_reads_the_reply_of_a_conversation():
    judge = build_judge("sentiment")
    conv = [{"role": "user", "content": "I hate rainy days."}]
    assert judge.score([conv], ["That sounds great!"])[0] > 0


def test_length_and_keyword_rules():
    assert build_judge("length").score(["p", "p"], [" one two three", ""]) == [3.0, 0.0]
    assert build_judge("length", options={"unit": "chars", "target": 4}).score(["p"], ["abcdef"]) == [-2.0]
    kw = build_judge("keywords", options={"words": "great,fun", "weight": 2})
    assert kw.score(["p"], ["Great fun, GREAT cast; greatest"]) == [6.0]


def test_user_callable_from_a_file_plain_and_batched(tmp_path):
    (tmp_path / "my_judges.py").write_text(
        "def exclaims(prompt, completion):\n    return completion.count('!')\n\n"
        "def lengths(prompts, completions):\n    return [len(c) for c in completions]\nlengths.batched = True\n\n"
        "class Constant:\n    name = 'constant'\n    def score(self, prompts, completions):\n"
        "        return [1.0] * len(completions)\n")
    plain = build_judge(f"{tmp_path / 'my_judges.py'}:exclaims")
    assert plain.score(["a", "b"], ["wow!!", "no"]) == [2.0, 0.0]
    batched = build_judge(f"{tmp_path / 'my_judges.py'}:lengths")
    assert batched.score(["a", "b"], ["abc", ""]) == [3.0, 0.0]
    obj = build_judge(f"{tmp_path / 'my_judges.py'}:Constant")
    assert obj.name == "constant" and obj.score(["a"], ["b"]) == [1.0]


def test_user_callable_by_module_name_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_judge_mod.py").write_text("def score(prompt, completion):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    assert build_judge("cwd_judge_mod:score").score(["p"], ["c"]) == [0.5]


def test_unknown_or_malformed_judges_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean 'sentiment'"):
        build_judge("sentimnet")
    with pytest.raises(ConfigError, match="needs a model"):
        build_judge("reward-model")
    with pytest.raises(ConfigError, match="cannot import"):
        build_judge("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match="unit"):
        build_judge("length", options={"unit": "pages"})


def _classifier(tmp_path, tokenizer, num_labels, id2label=None):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                      pad_token_id=tokenizer.pad_token_id, id2label=id2label)
    path = tmp_path / f"clf{num_labels}"
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_judge_scores_with_a_local_sequence_classifier(tmp_path, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _classifier(tmp_path, tokenizer, 1)
    judge = build_judge("reward-model", model=path, options={"batch_size": 2})
    prompts, completions = ["The film", "The film", "A"], [" was fine.", " bored me to tears, sadly.", " b"]
    scores = judge.score(prompts, completions)
    # the same numbers one text at a time, straight from transformers
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        direct = [model(**tok(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(direct, abs=1e-4)


def test_a_reward_model_judge_keeps_the_end_of_a_text_over_its_max_length(tmp_path, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _classifier(tmp_path, tokenizer, 1)
    judge = build_judge("reward-model", model=path, options={"max_length": 6})
    prompt, completion = "The film was long, " * 20, " and the ending was wonderful."
    (score,) = judge.score([prompt], [completion])
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # no start token to keep
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():  # the last 6 tokens: the reply, where the reward is read, not the prompt's start
        tail = model(input_ids=torch.tensor([tok(prompt + completion)["input_ids"][-6:]])).logits[0, 0].item()
    assert score == pytest.approx(tail, abs=1e-4)


def test_classifier_judge_uses_the_positive_label_probability(tmp_path, tokenizer):
    path = _classifier(tmp_path, tokenizer, 2, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    judge = build_judge("sentiment", model=path)
    assert judge.label == 1
    (p,) = judge.score(["x"], ["y"])
    (n,) = build_judge("reward-model", model=path, options={"label": "negative"}).score(["x"], ["y"])
    assert 0 < p < 1 and p + n == pytest.approx(1.0, abs=1e-6)


def test_score_rows_keeps_the_row_structure():
    rows = [{"prompt": "a", "completions": [" x", " yy"]}, {"prompt": "b", "completions": [" zzz"]}]
    assert score_rows(build_judge("length", options={"unit": "chars"}), rows, batch_size=2) == [[2.0, 3.0], [4.0]]


JUDGES_PY = """
import math

def nan(prompt, completion):
    return math.nan

def good(prompt, completion):
    return "good"

def nothing(prompt, completion):
    return None

def broken(prompt, completion):
    return helper(completion)

def helper(completion):
    raise ValueError(f"cannot judge {completion!r}")
"""


@pytest.fixture
def user_judges(tmp_path):
    path = tmp_path / "judges.py"
    path.write_text(JUDGES_PY)
    return path


def test_every_score_is_a_finite_number_or_a_one_line_error(user_judges):
    from dpokit.generation.judges import checked_scores

    prompts, completions = ["a", "b"], ["x", "y"]
    cases = {"nan": "returned a non-finite score (nan) for row 1", "good": "returned 'good' for row 1 (a number is needed)",
             "nothing": "returned None for row 1 (a number is needed)"}
    for name, message in cases.items():
        judge = build_judge(f"{user_judges}:{name}")
        with pytest.raises(DpokitError, match=re.escape(f"judge {user_judges}:{name} {message}")):
            checked_scores(judge, prompts, completions)
    rows = [{"prompt": "a", "completions": ["x", "y"]}, {"prompt": "b", "completions": ["z"]}]
    with pytest.raises(DpokitError, match="for row 1"):
        score_rows(build_judge(f"{user_judges}:good"), rows)


def test_an_exception_in_the_users_judge_is_one_line_and_its_own_frames(user_judges, tmp_path, capsys):
    from dpokit.cli import main

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "a", "completions": ["x", "y"]}) + "\n")
    assert main(["label", str(samples), "--judge", f"{user_judges}:broken", "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: judge {user_judges}:broken raised ValueError on row 1: cannot judge 'x'"
    frames = "\n".join(err[1:])
    assert "in broken" in frames and "in helper" in frames and "dpokit/" not in frames


def test_a_dpokit_reward_model_is_judged_on_its_training_text_eos_included(tmp_path, tokenizer):
    import copy
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = "<|endoftext|>"  # a pad token other than the EOS, as Qwen's: the EOS is then read, not skipped
    assert tok.pad_token_id != tok.eos_token_id
    path = _classifier(tmp_path, tok, 1)
    (tmp_path / "clf1" / "dpokit_metrics.json").write_text(json.dumps({"step": 1}))  # what `dpokit reward` exports
    (score,) = build_judge("reward-model", model=path).score(["The film"], [" was fine."])
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)("The film was fine.")["input_ids"]
    with torch.no_grad():
        at_eos, at_text = (model(input_ids=torch.tensor([x])).logits[0, 0].item() for x in (ids + [tok.eos_token_id], ids))
    assert score == pytest.approx(at_eos, abs=1e-4) and score != pytest.approx(at_text, abs=1e-4)
