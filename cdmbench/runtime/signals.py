"""Stopping work cleanly on SIGTERM / SIGINT (preemption, Ctrl-C): the handler only records the
signal; the work finishes its step, saves its state and raises ``stop.stopped(...)``: an
``errors.Stopped``, for SIGINT an ``errors.Interrupted`` (also a ``KeyboardInterrupt``).

The handlers belong to the work, not to the process: ``StopSignal`` installs them for the ``with``
block that protects the work and puts the previous ones back when it ends, also by an exception.
Outside it, Ctrl-C is whatever the caller made it (Python's default: ``KeyboardInterrupt``).

A batch job may name further signals in ``$CDMBENCH_STOP_SIGNALS`` (e.g. ``USR2``, SLURM's signal
before the time limit; ``cdmbench.launch`` sets it): they stop the work the same way."""

from __future__ import annotations

import os
import signal
from typing import Any

from cdmbench.errors import CdmbenchError, Interrupted, Stopped
from cdmbench.runtime import distributed

STOP_SIGNALS_ENV = "CDMBENCH_STOP_SIGNALS"


def stop_signals() -> tuple[int, ...]:
    """SIGTERM, SIGINT and the signals ``$CDMBENCH_STOP_SIGNALS`` names (comma-separated, ``USR2`` or
    ``SIGUSR2``)."""
    extra = []
    for name in filter(None, (n.strip().upper() for n in os.environ.get(STOP_SIGNALS_ENV, "").split(","))):
        signum = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
        if not isinstance(signum, signal.Signals) or name in ("SIGKILL", "SIGSTOP", "KILL", "STOP"):
            raise CdmbenchError(f"${STOP_SIGNALS_ENV} names {name!r}, not a signal a process can catch; "
                                "name signals such as USR1 or USR2")
        extra.append(signum)
    return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGINT, *extra)))


class StopSignal:
    """A context in which SIGTERM / SIGINT (and ``stop_signals()``'s others) are recorded in
    ``received`` instead of stopping the process; on leaving it the previous handlers are back
    (outside the main thread, where Python lets no handler be installed, signals stay with the
    caller)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if self._previous:
            raise RuntimeError("a StopSignal is not re-entrant: make a new one")
        try:
            for s in stop_signals():
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (raised by the first: nothing was installed)
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            # None: a handler installed outside Python, which Python cannot put back: the default
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    @property
    def name(self) -> str:
        """The received signal's name, e.g. "SIGTERM"."""
        return signal.Signals(self.received).name if self.received else "a signal"

    def requested(self) -> bool:
        """Whether any process of the process group received a signal (all processes agree, so
        all stop; a collective: every process must ask)."""
        return distributed.any_process(self.received is not None)

    def stopped(self, message: str) -> Stopped:
        """The error to raise once the work has saved its state: ``Interrupted`` (a ``Stopped`` and
        a ``KeyboardInterrupt``) if this process received SIGINT, else ``Stopped``; its ``signum``
        is the signal this process received (None: another process of the group did)."""
        error = (Interrupted if self.received == signal.SIGINT else Stopped)(message)
        error.signum = self.received
        return error
