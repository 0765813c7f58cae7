"""The ``repconv`` console script, and the signal handling every command runs under.

The handlers go in before anything else is imported, so Ctrl-C (SIGINT) or SIGTERM while torch is
still being imported exits 130 / 143 with one line instead of a KeyboardInterrupt traceback. A
signal also leaves a mark that outlives the exception: code that swallows KeyboardInterrupt (some
import machinery does) cannot make an interrupted command write its outputs (see
:meth:`repconv.cli.outputs.OutputPlan.commit`). This module imports nothing heavy on purpose."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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


def _exit_now(code: int, message: str | None = None) -> None:
    """Leave at once: after an interrupt, a half-imported torch must not run its exit handlers."""
    with contextlib.suppress(Exception):
        if message:
            sys.stderr.write(message)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run(argv: list[str] | None = None) -> None:
    """Entry point of ``repconv`` and ``python -m repconv.cli.main``."""
    code: object = 0
    with signal_handlers():
        try:
            from repconv.cli.main import main

            main(args=argv, prog_name="repconv")
        except KeyboardInterrupt as e:  # while importing, before the group's own handling
            terminated = isinstance(e, Terminated)
            _exit_now(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED,
                      f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: nothing written\n")
        except SystemExit as e:
            code = e.code
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        _exit_now(int(code))  # type: ignore[call-overload]
    sys.exit(code)


if __name__ == "__main__":
    run()
