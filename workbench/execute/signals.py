"""SIGINT / SIGTERM turned into a flag for the duration of a ``with`` block.

Training (:mod:`workbench.training.loop`) checks the flag after each step, checkpoints and
stops; ``workbench launch`` (:mod:`workbench.cli.launch`) passes the signal on to every
process it started. Outside the main thread (a notebook's worker thread, for instance)
no handler can be installed, and the block runs with the process's handlers unchanged.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["StopSignals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, SIGINT / SIGTERM set ``received`` (the first signal's name) and call
    ``on_signal(name)`` for every signal, instead of ending the process. The previous
    handlers are restored on exit."""

    def __init__(self, on_signal: Callable[[str], None] | None = None):
        self.on_signal = on_signal
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
        if self.on_signal is not None:
            self.on_signal(name)

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
