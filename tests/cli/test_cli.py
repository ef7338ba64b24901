"""The `dpokit` error rule: bad input or environment is one line on stderr and exit 2, without a traceback
unless DPOKIT_DEBUG=1; a bug keeps its traceback; Ctrl-C is 130."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dpokit.cli import main
from dpokit.errors import DpokitError


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err[len("error: "):-1]


def test_a_config_error_is_one_line(capsys):
    assert main(["train", "train.lrr=1e-5"]) == 2
    assert "did you mean 'train.lr'" in one_line(capsys.readouterr().err)


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    assert main(["label", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert one_line(capsys.readouterr().err) == f"No such file or directory: {tmp_path / 'missing.jsonl'}"
    assert main(["label", str(tmp_path), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert one_line(capsys.readouterr().err) == f"Is a directory: {tmp_path}"


def dpokit(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DPOKIT_DEBUG"}
    if debug:
        env["DPOKIT_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "dpokit", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_no_traceback_unless_dpokit_debug(tmp_path):
    args = ("label", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p.jsonl"))
    plain = dpokit(*args)
    assert plain.returncode == 2 and plain.stdout == ""
    assert one_line(plain.stderr) == f"No such file or directory: {tmp_path / 'missing.jsonl'}"
    debug = dpokit(*args, debug=True)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert "FileNotFoundError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()  # the same line, after the traceback


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from dpokit.generation import pairs

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pairs, "label_file", broken)
    with pytest.raises(ZeroDivisionError):
        main(["label", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "p.jsonl")])


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    from dpokit.generation import pairs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairs, "label_file", interrupted)
    assert main(["label", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# ------------------------------------------------------------------------------------------ missing models


@pytest.fixture
def no_model_loads(monkeypatch):
    from dpokit import models

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(models, name, lambda *a, **k: pytest.fail("loaded a model before checking the paths"))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello\n", encoding="utf-8")
    return str(path)


def test_evaluate_a_missing_run_names_the_path_first(tmp_path, prompts, no_model_loads, capsys):
    missing = tmp_path / "runs" / "no-such-run"
    assert main(["evaluate", str(missing), "--prompts", prompts, "--judge", "length"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{missing}: ") and "--reference" not in line


def test_evaluate_a_name_that_is_no_run_suggests_reference(tmp_path, monkeypatch, prompts, no_model_loads, capsys):
    monkeypatch.chdir(tmp_path)
    # one slash and no leading ./ : a hub id as far as the name goes, or a run path with a typo
    assert main(["evaluate", "runs/typo", "--prompts", prompts, "--judge", "length"]) == 2
    assert one_line(capsys.readouterr().err) == ("runs/typo: no such run or checkpoint; for a hub model, name its "
                                                 "reference with --reference")


def test_frontier_checks_every_target_before_evaluating(tmp_path, prompts, no_model_loads, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    missing = tmp_path / "runs" / "missing"
    out = tmp_path / "frontier"
    assert main(["frontier", str(model), f"IPO={missing}", "--reference", str(model), "--prompts", prompts,
                 "--judge", "length", "--out", str(out)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"{missing}: ")
    assert not out.exists()


def test_dpokit_errors_are_one_line_even_with_several_lines(monkeypatch, tmp_path, capsys):
    from dpokit.generation import pairs

    def fails(*args, **kwargs):
        raise DpokitError("first part\nsecond part")

    monkeypatch.setattr(pairs, "label_file", fails)
    assert main(["label", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert one_line(capsys.readouterr().err) == "first part second part"


def test_unreadable_prompt_and_sample_files_are_one_line(tmp_path, no_model_loads, capsys):
    (tmp_path / "prompts.json").write_text('[{"prompt": "a"', encoding="utf-8")
    (tmp_path / "samples.jsonl").write_bytes(b'\xff{"prompt": "a"}\n')
    assert main(["sample", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "s.jsonl"), "--model",
                 str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err) == f"{tmp_path / 'prompts.json'}:1: not valid JSON (Expecting ',' delimiter)"
    assert main(["label", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert one_line(capsys.readouterr().err) == f"{tmp_path / 'samples.jsonl'}: not valid UTF-8 (byte 1)"
