"""SIGINT and SIGTERM during training: the first lets the current step finish, then the trainer
writes a checkpoint and leaves; a second one exits at once."""

from __future__ import annotations

import os
import signal


class StopSignals:
    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: no checkpoint, leave now
            os._exit(128 + signum)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing the current step, then writing a checkpoint "
              "(send it again to exit at once)", flush=True)

    def __enter__(self) -> StopSignals:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        except ValueError:  # not the main thread (a notebook worker, say): signals stay as they were
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
