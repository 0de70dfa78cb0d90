"""Stop requests that the loop answers with a checkpoint before exiting: SIGTERM (what SLURM sends
before pre-emption) and SIGINT (Ctrl-C; a second one interrupts at once)."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each optimiser step, so it can
    checkpoint before exiting; ``signum`` is the first one received."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the step to end
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
