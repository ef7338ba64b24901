"""metrics.jsonl and samples.jsonl across a resume: the rows after the checkpoint dropped, every row before
it kept whole, whatever its text holds."""

from __future__ import annotations

import json

from dpokit.metrics import MetricsWriter, read_metrics
from dpokit.storage import text_lines


def test_text_lines_split_at_newlines_only():
    assert text_lines('{"a": "x\u2028y"}\r\n{"b": "z\u0085"}\n') == ['{"a": "x\u2028y"}', '{"b": "z\u0085"}']
    assert text_lines("") == [] and text_lines("one") == ["one"]


def test_a_resume_keeps_rows_whose_text_holds_unicode_line_separators(tmp_path):
    # samples are written with ensure_ascii=False: U+2028 / U+2029 / U+0085 stay raw inside their strings
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3))
                                            + '{"step": 4, "lo', encoding="utf-8")  # cut short by the kill
    samples = [{"step": 2, "completion": "a\u2028b\u2029c\u0085d"}, {"step": 3, "completion": "later"}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples),
                                            encoding="utf-8")
    writer = MetricsWriter(tmp_path, enabled=True, trackers=[], total_steps=4, resume_step=2)
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    kept = [json.loads(line) for line in text_lines((tmp_path / "samples.jsonl").read_text(encoding="utf-8"))]
    assert kept == samples[:1]
    assert not list(tmp_path.glob("*.tmp"))
