"""Progress of long stages, reported to any number of sinks: a terminal, a run log.

A stage takes a :class:`Progress` and opens one task per unit of work it can count::

    with progress.task("explain 3|pos", total=96, unit="candidate") as task:
        for ...:
            task.advance(1)
    with progress.task("simulator stage 1", total=120, unit="step") as task:
        task.advance(1, info=f"loss {loss:.3f}")

The stages know nothing about where it goes. :class:`TerminalSink` draws a tqdm bar on a
terminal and writes a plain line at a bounded rate when stderr is not one (CI logs stay
readable); the Dagster run log sink lives in ``defs/`` (a ``context.log.info`` at a bounded
rate). ``Progress()`` without sinks is silent.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterator, Protocol, Sequence


class Progress:
    """What a stage reports to: tasks with a count, and notes (one line of text)."""

    def __init__(self, sinks: Sequence["Sink"] = ()):
        self.sinks = tuple(sinks)

    @contextmanager
    def task(self, label: str, total: int | None, unit: str = "it") -> Iterator["Task"]:
        """A counted piece of work; it reports its end when the block exits, also on error."""
        task = self.start(label, total, unit)
        try:
            yield task
        finally:
            task.finish()

    def start(self, label: str, total: int | None, unit: str = "it") -> "Task":
        """A task outside a ``with`` block; call its ``finish()``."""
        task = Task(self, label, total, unit)
        for sink in self.sinks:
            sink.started(task)
        return task

    def note(self, text: str) -> None:
        for sink in self.sinks:
            sink.note(text)


SILENT = Progress()


@dataclass(eq=False)
class Task:
    progress: Progress
    label: str
    total: int | None
    unit: str
    done: int = 0
    info: str = ""  # the latest extra, e.g. "loss 0.412"
    started_at: float = field(default_factory=time.monotonic)
    finished: bool = False

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        for sink in self.progress.sinks:
            sink.updated(self)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            for sink in self.progress.sinks:
                sink.updated(self)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """`explain 3|pos: 48/96 candidates (50%), 12.3/s, loss 0.41` (a counter without a total)."""
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        state = f" done in {self.seconds:.1f} s" if self.finished else f", {self.rate:.3g}/s"
        info = f", {self.info}" if self.info else ""
        return f"{self.label}: {count} {plural(self.unit)}{share}{state}{info}"


class Sink(Protocol):
    def started(self, task: Task) -> None: ...

    def updated(self, task: Task) -> None:
        """After every advance, and once more with ``task.finished`` set."""

    def note(self, text: str) -> None: ...


class LineSink:
    """One line per task at its start, then at most every ``interval`` seconds, then at its end."""

    def __init__(self, write, interval: float = 10.0):
        self.write = write
        self.interval = interval
        self._last: dict[int, float] = {}

    def started(self, task: Task) -> None:
        self._last[id(task)] = time.monotonic()
        self.write(f"{task.label}: {task.total if task.total else 'counting'} {plural(task.unit)}")

    def updated(self, task: Task) -> None:
        now = time.monotonic()
        if task.finished:
            self._last.pop(id(task), None)
            self.write(task.line())
        elif now - self._last.get(id(task), 0.0) >= self.interval:
            self._last[id(task)] = now
            self.write(task.line())

    def note(self, text: str) -> None:
        self.write(text)


class TerminalSink:
    """A tqdm bar per task on a terminal; plain lines at a bounded rate otherwise."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 10.0, bars: bool | None = None):
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self.lines = LineSink(lambda text: print(text, file=self.stream, flush=True), interval)
        self._bars: dict[int, object] = {}

    def started(self, task: Task) -> None:
        if not self.bars:
            return self.lines.started(task)
        from tqdm.auto import tqdm

        self._bars[id(task)] = tqdm(total=task.total, desc=task.label, unit=task.unit, file=self.stream,
                                    dynamic_ncols=True)

    def updated(self, task: Task) -> None:
        if not self.bars:
            return self.lines.updated(task)
        bar = self._bars.get(id(task))
        if bar is None:
            return
        bar.n = task.done
        if task.info:
            bar.set_postfix_str(task.info, refresh=False)
        if task.finished:
            bar.refresh()
            bar.close()
            del self._bars[id(task)]
        else:
            bar.update(0)  # redraws at tqdm's own bounded rate

    def note(self, text: str) -> None:
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.lines.note(text)


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
