"""What every sub-command shares: model loading, input shapes, exit codes, atomic output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from repconv.io import ModelLoadError, infer_input_shape, load_model, parse_shape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class UsageFailure(click.ClickException):
    """Bad usage or input: one line on stderr, exit 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        err_console.print(f"[red]error:[/red] {escape(self.format_message())}")


class CheckFailure(click.ClickException):
    """A numerical check failed (verification, ORT comparison): exit 1, nothing written."""

    exit_code = EXIT_CHECK_FAILED

    def show(self, file: Any = None) -> None:
        err_console.print(f"[red]failed:[/red] {escape(self.format_message())}")


def model_options(f: F) -> F:
    """MODEL argument plus --weights / --allow-pickle / --input-shape."""
    f = click.option("--input-shape", "input_shape", default=None,
                     help="Input shape, e.g. 1,3,224,224 (default: inferred from the first layer).")(f)
    f = click.option("--allow-pickle", is_flag=True,
                     help="Allow loading a full pickled module (runs code from the file; only for trusted files).")(f)
    f = click.option("--weights", default=None, type=click.Path(dir_okay=False),
                     help="State-dict file for a 'package.module:factory' MODEL.")(f)
    f = click.argument("model")(f)
    return f


def load_model_or_exit(spec: str, weights: str | None, allow_pickle: bool) -> Any:
    try:
        return load_model(spec, weights=weights, allow_pickle=allow_pickle)
    except ModelLoadError as e:
        raise UsageFailure(str(e)) from None


def input_shape_or_exit(model: Any, text: str | None) -> tuple[tuple[int, ...], bool]:
    """(shape, inferred?)"""
    try:
        if text:
            return parse_shape(text), False
        return infer_input_shape(model), True
    except ModelLoadError as e:
        raise UsageFailure(str(e)) from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it over ``path`` only if the block succeeds.

    ``protect`` lists inputs that must never be overwritten (the model file itself)."""
    target = Path(path)
    for p in protect:
        with contextlib.suppress(OSError):
            if target.exists() and target.resolve() == Path(p).resolve():
                raise UsageFailure(f"refusing to overwrite the input {p}")
    if target.exists() and target.is_dir():
        raise UsageFailure(f"{target} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
