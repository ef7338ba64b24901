"""Pair construction: counts per mode, ties and margins dropped and counted, output `dpokit train` reads."""

import pytest

from dpokit.data.records import read_preferences
from dpokit.errors import ConfigError
from dpokit.generation.jsonl import write_jsonl
from dpokit.generation.pairs import label_file, label_rows, preference_pairs


def test_four_distinct_scores_give_six_pairs_higher_score_chosen():
    scores = [0.2, -0.5, 0.9, 0.1]
    pairs, counts = preference_pairs(scores)
    assert len(pairs) == 6 and counts.pairs == 6 and counts.candidates == 6
    assert sum(counts.dropped.values()) == 0
    assert all(scores[c] > scores[r] for c, r in pairs)
    assert {frozenset(p) for p in pairs} == {frozenset((i, j)) for i in range(4) for j in range(i + 1, 4)}


def test_ties_are_dropped_and_counted():
    pairs, counts = preference_pairs([0.5, 0.5, 0.1, 0.9])
    assert len(pairs) == 5
    assert counts.dropped == {"empty": 0, "identical": 0, "tie": 1, "below_margin": 0}
    pairs, counts = preference_pairs([0.0, 0.0, 0.0, 0.0])
    assert pairs == [] and counts.dropped["tie"] == 6


def test_margin_drops_close_pairs():
    # gaps: (0,1) 0.05, (0,2) 0.5, (0,3) 0.3, (1,2) 0.55, (1,3) 0.25, (2,3) 0.8
    pairs, counts = preference_pairs([0.3, 0.25, 0.8, 0.0], margin=0.28)
    assert counts.dropped == {"empty": 0, "identical": 0, "tie": 0, "below_margin": 2}
    assert sorted(pairs) == sorted([(2, 0), (0, 3), (2, 1), (2, 3)])


def test_identical_or_empty_texts_never_become_a_pair():
    pairs, counts = preference_pairs([0.1, 0.1, 0.7, 0.7], texts=["a", "a", "b", "c"])
    assert counts.dropped == {"empty": 0, "identical": 1, "tie": 1, "below_margin": 0}
    assert len(pairs) == 4
    pairs, counts = preference_pairs([0.1, 0.5, 0.9], texts=["a", " ", "b"])
    assert counts.dropped["empty"] == 2 and pairs == [(2, 0)]


def test_best_vs_worst_gives_one_pair_per_prompt():
    pairs, counts = preference_pairs([0.2, -0.5, 0.9, 0.1], mode="best-vs-worst")
    assert pairs == [(2, 1)] and counts.candidates == 1
    pairs, counts = preference_pairs([0.3, 0.3], mode="best-vs-worst")
    assert pairs == [] and counts.dropped["tie"] == 1
    with pytest.raises(ConfigError):
        preference_pairs([0.1], mode="best-of-all")


def test_label_rows_match_the_prompt_format_and_train_reads_them(tmp_path):
    rows = [{"prompt": "The film was", "completions": [" great", " awful", " fine", " great"]},
            {"prompt": [{"role": "user", "content": "Review it."}], "completions": ["Lovely.", "Dull."]}]
    out, counts = label_rows(rows, [[0.9, -0.8, 0.2, 0.9], [0.7, -0.4]])
    assert counts.prompts == 2 and counts.candidates == 7 and counts.pairs == 6
    assert counts.dropped["identical"] == 1  # " great" twice
    assert out[-1]["chosen"] == [{"role": "assistant", "content": "Lovely."}]
    assert out[-1]["prompt"] == [{"role": "user", "content": "Review it."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", out)
    read = read_preferences(str(path))
    assert len(read.records) == 6
    assert read.records[0].chosen == " great" and read.records[0].rejected == " awful"
    # the rows carry score_chosen/score_rejected, UltraFeedback's names: their prompts must still be read
    assert read.records[0].prompt == "The film was"
    assert read.records[-1].prompt == [{"role": "user", "content": "Review it."}]


def test_label_file_uses_scores_in_the_rows_and_writes_counts(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "completions": ["a", "b", "c"], "scores": [1, 2, 2]}])
    summary = label_file(samples, tmp_path / "p.jsonl", None)
    assert summary.counts.pairs == 2 and summary.counts.dropped["tie"] == 1
    assert summary.mean_score == pytest.approx(5 / 3)
    assert (tmp_path / "p.jsonl.meta.json").is_file()


