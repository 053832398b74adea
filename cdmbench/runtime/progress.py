"""Progress of long work: tqdm's bar in a terminal; in a batch job (``--no-progress``) a plain
line a minute, as training prints its log rows, so that a job's log shows what it is doing and
how long it has left, and work that takes less than a minute adds nothing to it."""

from __future__ import annotations

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

LINE_EVERY = 60.0  # seconds between a batch job's lines
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, {rate_fmt}]"


class _Lines(plain_tqdm):
    """A tqdm that prints its state as a whole line to stdout (no carriage returns, no bar), at
    most every ``mininterval`` seconds once ``delay`` has passed, and when it closes if it printed
    before; each count once."""

    def display(self, msg=None, pos=None):
        if msg is None and self.n != getattr(self, "_printed_n", None):  # msg '' clears a bar: no-op here
            self._printed_n = self.n  # closing right after a line repeats nothing
            print(self.__str__(), flush=True)
        return True

    def set_description(self, desc=None, refresh=True):
        self.set_description_str(desc, refresh=False)  # a new epoch, say, shows in the next line


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
        return tqdm(iterable, **kwargs)
    kwargs.pop("leave", None)
    return _Lines(iterable, file=_Discard(), mininterval=LINE_EVERY, delay=LINE_EVERY, miniters=1, leave=True,
                  bar_format=LINE_FORMAT, **kwargs)
