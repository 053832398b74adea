"""Progress of long work: tqdm's bar in a terminal; in a batch job (``--no-progress``) a plain
line a minute, as training prints its log rows, so that a job's log shows what it is doing and
how long it has left, and work that takes less than a minute adds nothing to it. Either way the
rate (and the time left) leaves out the first update: its one-time costs (the first batch of a
classifier takes 15x a later one on a CPU) made the first estimate many times too long."""

from __future__ import annotations

import sys

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

LINE_EVERY = 60.0  # seconds between a batch job's lines
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]"


def note(text: str) -> None:
    """Print a line to stdout; a terminal's bar showing meanwhile is cleared for it and drawn
    again under it, so the line is never glued onto the bar."""
    plain_tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


class _Warm:
    """The rate of a tqdm measured from the end of its first update: the mean since then (a
    steady estimate of the time left), tqdm's own until a second update."""

    _warm: tuple[float, float] | None = None  # (time, count) at the end of the first update

    def update(self, n=1):
        shown = super().update(n)
        if not self.disable and self._warm is None and self.n > self.initial:  # a disabled one has no count
            self._warm = (self._time(), self.n)
        return shown

    @property
    def format_dict(self):
        state = super().format_dict
        if self._warm is not None and self.n > self._warm[1] and self._time() > self._warm[0]:
            state["rate"] = (self.n - self._warm[1]) / (self._time() - self._warm[0])
        return state


class _Bar(_Warm, tqdm):
    """tqdm's bar (or a notebook's widget)."""


class _Lines(_Warm, plain_tqdm):
    """A tqdm that prints its state as a whole line to stdout (no carriage returns, no bar), at
    most every ``mininterval`` seconds once ``delay`` has passed, and when it closes if it printed
    before; each count once, as a ``note`` (an outer loop's bar in a terminal stays whole)."""

    def display(self, msg=None, pos=None):
        if msg is None and self.n != getattr(self, "_printed_n", None):  # msg '' clears a bar: no-op here
            self._printed_n = self.n  # closing right after a line repeats nothing
            note(self.__str__())
        return True

    def set_description(self, desc=None, refresh=True):
        self.set_description_str(desc, refresh=False)  # a new epoch, say, shows in the next line

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # the loss shows in the next line


class _Discard:
    """tqdm's own output (the newline it writes on close) goes nowhere: ``display`` prints."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def bar(iterable=None, *, progress: bool, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` when ``progress``; without it, once ``LINE_EVERY`` seconds
    have passed, a line every ``LINE_EVERY`` seconds and one at the end (count, elapsed, time
    left, rate). ``disable=True`` (a process that is not the first, say) is silent either way.
    For the outer loop of long work; inner loops keep ``tqdm(..., disable=not progress)``."""
    if progress or kwargs.get("disable"):
        return _Bar(iterable, **kwargs)
    kwargs.pop("leave", None)
    return _Lines(iterable, file=_Discard(), mininterval=LINE_EVERY, delay=LINE_EVERY, miniters=1, leave=True,
                  bar_format=LINE_FORMAT, **kwargs)
