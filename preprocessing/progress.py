"""Counts, rates and ETA of the long steps, where a person watches (layer: preprocessing, so every stage uses it).

A `Progress` per step (a build's chunks, the dedup autoencoder's epochs and its encoding, training steps, evaluation
suites) shows itself three ways:
- on a terminal (stderr is a TTY): a tqdm bar on stderr;
- otherwise (a log file, CI, a Ray Job's log): a line now and then, `[progress] build 3/10 chunks 30% ...`: when at
  least `interval` seconds and a tenth of the work have passed since the last line, or a minute has, and at the end;
- to every listener registered with `listen` (the Prefect tasks turn updates into progress artifacts), at most once
  per `interval` seconds and at the end.
A Ray Job's caller reads the same lines back from the job's log (`relay`), so its listeners see the job's progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

from preprocessing import settings

log = logging.getLogger(__name__)

INTERVAL_ENV = "DCGAN_PROGRESS_INTERVAL"   # seconds between updates when not on a terminal (default 10)
HEARTBEAT_S = 60.0                         # a line at least this often, however slow the step
LINE = re.compile(r"\[progress\] (?P<what>\S+) (?P<done>\d+)/(?P<total>\d+) (?P<unit>\S+)(?P<rest>.*)$")


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass(frozen=True)
class Update:
    """Where one step stands: `done` of `total` `unit`s, its rate (units/s) and the seconds left, if known."""

    what: str
    done: int
    total: int
    unit: str
    rate: float | None = None
    eta_s: float | None = None
    note: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * min(1.0, self.done / self.total) if self.total else 100.0

    def line(self) -> str:
        parts = [f"[progress] {self.what} {self.done}/{self.total} {self.unit}", f"{self.percent:.0f}%"]
        if self.rate:
            parts.append(f"{self.rate:.3g} {self.unit}/s")
        if self.eta_s is not None and self.done < self.total:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    @classmethod
    def parse(cls, line: str) -> Update | None:
        """The update a progress line (anywhere in `line`: Ray prefixes a worker's lines) says, else None."""
        m = LINE.search(line)
        if not m:
            return None
        rest = m.group("rest")
        eta = re.search(r"ETA (\d+):(\d\d):(\d\d)", rest)
        rate = re.search(r"([\d.e+]+) \S+/s", rest)
        return cls(m.group("what"), int(m.group("done")), int(m.group("total")), m.group("unit"),
                   rate=float(rate.group(1)) if rate else None,
                   eta_s=(int(eta.group(1)) * 3600 + int(eta.group(2)) * 60 + int(eta.group(3))) if eta else None)


Listener = Callable[[Update], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


@contextlib.contextmanager
def listen(fn: Listener) -> Iterator[None]:
    """Call `fn(update)` for every step's progress in this process while the block runs."""
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(fn)


def listening() -> bool:
    return bool(_listeners)


def notify(update: Update) -> None:
    for fn in list(_listeners):
        try:
            fn(update)
        except Exception as err:  # noqa: BLE001 - a display must never stop the work it shows
            log.debug("progress listener failed: %s", err)


def relay(line: str) -> bool:
    """Tell the listeners what a progress line read from elsewhere (a Ray Job's log) says; False if it is not one."""
    update = Update.parse(line)
    if update is not None:
        notify(update)
    return update is not None


class Progress:
    """One step's progress: `update(done)` or `advance(n)`, then `close()` (or use it as a context manager)."""

    def __init__(self, what: str, total: int, unit: str = "items", *, initial: int = 0, stream: TextIO | None = None,
                 interval: float | None = None, bar: bool | None = None, show: bool = True):
        """`bar`: a tqdm bar (default: when `stream`, stderr by default, is a terminal); `show=False`: no bar and no
        lines, only the listeners are told."""
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.stream = stream or sys.stderr
        self.show = show
        tty = show and (self.stream.isatty() if bar is None else bar)
        self.interval = interval if interval is not None else (0.5 if tty else settings.seconds(INTERVAL_ENV))
        self.done = self.initial = int(initial)
        self.note = ""
        self._start = time.monotonic()
        self._printed_at, self._printed_done, self._told_at = self._start, self.initial, -math.inf
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=what, unit=unit, file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)
        self._closed = False

    def snapshot(self) -> Update:
        elapsed = time.monotonic() - self._start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 and self.done > self.initial else None
        eta = (self.total - self.done) / rate if rate else None
        return Update(self.what, self.done, self.total, self.unit, rate, eta, self.note)

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str | None = None) -> None:
        self.done = int(done)
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self._bar is not None:
            self._bar.n = self.done
            if self.note:
                self._bar.set_postfix_str(self.note, refresh=False)
            self._bar.refresh()
        elif self.show and self._line_due(now):
            self._print(now)
        if now - self._told_at >= self.interval:
            self._told_at = now
            notify(self.snapshot())

    def _line_due(self, now: float) -> bool:
        since = now - self._printed_at
        tenth = max(1, self.total // 10)
        return since >= HEARTBEAT_S or (since >= self.interval and self.done - self._printed_done >= tenth)

    def _print(self, now: float) -> None:
        self._printed_at, self._printed_done = now, self.done
        # write, not print: Ray Train replaces a worker's print with one that also logs, and the line would show twice
        self.stream.write(self.snapshot().line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.show and (self._printed_done != self.done or self.done == self.initial):
            self._print(time.monotonic())
        notify(self.snapshot())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
