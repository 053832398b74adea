"""Stopping work cleanly on SIGTERM / SIGINT (preemption, Ctrl-C): the handler only records the
signal; the work finishes its step, saves its state and raises ``errors.Stopped``."""

from __future__ import annotations

import signal
from typing import Any

from cdmbench.runtime import distributed


class StopSignal:
    """A context in which SIGTERM / SIGINT are recorded in ``received`` instead of stopping the
    process (outside the main thread, signals stay with the caller)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        """The received signal's name, e.g. "SIGTERM"."""
        return signal.Signals(self.received).name if self.received else "a signal"

    def requested(self) -> bool:
        """Whether any process of the process group received a signal (all processes agree, so
        all stop; a collective: every process must ask)."""
        return distributed.any_process(self.received is not None)
