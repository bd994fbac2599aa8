"""The progress bar of long work (``vafunc predict`` over many images, curvature's products over batches)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, *, label: str = "predict", stream=None, enabled: bool = True, unit: str = "images"):
        self.total, self.done, self.label, self.unit = total, 0, label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        bar = f"[{'#' * filled}{'.' * (width - filled)}]"
        line = f"{self.label} {bar} {self.done}/{self.total} {self.unit} ({rate:.1f}/s)"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
