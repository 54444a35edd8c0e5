"""Long steps say where they are: the step, its duration, and what failed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints steps as they start and end; on a terminal also a live detail line.

    Not on a terminal (CI, a pipe) it stays plain: one line per step, no
    carriage returns, no per-phase chatter.
    """

    def __init__(self, stream: TextIO, interactive: bool) -> None:
        self.stream = stream
        self.interactive = interactive
        self._step = ""
        self._started = 0.0
        self._detail_shown = False
        # Every step that ended well, with its seconds, in order.
        self.finished: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._step, self._started = name, time.monotonic()
        self._print(f"==> {name}")
        try:
            yield
        except BaseException:
            self._clear_detail()
            self._print(f"==> {name}: failed after {time.monotonic() - self._started:.0f}s")
            raise
        self._clear_detail()
        seconds = time.monotonic() - self._started
        self.finished.append((name, seconds))
        self._print(f"==> {name}: done in {seconds:.1f}s")

    def detail(self, text: str) -> None:
        """Where a step is now (a DIB phase, a percentage); shown only on a terminal."""
        if not self.interactive:
            return
        elapsed = time.monotonic() - self._started
        line = f"    {elapsed:5.0f}s {text}"[:100]
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._detail_shown = True

    def note(self, text: str) -> None:
        self._clear_detail()
        self._print(f"    {text}")

    def _clear_detail(self) -> None:
        if self._detail_shown:
            self.stream.write("\r\x1b[K")
            self._detail_shown = False

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
