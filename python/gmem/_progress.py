"""The progress bar the command's long steps draw on stderr (``gmem demo``, ``replay``,
``check-pfn`` and ``bench``): its own module, so that the command and the benchmarks do
not import each other."""

from __future__ import annotations

import shutil
import sys
import threading
import time


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal (with the elapsed time
    ticking while one long step runs), one line per step elsewhere."""

    active: Progress | None = None  # the one the main thread ticks while it waits

    def __init__(self, enabled: bool) -> None:
        Progress.active = self
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.state: tuple[int, int, str] | None = None
        self.detail = ""
        self.lock = threading.Lock()

    def __call__(self, done: int, total: int, label: str) -> None:
        with self.lock:
            self.state, self.detail = (done, total, label), ""
            self._draw(final=done == total, newline_elsewhere=True)

    def note(self, detail: str) -> None:
        """Say how far the current step is (shown on a terminal only)."""
        with self.lock:
            self.detail = detail
            self._draw(final=False, newline_elsewhere=False)

    def clear(self) -> None:
        """Blank the bar's line on a terminal, so that output can take its place."""
        with self.lock:
            if self.enabled and self.tty and self.state is not None:
                columns = shutil.get_terminal_size((80, 24)).columns
                sys.stderr.write("\r" + " " * (columns - 1) + "\r")
                sys.stderr.flush()

    def tick(self) -> None:
        """Redraw with the time now: called by the waiting main thread."""
        with self.lock:
            if self.state is not None and self.state[0] != self.state[1]:
                self._draw(final=False, newline_elsewhere=False)

    def _draw(self, final: bool, newline_elsewhere: bool) -> None:
        if not self.enabled or self.state is None or not (self.tty or newline_elsewhere):
            return
        done, total, label = self.state
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        detail = f" {self.detail}" if self.detail and self.tty else ""
        line = f"[{bar}] {done}/{total} {label}{detail} ({time.perf_counter() - self.t0:.1f} s)"
        if self.tty:
            columns = shutil.get_terminal_size((80, 24)).columns
            sys.stderr.write(
                "\r" + line[: columns - 1].ljust(columns - 1) + ("\n" if final else "")
            )
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for captions."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu
