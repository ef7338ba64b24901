"""How an error reaches the user: one line (`error_line`) and an exit status (`exit_status`)."""

from __future__ import annotations

import errno
import os

from dpokit.errors import ConfigError, DataError, error_line, exit_status


def test_error_lines():
    assert error_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/metrics.jsonl")) == \
        "No space left on device: /runs/a/metrics.jsonl"
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "a.tmp", None, "b")) == \
        "Permission denied: a.tmp -> b"
    assert error_line(DataError("pairs.jsonl: no rows\n  (the file is empty)")) == "pairs.jsonl: no rows (the file is empty)"
    # another library's OSError: its first line, not the advice that follows
    assert error_line(OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")) == \
        "We couldn't connect to 'https://huggingface.co'."


def test_exit_status(capsys):
    def bad_input():
        raise ConfigError("train.lr must be > 0; got 0")

    def interrupted():
        raise KeyboardInterrupt

    assert exit_status(lambda: 0) == 0
    assert exit_status(bad_input) == 2
    assert capsys.readouterr().err == "error: train.lr must be > 0; got 0\n"
    assert exit_status(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"
