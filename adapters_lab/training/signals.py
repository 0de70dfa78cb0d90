"""Stop requests that the loop answers with a checkpoint before exiting."""

from __future__ import annotations

import signal
import threading


class TermSignal:
    """Turns SIGTERM (what SLURM sends before preemption) into a flag the loop checks after
    each optimiser step, so it can checkpoint before exiting."""

    def __init__(self):
        self.received = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