def test_label_without_two_completions_per_prompt_is_an_error_and_writes_nothing(tmp_path, capsys):
    from dpokit.cli import main

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": p, "completions": ["only one"], "scores": [1.0]}
                                                 for p in ("x", "y")])
    out = tmp_path / "pairs.jsonl"
    assert main(["label", str(samples), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {samples}: no prompt has two or more completions, and a preference pair needs two; "
                   "sample at least two per prompt (`dpokit sample --n 2` or more)\n")
    assert not out.exists() and not (tmp_path / "pairs.jsonl.meta.json").exists()


def test_label_counts_prompts_with_one_completion_as_skipped(tmp_path, capsys):
    import json

    from dpokit.cli import main

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "completions": ["a", "b"], "scores": [1, 2]},
                                                 {"prompt": "y", "completions": ["c"], "scores": [3]}])
    out = tmp_path / "pairs.jsonl"
    assert main(["label", str(samples), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(
        f"1 pairs from 2 prompts (1 with fewer than two completions skipped, 1 candidates, 0 dropped) → {out}")
    counts = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())["counts"]
    assert (counts["prompts"], counts["too_few"], counts["pairs"]) == (2, 1, 1)
    assert len(read_preferences(str(out)).records) == 1


def test_label_with_every_candidate_dropped_is_an_error_and_keeps_the_scores(tmp_path, capsys):
    import json

    from dpokit.cli import main

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "completions": ["a", "b"], "scores": [1, 1]},
                                                 {"prompt": "y", "completions": ["c", "c"], "scores": [1, 2]}])
    out, scored = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    assert main(["label", str(samples), "--out", str(out), "--scored-out", str(scored)]) == 2
    assert capsys.readouterr().err == (
        f"error: {samples}: no preference pair: 0 pairs from 2 prompts (2 candidates, 2 dropped: identical: 1, "
        "tie: 1); a pair needs two different, non-empty completions of one prompt with different scores\n")
    assert not out.exists() and not (tmp_path / "pairs.jsonl.meta.json").exists()
    assert [json.loads(line)["scores"] for line in scored.read_text().splitlines()] == [[1.0, 1.0], [1.0, 2.0]]


def test_a_missing_eos_penalty_ranks_a_cut_completion_below_a_finished_one(tmp_path, capsys):
    import json

    from dpokit.cli import main
    from dpokit.errors import DataError

    rows = [{"prompt": "x", "completions": ["cut off", "ended.", "low"], "scores": [0.9, 0.6, 0.1],
             "finished": [False, True, True]}]
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    out, scored = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    assert main(["label", str(samples), "--out", str(out), "--mode", "best-vs-worst", "--scored-out", str(scored),
                 "--missing-eos-penalty", "1.0"]) == 0
    (pair,) = [json.loads(line) for line in out.read_text().splitlines()]
    # 0.9 - 1.0 ranks the cut completion worst; without the penalty it would be the chosen one
    assert (pair["chosen"], pair["rejected"]) == ("ended.", "cut off")
    assert pair["score_rejected"] == pytest.approx(-0.1)
    assert json.loads(scored.read_text())["scores"] == [0.9, 0.6, 0.1]  # the judge's own scores kept
    capsys.readouterr()
    unflagged = write_jsonl(tmp_path / "u.jsonl", [{k: v for k, v in rows[0].items() if k != "finished"}])
    with pytest.raises(DataError, match="u.jsonl:1: a missing-EOS penalty needs the row's 'finished' flags"):
        label_file(unflagged, tmp_path / "q.jsonl", None, missing_eos_penalty=1.0)
