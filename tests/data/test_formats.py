"""Known dataset schemas (`data.format`) on small fixture files written in each schema for these tests
(tests/data/fixtures/): rows converted, bad rows named with file:line, skipped rows counted by reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.config import describe
from dpokit.config_loader import load_config
from dpokit.data.formats import detect, hh_messages
from dpokit.data.records import Problems, RowReader, read_preferences
from dpokit.data.tokenize import TokenizeSettings, tokenize_records
from dpokit.errors import ConfigError, DataError
from dpokit.validate import validate_data

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def read(name: str, fmt: str = "auto"):
    problems = Problems("collect")
    result = read_preferences(fixture(name), problems=problems, format=fmt)
    return result, problems


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_hh_rlhf_transcripts_become_messages_with_the_shared_turns_as_prompt():
    result, problems = read("hh_rlhf.jsonl", "hh_rlhf")
    assert result.format == "hh_rlhf" and result.rows_read == 4
    one, two = result.records
    assert one.prompt == [user("How do I boil an egg?")]
    assert one.chosen == [assistant("Put it in boiling water for about nine minutes, then cool it in cold water.")]
    assert one.rejected == [assistant("Why would you want to do that?")]
    assert two.prompt == [user("Name two fruits."), assistant("Apples and pears."), user("And two vegetables?")]
    # a blank line inside a turn stays in it: only "\n\nHuman:" / "\n\nAssistant:" start a turn
    assert two.chosen == [assistant("Carrots and leeks.\n\nBoth keep well through the winter.")]
    assert two.source == fixture("hh_rlhf.jsonl") + ":2"
    assert problems.counts() == {"not_a_transcript": 1, "identical": 1}
    assert [p.source for p in problems.rows] == [fixture("hh_rlhf.jsonl") + ":3", fixture("hh_rlhf.jsonl") + ":4"]


def test_hh_rlhf_is_named_not_detected():
    # the same rows as `standard` strings are plain text with the shared words as the prompt (the DPO paper's setup)
    result, _ = read("hh_rlhf.jsonl")
    assert result.format == "standard"
    assert result.records[0].prompt == "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert result.records[0].chosen.startswith(" Put it in boiling water")


def test_a_bad_row_stops_the_run_with_its_file_and_line():
    with pytest.raises(DataError) as e:
        read_preferences(fixture("hh_rlhf.jsonl"), format="hh_rlhf")
    assert str(e.value) == (f"{fixture('hh_rlhf.jsonl')}:3: 'chosen' is not an HH-RLHF transcript (it must start with "
                            "'\\n\\nHuman:' and alternate Human/Assistant turns) (set data.skip_invalid=true to skip "
                            "such rows)")


def test_hh_messages():
    assert hh_messages("\n\nHuman: a\n\nAssistant: b") == [user("a"), assistant("b")]
    assert hh_messages("Human: a\n\nAssistant: b") is None  # the transcript must open with "\n\nHuman:"
    assert hh_messages("\n\nHuman: a") == [user("a")]
    assert hh_messages("no turns") is None


def test_ultrafeedback_binarized_is_detected_and_ties_are_counted():
    result, problems = read("ultrafeedback.jsonl")
    assert result.format == "ultrafeedback"
    haiku, product = result.records
    assert haiku.prompt == [user("Write a haiku about rain.")]
    assert haiku.chosen[0]["content"].startswith("Soft rain on the roof") and haiku.rejected == [assistant("Rain is wet.")]
    assert product.chosen == [assistant("12 times 11 is 132.")]
    assert problems.counts() == {"tied_scores": 1}
    assert problems.rows[0].source.endswith("ultrafeedback.jsonl:3")


def test_summarize_from_feedback_uses_the_chosen_summary_and_trls_tldr_prompt():
    result, problems = read("summarize_from_feedback.jsonl")
    assert result.format == "summarize_from_feedback"
    first, second = result.records
    assert first.prompt == ("SUBREDDIT: r/relationships\n\nTITLE: Roommate never washes dishes\n\nPOST: My roommate "
                            "keeps leaving dishes in the sink for days. I have asked twice and nothing changed. Should "
                            "I just do them myself?\n\nTL;DR:")
    assert first.chosen == " Roommate leaves dirty dishes for days despite two requests; do I wash them myself?"
    assert first.rejected == " dishes"
    assert second.chosen == " New runner: knees hurt after long runs but not short ones. Why?"  # choice 1
    assert second.rejected == " I run."
    assert problems.counts() == {"no_post": 1}  # the CNN/DM comparison
    assert problems.rows[0].source.endswith("summarize_from_feedback.jsonl:3")


def test_shp_takes_the_labelled_reply_as_chosen():
    result, problems = read("shp.jsonl")
    assert result.format == "shp"
    bread, sky = result.records
    assert bread.prompt == [user("Why does my bread come out dense?")]
    assert bread.chosen == [assistant("Your dough probably needs a longer rise; let it double in size before baking.")]
    assert sky.chosen[0]["content"].startswith("Air scatters")  # labels 0: B preferred
    assert sky.rejected == [assistant("Because it is.")]
    assert problems.counts() == {"wrong_type": 1}
    assert "'labels' must be 1 (A preferred) or 0 (B preferred), got 'A'" in str(problems.rows[0])


def test_unpaired_kto_rows_are_read_with_a_boolean_label():
    problems = Problems("collect")
    rows = RowReader(fixture("kto.jsonl"), "train", problems)
    read_rows = [row for _, row in rows if isinstance(row, dict)]
    assert rows.format == "kto"
    assert [r["label"] for r in read_rows] == [True, False]
    assert read_rows[0]["completion"] == [assistant("Red.")]
    assert problems.counts() == {"wrong_type": 1} and problems.rows[0].source.endswith("kto.jsonl:3")
    # pair objectives and sft refuse them: the label says which completions not to imitate
    for use in ("pairs", "completion"):
        with pytest.raises(DataError, match=r"kto.jsonl:1: an unpaired row \(prompt, completion, label"):
            read_preferences(fixture("kto.jsonl"), use=use)


def test_kto_labels_from_csv_cells(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nHi,Hello!,true\nHi,Go away.,False\nHi,Eh,2\n", encoding="utf-8")
    problems = Problems("collect")
    rows = [row for _, row in RowReader(str(path), "train", problems) if isinstance(row, dict)]
    assert [r["label"] for r in rows] == [True, False]
    assert problems.rows[0].source == f"{path}:4"


def test_a_kto_label_of_another_json_type_is_a_problem_with_its_line(tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"prompt": "Hi", "completion": "Hello!", "label": True}, {"prompt": "Hi", "completion": "Eh", "label": [True]},
            {"prompt": "Hi", "completion": "No", "label": {"ok": 1}}, {"prompt": "Hi", "completion": "Go", "label": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    problems = Problems("collect")
    kept = [row for _, row in RowReader(str(path), "train", problems) if isinstance(row, dict)]
    assert [r["completion"] for r in kept] == ["Hello!"]
    assert [(p.source, p.reason) for p in problems.rows] == [(f"{path}:{i}", "wrong_type") for i in (2, 3, 4)]


def test_a_table_is_detected_from_its_columns_and_must_have_the_schemas(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "shp.jsonl").read_text().splitlines()][:2]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shp.parquet")
    result, _ = read_preferences(str(tmp_path / "shp.parquet"), format="auto"), None
    assert result.format == "shp" and len(result.records) == 2
    assert result.records[1].source == f"{tmp_path / 'shp.parquet'}:row 2"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "labels"} for r in rows]),
                   tmp_path / "nolabels.parquet")
    with pytest.raises(DataError, match=r"nolabels.parquet: file has no 'labels' column \(data.format=shp\)"):
        read_preferences(str(tmp_path / "nolabels.parquet"), format="shp")


def test_a_named_format_that_does_not_fit_the_rows_names_the_missing_field():
    with pytest.raises(DataError, match=r"ultrafeedback.jsonl:1: missing field 'history'"):
        read_preferences(fixture("ultrafeedback.jsonl"), format="shp")


def test_detection():
    assert detect(["prompt", "chosen", "rejected"]) == "standard"
    assert detect(["chosen", "rejected"]) == "standard"  # HH-RLHF's fields too: named only
    assert detect(["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "messages"]) == "ultrafeedback"
    assert detect(["info", "summaries", "choice", "worker"]) == "summarize_from_feedback"
    assert detect(["history", "human_ref_A", "human_ref_B", "labels", "score_A"]) == "shp"
    assert detect(["prompt", "completion", "label"]) == "kto"
    assert detect(["prompt", "completion"]) == "standard"


@pytest.mark.parametrize("name,fmt,valid", [("hh_rlhf.jsonl", "hh_rlhf", 2), ("ultrafeedback.jsonl", "auto", 2),
                                            ("summarize_from_feedback.jsonl", "auto", 2), ("shp.jsonl", "auto", 2)])
def test_each_format_tokenizes_and_validates(tokenizer, name, fmt, valid):
    result, problems = read(name, fmt)
    pairs, _ = tokenize_records(result.records, tokenizer, TokenizeSettings(), problems)
    assert len(pairs) == valid
    if result.records[0].conversational:  # through the chat template: the completion ends at its EOS
        assert tokenizer.decode(pairs[0].prompt).endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(pairs[0].chosen).endswith("<|im_end|>")
    report = validate_data(fixture(name), tokenizer, format=fmt, skip_invalid=True)
    assert report.valid == valid and report.invalid == result.rows_read - valid
    assert report.detected == result.format and report.ok
    assert report.to_json()["format"] == result.format
    assert not validate_data(fixture(name), tokenizer, format=fmt).ok  # each fixture holds a bad row


def test_validate_cli_reads_the_formats(capsys):
    from dpokit.cli import main

    assert main(["validate", fixture("shp.jsonl"), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "(format shp, detected)" in out and "wrong_type: 1" in out
    assert main(["validate", fixture("hh_rlhf.jsonl"), "--format", "hh_rlhf", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hh_rlhf" and report["invalid_by_reason"] == {"identical": 1, "not_a_transcript": 1}


def test_format_is_a_config_key_with_help(tmp_path):
    cfg = load_config(None, [f"data.train={fixture('shp.jsonl')}", "data.format=summarize_from_feedback"])
    assert cfg.data.format == "summarize_from_feedback"
    with pytest.raises(ConfigError, match="data.format must be one of .* got 'hh'"):
        load_config(None, [f"data.train={fixture('shp.jsonl')}", "data.format=hh"])
    text = describe()
    assert "format = auto" in text and "hh_rlhf" in text and "chat_template = null" in text


def test_training_reads_a_named_format(tiny_config):
    from dpokit.trainer import train

    result = train(tiny_config(f"data.train={fixture('hh_rlhf.jsonl')}", "data.format=hh_rlhf",
                               "data.skip_invalid=true", "train.batch_size=2", "train.max_steps=1"))
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["train_pairs"] == 2 and report["skipped_by_reason"] == {"not_a_transcript": 1, "identical": 1}
    skipped = [json.loads(line) for line in (result.run_dir / "skipped_rows.jsonl").read_text().splitlines()]
    assert skipped[0]["source"].endswith("hh_rlhf.jsonl:3")


def test_sft_takes_the_chosen_side_of_a_known_schema():
    result = read_preferences(fixture("ultrafeedback.jsonl"), problems=Problems("collect"), use="chosen")
    assert [r.rejected for r in result.records] == [[], []]
    assert result.records[1].chosen == [assistant("12 times 11 is 132.")]
    with pytest.raises(DataError, match=r"ultrafeedback.jsonl:1: data.format=ultrafeedback rows are preference pairs, "
                                        r"not single completions; data.use=chosen"):
        read_preferences(fixture("ultrafeedback.jsonl"), use="completion")
