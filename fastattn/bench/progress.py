"""A progress bar on stderr, kept apart from the markdown on stdout.

On a terminal the bar is redrawn in place (``[#####.....] 12/40 fwd f32 B16 ... sdpa-math``) and
cleared before anything else is printed; otherwise (a log file, a pipe) it prints one line each
time another tenth of the sweep starts.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

WIDTH = 24


class Progress:
    """Counts `total` steps; step(label) announces the next one."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._shown = False
        self._tenth = -1

    def step(self, label: str) -> None:
        self.done += 1
        filled = WIDTH * (self.done - 1) // self.total
        line = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} {label}"
        if self.live:
            columns = shutil.get_terminal_size().columns
            self.stream.write("\r\033[K" + line[: columns - 1])
            self._shown = True
        elif (tenth := 10 * (self.done - 1) // self.total) > self._tenth:
            self._tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar (on a terminal) so other output starts on a clean line."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
