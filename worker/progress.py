"""How a job says what it is doing: the percentage of the whole job done and, with it, a Step:
the phase it is in (a nested phase carries its parents' names: "relabel (rung 3 of 4): audit:
reference models") and, where the phase counts something, how many of how many.

The job's heartbeat adds the phase's time left (``Pace``) and writes it to the ledger, where
``GET /jobs/{id}`` shows it; ``PhaseBars`` draws the steps as bars (``lethe train``,
``lethe demo``). Torch-free, and tqdm is imported only to draw: ``lethe`` imports this module
in the API image too, which has neither.
"""

import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass(frozen=True)
class Step:
    phase: str = ""
    done: int | None = None
    total: int | None = None
    unit: str = ""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Step":
        phase, unit = values.get("phase") or "", values.get("unit") or ""
        return cls(phase, values.get("done"), values.get("total"), unit)

    @property
    def said(self) -> bool:
        """Whether it says anything: a bare percentage keeps the phase it was in."""
        return bool(self.phase) or self.total is not None


class Progress(Protocol):
    def __call__(self, percent: int, step: Step | None = None, /) -> None: ...


def within(progress: Progress | None, start: int, end: int, phase: str = "") -> Progress | None:
    """A callback that maps a phase's 0-100 onto ``start``-``end`` of its parent's, and puts the
    phase's name before whatever the steps inside it say."""
    if progress is None:
        return None

    def report(percent: int, step: Step | None = None, /) -> None:
        step = step or Step()
        named = replace(step, phase=": ".join(name for name in (phase, step.phase) if name))
        progress(start + (end - start) * percent // 100, named)

    return report


class Pace:
    """Estimates a counted phase's time left from its pace since it was first reported."""

    def __init__(self) -> None:
        self._phase: str | None = None
        self._start = (0.0, 0)  # when the phase was first seen, and its count then

    def detail(self, step: Step) -> dict[str, Any]:
        now = time.monotonic()
        if step.phase != self._phase:
            self._phase, self._start = step.phase, (now, step.done or 0)
        started, done_then = self._start
        left = None
        if step.done is not None and step.total is not None and step.done > done_then:
            per_unit = (now - started) / (step.done - done_then)
            left = round(per_unit * (step.total - step.done), 1)
        return {**asdict(step), "left_seconds": left}


# A counted phase: its count, a bar, elapsed and time left; any other: the time it has taken.
COUNTED = "{desc}: {n_fmt}/{total_fmt} {unit} |{bar}| {elapsed}<{remaining}"
UNCOUNTED = "{desc}: {elapsed}"


class PhaseBars:
    """Draws each phase as a bar (tqdm), one after the other; on a stream that is not a terminal,
    one line per phase instead of a redrawn bar. Called as a ``Progress``, or with ``show``."""

    def __init__(self, stream: TextIO = sys.stdout, indent: str = "  ") -> None:
        self._stream = stream
        self._indent = indent
        self._live = stream.isatty()
        self._bar: tqdm[Any] | None = None
        self._phase: str | None = None

    def __call__(self, percent: int, step: Step | None = None, /) -> None:
        if step is not None:
            self.show(step)

    def show(self, step: Step) -> None:
        if not step.said:
            return
        if step.phase != self._phase:
            self._complete()  # the work moved on: the phase before is done
            self.close()
            self._phase = step.phase
            if self._live:
                from tqdm import tqdm

                # 80 x 24 where a terminal says 0 x 0 (tqdm would then draw nothing)
                columns, lines = shutil.get_terminal_size()
                self._bar = tqdm(
                    desc=f"{self._indent}{step.phase}",
                    total=step.total,
                    unit=step.unit,
                    bar_format=COUNTED if step.total is not None else UNCOUNTED,
                    file=self._stream,
                    ncols=columns,
                    nrows=lines,
                )
            else:
                count = f" ({step.total} {step.unit})" if step.total is not None else ""
                print(f"{self._indent}{step.phase}{count}", file=self._stream, flush=True)
        if self._bar is not None and step.done is not None:
            self._bar.update(step.done - self._bar.n)
        elif self._bar is not None:
            self._bar.refresh()  # an uncounted phase: its elapsed time

    def _complete(self) -> None:
        if self._bar is not None and self._bar.total is not None:
            self._bar.update(self._bar.total - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None
