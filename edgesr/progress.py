"""Progress on long work: a tqdm bar on a terminal; elsewhere (CI logs, `make demo > log`) a log line every 10 %,
so a log file holds a few readable lines instead of thousands of carriage-return redraws."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("edgesr")


class _LogProgress:
    """The part of tqdm's interface edgesr uses, as log lines at every tenth of the total."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, initial: int, unit: str) -> None:
        self.iterable, self.desc, self.total, self.n, self.unit = iterable, desc, total, initial, unit
        self.start_n, self.t0, self.postfix = initial, time.monotonic(), ""
        self.next_report = self._next(initial)

    def _next(self, n: int) -> int:
        step = max(1, (self.total or 10) // 10)
        return (n // step + 1) * step

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update()

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.total and (self.n >= self.next_report or self.n == self.total):
            self.next_report = self._next(self.n)
            rate = (self.n - self.start_n) / max(time.monotonic() - self.t0, 1e-9)
            log.info(
                "%s: %d/%d %s (%d%%), %.2f %s/s%s",
                self.desc,
                self.n,
                self.total,
                self.unit,
                100 * self.n // self.total,
                rate,
                self.unit,
                f", {self.postfix}" if self.postfix else "",
            )

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable | None,
    desc: str,
    total: int | None = None,
    initial: int = 0,
    unit: str = "it",
    disable: bool = False,
) -> Any:
    """tqdm(iterable, ...) on a terminal, periodic log lines otherwise; nothing at all with `disable`. With
    `iterable` None, count by hand with `.update()` (work done in threads)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable) + initial
    if disable:
        return _Silent(iterable)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit)
    return _LogProgress(iterable, desc, total, initial, unit)


class _Silent:
    def __init__(self, iterable: Iterable | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable or ())

    def update(self, k: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
