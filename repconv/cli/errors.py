"""The CLI's one error path: every failure is one line on stderr and an exit code that means one thing.

===  ==========================================================================================
0    ok
1    a numerical check failed: verification, ONNX Runtime vs PyTorch, a profile regression
2    bad usage or input: options, model files, shapes, output paths (including OS errors on
     them), out of memory for the given input
3    internal error: a bug in repconv (``REPCONV_DEBUG=1`` prints its traceback)
130  interrupted (Ctrl-C / SIGINT); 143 terminated (SIGTERM)
===  ==========================================================================================

Whatever the exit code, a command that did not succeed leaves no output behind (see
:mod:`repconv.cli.outputs`). This module imports no torch, so ``repconv`` can catch Ctrl-C from the
first moment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from repconv.cli.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, interrupt_seen, signal_handlers

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "interrupt_seen"]  # re-exported

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def print_error(prefix: str, message: str, style: str = "red") -> None:
    err_console.print(f"[{style}]{prefix}:[/{style}] {escape(one_line(message))}")


class UsageFailure(click.ClickException):
    """Bad usage or input: ``error: <message>`` on stderr, exit 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        print_error("error", self.format_message())


class CheckFailure(click.ClickException):
    """A numerical check failed (verification, ORT comparison, regression): ``failed: <message>``, exit 1."""

    exit_code = EXIT_CHECK_FAILED

    def show(self, file: Any = None) -> None:
        print_error("failed", self.format_message())


class InternalFailure(click.ClickException):
    """An exception nobody classified: a bug. One line (the traceback with REPCONV_DEBUG=1), exit 3."""

    exit_code = EXIT_INTERNAL

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}")

    def show(self, file: Any = None) -> None:
        if os.environ.get("REPCONV_DEBUG"):
            traceback.print_exception(self.error, file=sys.stderr)
        print_error("internal error", f"{self.format_message()[:300]} (a bug in repconv: please report it; "
                                      "REPCONV_DEBUG=1 shows the traceback)")


# Set by repconv.cli.outputs once a command's outputs are in place: an interrupt after that point
# must not claim that nothing was written.
_outputs_committed = threading.Event()


def mark_outputs_committed() -> None:
    _outputs_committed.set()


class Interrupted(click.ClickException):
    def __init__(self, error: KeyboardInterrupt) -> None:
        self.terminated = isinstance(error, Terminated)
        self.exit_code = EXIT_TERMINATED if self.terminated else EXIT_INTERRUPTED
        super().__init__("terminated (SIGTERM)" if self.terminated else "interrupted")

    def show(self, file: Any = None) -> None:
        tail = "its outputs were already written" if _outputs_committed.is_set() else "nothing written"
        print_error(self.format_message(), tail, style="yellow")


def os_error_message(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n]
    return f"{' -> '.join(names)}: {what}" if names else what


def as_failure(e: Exception, ctx: click.Context | None = None) -> click.ClickException:
    """The exit-code class of an exception that escaped a command."""
    if isinstance(e, OSError):
        return UsageFailure(os_error_message(e))
    if "torch" in sys.modules:
        from repconv.diagnose import is_out_of_memory, out_of_memory_message

        if is_out_of_memory(e):
            given = ctx.meta.get("repconv.input") if ctx is not None else None
            return UsageFailure(out_of_memory_message(given or "given"))
    return InternalFailure(e)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back (they arrive afterwards) while files are moved into place or removed."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """The working directory first on sys.path, as ``python -m`` has it (the ``repconv`` script has
    its bin folder there instead): ``mynets:factory`` and pickled ``mynets.Net`` then import."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


class RepconvGroup(click.Group):
    """A click group with the one error path of this module, and sub-commands imported on first use.

    ``commands_from`` lists ``(module, attribute)`` pairs; a module that does not exist is simply not
    offered (an optional command), any other import error is a real failure."""

    def __init__(self, *args: Any, commands_from: Sequence[tuple[str, str]] = (),
                 wrap_invoke: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = list(commands_from)
        self._loaded = False
        self._wrap_invoke = wrap_invoke

    def _load(self) -> None:
        if self._loaded:
            return
        import importlib

        for mod, attr in self._lazy:
            try:
                self.add_command(getattr(importlib.import_module(mod), attr))
            except ModuleNotFoundError as e:
                if e.name != mod:
                    raise
        self._loaded = True

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return list(self.commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with self._wrap_invoke() if self._wrap_invoke else contextlib.nullcontext():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as e:
            raise Interrupted(e) from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise  # click quiets a closed pipe itself
            raise as_failure(e, ctx) from None
        except Exception as e:
            raise as_failure(e, ctx) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _outputs_committed.clear()
        try:
            with signal_handlers(), cwd_importable():
                self._load()  # imports torch: under the handlers, so Ctrl-C here is a clean exit 130
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as e:  # every other way out: one line and its exit code
            sys.exit(_report(e))
        late = interrupt_seen()
        if late is not None:  # an interrupt that something swallowed: still an interrupted command
            sys.exit(_report(late))
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def _report(e: BaseException) -> int:
    """Print ``e`` as one line; its exit code. An interrupt seen at any point wins over what followed
    it (an import it broke, say)."""
    late = interrupt_seen()
    if late is not None or isinstance(e, KeyboardInterrupt | click.Abort):
        cause = late if late is not None else e if isinstance(e, KeyboardInterrupt) else e.__cause__
        failure: click.ClickException = Interrupted(cause if isinstance(cause, KeyboardInterrupt)
                                                    else KeyboardInterrupt())
    elif isinstance(e, click.exceptions.NoArgsIsHelpError):
        e.show()
        return e.exit_code
    elif isinstance(e, click.UsageError):
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        print_error("error", f"{e.format_message()}{hint}")
        return e.exit_code
    elif isinstance(e, click.exceptions.Exit):
        return e.exit_code
    elif isinstance(e, click.ClickException):
        failure = e
    elif isinstance(e, Exception):  # outside a command (importing the commands): still one line
        failure = as_failure(e)
    else:
        raise e
    failure.show()
    return failure.exit_code
