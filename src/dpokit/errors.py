"""Errors that reach the user as one clear line (the CLI prints them without a traceback), and the
helpers that word such lines and turn them into exit statuses."""

from __future__ import annotations

import os
import sys
import traceback


class DpokitError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in dpokit."""


class ConfigError(DpokitError):
    """An invalid configuration key or value, caught before any model or data loads."""


class DataError(DpokitError):
    """Invalid preference data; the message names the file, the line and the problem."""


class SourceError(DataError):
    """A data source that cannot be read at all (missing, unsupported, unreadable, not a dataset), as
    opposed to one that reads but holds invalid rows: `dpokit validate` exits 2 for it, not 1."""


class ModelError(DpokitError):
    """A model that cannot be found, loaded or trained as asked."""


class TrainingError(DpokitError):
    """A run that cannot continue (repeated non-finite steps, a checkpoint that does not match)."""


class StorageError(DpokitError):
    """A write that failed for the disk's sake (full, over quota, read-only); the message names the path
    and the free space."""


class UserCodeError(DpokitError):
    """The user's own code (a `module:function` judge) raised: one line naming it, then the user's frames of
    the traceback (not dpokit's), which the CLI prints below the line."""

    def __init__(self, message: str, frames: str = ""):
        super().__init__(message)
        self.frames = frames


class RunLockedError(DpokitError):
    """Another process holds the run directory."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (another library's detail), else its type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# how a message names a value's type: YAML's words for config values, JSON's (with an article) for data rows
_TYPE_NAMES = {type(None): ("null", "null"), bool: ("boolean", "a boolean"), int: ("integer", "a number"),
               float: ("number", "a number"), str: ("string", "a string"), list: ("list", "a list"),
               dict: ("mapping", "an object")}


def type_name(value: object, *, json: bool = False) -> str:
    names = _TYPE_NAMES.get(type(value))
    return names[json] if names else type(value).__name__


# ------------------------------------------------------------------------------------------ how errors reach the user


def exit_status(command, *args) -> int:
    """Call a command and return its exit status. Bad input or environment is one line on stderr and
    status 2, without a traceback unless DPOKIT_DEBUG=1; other exceptions are bugs and keep theirs;
    Ctrl-C is 130."""
    try:
        return command(*args)
    except (DpokitError, OSError) as e:
        if os.environ.get("DPOKIT_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {error_line(e)}", file=sys.stderr)
        if isinstance(e, UserCodeError) and e.frames:
            print(e.frames.rstrip("\n"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def error_line(e: BaseException) -> str:
    """An error as one line: an OSError as `strerror: filename`, dpokit's messages with their lines joined,
    other libraries' messages by their first line (the rest is advice for their own API)."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None:
            text += f": {e.filename}"
        if e.filename2 is not None:
            text += f" -> {e.filename2}"
        return text
    if not isinstance(e, DpokitError):
        return first_line(e)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
