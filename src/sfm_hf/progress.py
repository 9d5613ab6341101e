"""Progress of every stage's long loop: a bar on a terminal, a log line every few percent elsewhere.

Carriage-return frames are made for terminals; in a file (CI, ``nohup``, SLURM) they become
thousands of lines. Without a terminal a line is logged each time another ``LINE_PERCENT`` percent
is done, with the rate and the latest postfix (the loss, the current job).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Iterator

from accelerate.logging import get_logger

logger = get_logger(__name__)

PROGRESS_MODES = ("auto", "bar", "lines", "off")
LINE_PERCENT = 10


class LineProgress:
    """The subset of tqdm the stages use (iterate, update, set_postfix(_str), close), as log lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int = 0,
                 every_percent: int = LINE_PERCENT):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        self.every = every_percent
        self.next_percent = self._percent() // every_percent * every_percent + every_percent
        self.postfix = ""
        self.started = time.perf_counter()
        self.closed = False

    def _percent(self) -> int:
        return 100 * self.n // self.total if self.total else 0

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.total and self._percent() >= self.next_percent:
            self.next_percent = self._percent() // self.every * self.every + self.every
            self._log()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _log(self) -> None:
        seconds = time.perf_counter() - self.started
        rate = (self.n - self.start) / seconds if seconds > 0 else 0.0
        done = f"{self._percent()}% ({self.n}/{self.total} {self.unit})" if self.total else f"{self.n} {self.unit}"
        # Every machine's local main process reports its own share (``enabled``), not only the global main one.
        logger.info(f"{self.desc}: {done}, {rate:.1f} {self.unit}/s" + (f", {self.postfix}" if self.postfix else ""),
                    main_process_only=False)

    def close(self) -> None:
        if not self.closed and self.total is None:
            self._log()  # an unknown total logs only once, at the end
        self.closed = True


class _Silent(LineProgress):
    def _log(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str, mode: str = "auto",
             enabled: bool = True, initial: int = 0, leave: bool = True):
    """A tqdm bar (``mode`` bar, or auto on a terminal), log lines (lines, or auto without one) or nothing (off, or
    ``enabled`` false: the processes other than the local main one). ``leave`` false: a bar that disappears when
    done (one of many short inner loops)."""
    if not enabled or mode == "off":
        return _Silent(iterable, total, desc, unit, initial)
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return LineProgress(iterable, total, desc, unit, initial)


def duration(seconds: float) -> str:
    """``1h 02m``, ``3m 20s`` or ``42s``."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


class StageClock:
    """The remaining time of a stage made of ``total`` units of work (trainings), from its pace so far."""

    def __init__(self, total: int) -> None:
        self.total, self.finished = total, 0
        self.started = time.perf_counter()

    def finish_unit(self) -> None:
        self.finished += 1

    def remaining(self, current_fraction: float = 0.0) -> str:
        """Estimated time left, counting ``current_fraction`` of the unit under way as done; ``?`` before any pace."""
        done = self.finished + current_fraction
        if done <= 0:
            return "?"
        elapsed = time.perf_counter() - self.started
        return duration(elapsed / done * max(0.0, self.total - done))


class StepProgress:
    """Progress of one training of a multi-training stage: its bar, or a line every ``LINE_PERCENT`` % of its
    steps, each with the stage's remaining time; the last one also with what the training was checked on.

    Call :meth:`advance` after every step but the last, then :meth:`finish` (whose ``summary`` joins the last line).
    """

    def __init__(self, clock: StageClock, steps: int, *, desc: str, mode: str, enabled: bool,
                 steps_before: int = 0) -> None:
        # steps_before: steps the same training ran before this cycle, so the training's share done never drops.
        self.clock, self.steps, self.done, self.steps_before = clock, steps, 0, steps_before
        self.bar = progress(total=steps, desc=desc, unit="step", mode=mode, enabled=enabled, leave=False)
        self.marks = {math.ceil(steps * percent / 100) for percent in range(LINE_PERCENT, 101, LINE_PERCENT)}

    def advance(self) -> None:
        self.done += 1
        if self.done in self.marks:
            self.bar.set_postfix_str(f"stage ETA {self.clock.remaining(self._fraction())}")
        self.bar.update(1)

    def _fraction(self) -> float:
        return (self.steps_before + self.done) / (self.steps_before + self.steps)

    def finish(self, summary: str = "") -> None:
        """The last step, reported with ``summary`` (e.g. the validation accuracy it reached)."""
        self.done += 1
        eta = f"stage ETA {self.clock.remaining(1.0)}"
        self.bar.set_postfix_str(f"{summary}, {eta}" if summary else eta)
        self.bar.update(1)
        self.bar.close()
