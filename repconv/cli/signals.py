"""Signals every command runs under: SIGINT raises KeyboardInterrupt, SIGTERM :class:`Terminated`.

A signal also leaves a mark that outlives the exception: code that swallows KeyboardInterrupt (some
import machinery does) cannot make an interrupted command write its outputs (see
:meth:`repconv.cli.outputs.OutputPlan.commit`). Standard library only: the console script installs
these handlers before torch is imported."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
_seen: list[int] = []
_depth = [0]  # nested signal_handlers() (the script, then the group): only the outermost resets


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` (temp-file clean-up) runs."""


def _on_signal(signum: int, frame: object) -> None:
    _seen.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def interrupt_seen() -> KeyboardInterrupt | None:
    """The interrupt received since the handlers went in (even if something swallowed it), or None."""
    if not _seen:
        return None
    return Terminated() if _seen[-1] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def signal_handlers() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`, both remembered, while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0] == 0:
        _seen.clear()
    _depth[0] += 1
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _depth[0] -= 1
