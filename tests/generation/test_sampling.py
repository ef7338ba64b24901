"""`dpokit sample`: rows and log-probs, chat prompts tokenized as the trainer does, resume after a kill."""

import json

import pytest

from dpokit import models
from dpokit.data.records import PreferenceRecord, Problems
from dpokit.data.tokenize import TokenizeSettings, tokenize_records
from dpokit.errors import DataError
from dpokit.generation.jsonl import read_jsonl
from dpokit.generation.prompts import as_model_input, read_prompts
from dpokit.generation.sampling import Sampler, SamplingSettings, completion_logps, length_order, sample_file
from tests.helpers import write_jsonl

PROMPTS = ["This movie was", "I rented the sequel because", "The plot", "Honestly, I", "The acting in this film",
           "My wife and I saw the musical", "So, this western"]
SETTINGS = SamplingSettings(n=3, max_new_tokens=5, batch_size=6, seed=7, template="none")


class CountingSampler(Sampler):
    """A real sampler that records which prompts it was asked to sample."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list = []

    def draw(self, prompts, **kwargs):
        self.asked += list(prompts)
        return super().draw(prompts, **kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(tiny_model_dir).eval(), models.load_tokenizer(tiny_model_dir)


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def test_rows_hold_completions_and_their_log_probs(tiny, prompts_file, tmp_path):
    model, tok = tiny
    sampler = Sampler(model, tok, SETTINGS)
    summary = sample_file("tiny", prompts_file, tmp_path / "s.jsonl", SETTINGS, sampler=sampler, progress=False)
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert summary.prompts == len(PROMPTS) == len(rows) and summary.completions == 3 * len(PROMPTS)
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert len(r["completions"]) == len(r["logps"]) == len(r["num_tokens"]) == len(r["finished"]) == 3
        assert all(1 <= n <= 5 for n in r["num_tokens"]) and all(lp < 0 for lp in r["logps"])
    # the file's first batch is its two shortest prompts: drawn again, the same samples, and a stored
    # log-prob is the completion's log-prob under the model, recomputed on the same ids
    order = length_order([sampler.encode(p)[1] for p in PROMPTS])
    assert [len(sampler.encode(PROMPTS[i])[1]) for i in order] == sorted(len(sampler.encode(p)[1]) for p in PROMPTS)
    drawn = sampler.draw([PROMPTS[i] for i in order[:2]], first_index=0)[0]
    again = completion_logps(model, [drawn.prompt_ids], [drawn.completions[0].ids], pad_id=tok.pad_token_id)
    assert rows[order[0]]["logps"][0] == pytest.approx(again[0], abs=1e-4)
    assert rows[order[0]]["completions"] == drawn.texts


def test_an_interrupted_run_resumes_without_redoing_finished_prompts(tiny, prompts_file, tmp_path):
    model, tok = tiny
    full = tmp_path / "full.jsonl"
    sample_file("tiny", prompts_file, full, SETTINGS, sampler=Sampler(model, tok, SETTINGS), progress=False)
    # a run killed after two batches (its 4 shortest prompts, as it draws by length), in the middle of
    # writing the fifth row
    sampler = CountingSampler(model, tok, SETTINGS)
    order = length_order([sampler.encode(p)[1] for p in PROMPTS])
    cut = tmp_path / "cut.jsonl"
    lines = full.read_text().splitlines()
    cut.write_text("\n".join(lines[i] for i in order[:4]) + "\n" + lines[order[4]][:25])
    (tmp_path / "cut.jsonl.meta.json").write_text((tmp_path / "full.jsonl.meta.json").read_text())
    summary = sample_file("tiny", prompts_file, cut, SETTINGS, sampler=sampler, progress=False)
    assert sampler.asked == [PROMPTS[i] for i in order[4:]] and order != list(range(len(PROMPTS)))
    assert summary.resumed == 4
    assert read_jsonl(cut) == read_jsonl(full)  # the same seeds per batch: identical to the uninterrupted run


def test_resuming_with_other_settings_is_refused(tiny, prompts_file, tmp_path):
    model, tok = tiny
    out = tmp_path / "s.jsonl"
    sample_file("tiny", prompts_file, out, SETTINGS, sampler=Sampler(model, tok, SETTINGS), progress=False)
    other = SamplingSettings(n=3, max_new_tokens=6, batch_size=6, seed=7, template="none")
    with pytest.raises(DataError, match="max_new_tokens"):
        sample_file("tiny", prompts_file, out, other, sampler=Sampler(model, tok, other), progress=False)


def test_chat_prompts_get_the_template_and_the_trainers_token_ids(tokenizer):
    stored, ids = as_model_input("Review this film.", tokenizer, "auto")  # SmolLM2 is a chat model
    assert stored == [{"role": "user", "content": "Review this film."}]
    record = PreferenceRecord(stored, [{"role": "assistant", "content": "Good."}],
                              [{"role": "assistant", "content": "Bad."}], "x:1")
    (pair,), _ = tokenize_records([record], tokenizer, TokenizeSettings(), Problems())
    assert tuple(ids) == pair.prompt
    stored, ids = as_model_input("This movie was", tokenizer, "none")
    plain = PreferenceRecord(stored, " good", " bad", "x:2")
    (pair,), _ = tokenize_records([plain], tokenizer, TokenizeSettings(), Problems())
    assert stored == "This movie was" and tuple(ids) == pair.prompt
    with pytest.raises(DataError, match="chat template"):
        as_model_input([{"role": "user", "content": "hi"}], tokenizer, "none")


def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}]))
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    assert read_prompts(tmp_path / "p.json")[1] == [{"role": "user", "content": "b"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def test_left_padding_does_not_change_what_a_prompt_generates(tiny):
    from dpokit.generation.backends import generate

    model, tok = tiny
    short, long = tok("The plot")["input_ids"], tok("My wife and I saw the musical last night and")["input_ids"]
    kwargs = dict(temperature=0.0, top_p=1.0, max_new_tokens=6, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                  seed=0)
    alone = generate(model, [short], **kwargs)[0].ids
    batched = generate(model, [long, short], **kwargs)[1].ids
    assert alone == batched


def test_a_prompt_split_over_several_batches_gets_different_samples(tiny):
    model, tok = tiny
    sampler = Sampler(model, tok, SamplingSettings(n=4, max_new_tokens=4, batch_size=2, template="none"))
    (drawn,) = sampler.draw(["The plot"])
    ids = [c.ids for c in drawn.completions]
    assert ids[:2] != ids[2:] and len(set(ids)) == 4
