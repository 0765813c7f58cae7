"""Progress on stderr for the slow steps of a command.

Library code marks its steps with :func:`repconv.util.step` (tracing and fusing, verifying, exporting,
simplifying, the ONNX Runtime check, ...); commands mark theirs (loading, saving) the same way. While
:func:`progress_display` is active, a step that has lasted over a second shows as one transient
spinner line with the steps' names and the time spent in the innermost one. Nothing is shown when
stderr is not a terminal, so pipes and logs stay clean.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from repconv.cli.errors import err_console
from repconv.util import report_steps, step

DELAY_S = 1.0


class _StepDisplay:
    def __init__(self, console: Console, delay: float) -> None:
        self._delay = delay
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=console, transient=True, redirect_stderr=False,
                                  redirect_stdout=Console().is_terminal)  # stdout printed above the spinner
        self._task = self._progress.add_task("", total=None)
        self._stack: list[str] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._shown = self._closed = False

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._stack.append(what)
        self._changed()
        try:
            yield
        finally:
            self._stack.pop()
            self._changed()

    def _changed(self) -> None:
        self._progress.reset(self._task, description=" › ".join(self._stack), visible=bool(self._stack))
        with self._lock:
            if self._shown or self._closed:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            if self._stack:  # shown once this step has lasted DELAY_S
                self._timer = threading.Timer(self._delay, self._show)
                self._timer.daemon = True
                self._timer.start()

    def _show(self) -> None:
        with self._lock:
            if not self._closed and not self._shown:
                self._progress.start()
                self._shown = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._shown:
                self._progress.stop()


@contextlib.contextmanager
def progress_display(console: Console | None = None, delay: float = DELAY_S) -> Iterator[None]:
    """Show the :func:`repconv.util.step` s run inside as a spinner on ``console`` (default stderr),
    only if it is a terminal and only for steps over ``delay`` seconds."""
    console = console or err_console
    if not console.is_terminal:
        yield
        return
    display = _StepDisplay(console, delay)
    try:
        with report_steps(display.step):
            yield
    finally:
        display.close()


class Announcer:
    """Turn one-line progress messages (``profile_model(progress=...)``) into steps: each message is
    the current step until the next one. Call :meth:`close` (or use it as a context manager) at the end."""

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._current: contextlib.AbstractContextManager[None] | None = None

    def __call__(self, message: str) -> None:
        self.close()
        self._current = step(f"{self._prefix}{message}")
        self._current.__enter__()

    def close(self) -> None:
        if self._current is not None:
            current, self._current = self._current, None
            current.__exit__(None, None, None)

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
