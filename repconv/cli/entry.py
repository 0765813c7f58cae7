"""The ``repconv`` console script (also ``python -m repconv``).

The signal handlers go in before anything else is imported, so Ctrl-C (SIGINT) or SIGTERM while torch
is still being imported exits 130 / 143 with one line instead of a KeyboardInterrupt traceback. This
module imports nothing heavy on purpose."""

from __future__ import annotations

import contextlib
import os
import sys

from repconv.cli.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, signal_handlers


def _exit_now(code: int, message: str | None = None) -> None:
    """Leave at once: after an interrupt, a half-imported torch must not run its exit handlers."""
    with contextlib.suppress(Exception):
        if message:
            sys.stderr.write(message)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run(argv: list[str] | None = None) -> None:
    """Entry point of ``repconv`` and ``python -m repconv``."""
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
