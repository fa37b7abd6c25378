"""Progress for long work: a tqdm bar on a terminal, plain lines otherwise.

A bar redrawn in place is unreadable in a log file (a cluster job, CI, `> run.log`), and tqdm
switches itself off there, which left minutes-long phases silent. Off a terminal, `bar` prints a
line when a phase starts, one at most every `every_s` seconds while it runs (count, rate, ETA),
and one when it ends, to stderr. `enabled=False` silences both forms.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm


def bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    initial: float = 0,
    every_s: float = 30.0,
    stream: Any = None,
    **tqdm_kwargs: Any,
):
    """A progress bar for a phase: tqdm when stderr is a terminal, `PhaseLines` when not."""
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and not _is_terminal(stream):
        return PhaseLines(iterable, total=total, desc=desc, unit=unit, initial=initial, every_s=every_s, stream=stream)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        **tqdm_kwargs,
    )


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class PhaseLines:
    """tqdm's interface (iterate, `update`, `set_postfix`, `close`) as a few log lines."""

    def __init__(self, iterable, *, total, desc, unit, initial, every_s, stream):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n, self.start_n, self.every_s, self.stream = initial, initial, every_s, stream
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()
        self.closed = False
        of = f" of {_count(total)} {unit}" if total else ""
        at = f", from {_count(initial)}" if initial else ""
        self._line(f"started{of}{at}")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PhaseLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(self._status(now))

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(values or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.t0
        done = self.n - self.start_n
        self._line(f"done, {_count(done)} {self.unit} in {seconds:.1f} s ({_rate(done, seconds, self.unit)})")

    def _status(self, now: float) -> str:
        seconds = now - self.t0
        done = self.n - self.start_n
        of = f"/{_count(self.total)}" if self.total else ""
        eta = ""
        if self.total and done > 0:
            eta = f", ETA {max(self.total - self.n, 0) * seconds / done:.0f} s"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{_count(self.n)}{of} {self.unit}, {_rate(done, seconds, self.unit)}{eta}{extra}"

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)


def _count(v: float | None) -> str:
    return "?" if v is None else f"{v:g}" if isinstance(v, float) and not v.is_integer() else f"{int(v)}"


def _rate(n: float, seconds: float, unit: str) -> str:
    return f"{n / seconds:.3g} {unit}/s" if seconds > 0 else f"- {unit}/s"
