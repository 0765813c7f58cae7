"""The ``repconv`` console script: Ctrl-C / SIGTERM handled from the first statement.

Nothing is imported before the handlers are in place, so an interrupt while torch is still being
imported exits 130 (143 for SIGTERM) with one line instead of a KeyboardInterrupt traceback."""

from __future__ import annotations

import signal
import sys


class _Terminated(KeyboardInterrupt):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def run(argv: list[str] | None = None) -> None:
    """Entry point of ``repconv`` and ``python -m repconv.cli.main``."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from repconv.cli.main import main
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        sys.stderr.write(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: nothing written\n")
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    main(args=argv, prog_name="repconv")


if __name__ == "__main__":
    run()
