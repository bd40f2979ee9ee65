"""Progress on stderr: bars on a terminal; plain lines when stderr is a log or a pipe, where nested bars would
leave carriage returns, escape codes and repeated lines. Summaries go to stdout in both cases."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

# Plain lines report the steps at each tenth of the run (a 50-step run: every 5 steps).
_PLAIN_STEP_FRACTIONS = 10


def count(number: int, noun: str) -> str:
    """``1 particle``, ``2 particles``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (closed or odd streams count as not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """Progress over a command's images and the sampler steps of each.

    Use as a context manager; :meth:`attach` makes a pipeline report its steps here, :meth:`start` and
    :meth:`finish` frame each image, :meth:`write` prints a line without breaking a bar."""

    def __init__(self, total: int, stream: Optional[TextIO] = None):
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.terminal = is_terminal(self.stream)
        self._bar = None
        self._label, self._source = "", ""

    def __enter__(self) -> "Progress":
        if self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc="images", unit="image", file=self.stream)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()

    def attach(self, pipe) -> None:
        """Makes ``pipe`` (a diffusers pipeline) report its sampler steps: a bar nested under the bar over
        images on a terminal, plain lines otherwise."""
        if self.terminal:
            pipe.set_progress_bar_config(desc="steps", leave=False, file=self.stream)
        else:
            # diffusers' pipelines get their step loop from self.progress_bar(iterable=None, total=None).
            pipe.progress_bar = lambda iterable=None, total=None: PlainSteps(self._print_step, iterable, total)

    def start(self, number: int, source: Any) -> None:
        """Image ``number`` (from 1), read from ``source``, is next."""
        self._label = f"image {number}/{self.total}"
        self._source = source

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def write(self, line: str, file: TextIO) -> None:
        """Prints ``line`` to ``file``; on a terminal above the bars, which are redrawn below it."""
        if self._bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def _print_step(self, done: int, total: int) -> None:
        print(f"{self._label}, step {done}/{total} ({self._source})", file=self.stream, flush=True)


class PlainSteps:
    """Stands in for the tqdm bar a diffusers pipeline runs its steps in (as an iterable wrapper, or as a context
    manager with ``update``), calling ``report(done, total)`` at each tenth of the steps and at the last."""

    def __init__(self, report: Callable[[int, int], None], iterable: Optional[Iterable] = None,
                 total: Optional[int] = None):
        if iterable is None and total is None:
            raise ValueError("Either `total` or `iterable` has to be defined.")
        self._report = report
        self._iterable = iterable
        self.total = len(iterable) if total is None else total
        self.done = 0

    def __iter__(self) -> Iterator:
        for item in self._iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        before = self.done
        self.done += n
        if self.total > 0 and (
            self.done >= self.total
            or self.done * _PLAIN_STEP_FRACTIONS // self.total > before * _PLAIN_STEP_FRACTIONS // self.total
        ):
            self._report(self.done, self.total)

    def __enter__(self) -> "PlainSteps":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def close(self) -> None:
        pass
