"""What every sub-command shares: the small API a command is built from.

Errors (:mod:`repconv.cli.errors`) - raise, never print-and-exit:
    ``UsageFailure(msg)``  bad usage or input: one line ``error: msg``, exit 2, nothing written
    ``CheckFailure(msg)``  a numerical check failed (verification, ORT, regression): exit 1
    Anything else escaping a command is turned into one line too by the group (``RepconvGroup``):
    OSError -> 2, out of memory -> 2 (with the input's size, see :func:`example_input`), Ctrl-C -> 130,
    SIGTERM -> 143, other exceptions -> 3 (a bug). Click's own usage errors are one line, exit 2.

Options:
    ``@model_options``      MODEL, --weights, --allow-pickle, --input-shape, --dtype
    ``@no_clobber_option``  --no-clobber (refuse to replace an existing output)
    ``FiniteFloat(min=, max=, min_open=)``  a click type that rejects NaN / Inf and out-of-range values
    ``PositiveInt`` / ``NonNegativeInt``
    ``command_help(extra)`` the epilog with MODEL forms and exit codes for ``--help``

Model and input:
    ``load_model_or_exit(spec, weights, allow_pickle)``   (prints the --allow-pickle warning)
    ``input_shape_or_exit(module, text)`` -> ``(shape, note)``; ``note`` says what an inferred shape
        came from (None when given)
    ``apply_dtype(module, name)`` -> ``(module, dtype, note)``; ``example_input(shape, dtype)``

Outputs (:mod:`repconv.cli.outputs`): ``OutputPlan`` - plan every output before the work, write to
``.staged``, everything lands together at the end or nothing does. ``say_wrote`` prints its lines.

Progress (:mod:`repconv.cli.progress`): ``step("saving x")`` around slow work (library code uses
:func:`repconv.util.step` the same way); ``Announcer`` for callback-style progress messages.

Tables (:mod:`repconv.cli.tables`): ``print_table(table, keys=1)`` fits 80 columns without cutting numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from repconv.cli.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    CheckFailure,
    UsageFailure,
    err_console,
    print_error,
)
from repconv.cli.outputs import OutputPlan
from repconv.cli.progress import Announcer
from repconv.cli.tables import fit_table
from repconv.diagnose import describe_inputs, fmt_bytes, tensor_bytes
from repconv.io import ModelLoadError, guess_input_shape, load_model, parse_shape
from repconv.util import eval_mode, step

console = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "DTYPES", "EXIT_CHECK_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "Announcer",
    "CheckFailure", "FiniteFloat", "NonNegativeInt", "OutputPlan", "PositiveInt", "UsageFailure", "apply_dtype",
    "atomic_output", "check_input_size", "check_runs", "command_help", "console", "err_console", "example_input",
    "input_shape_or_exit", "load_model_or_exit", "model_options", "no_clobber_option", "prepare_model",
    "print_error", "print_table", "say_wrote", "step", "warn",
]

MODEL_FORMS = (
    "\b\nMODEL is one of:\n"
    "  net.pt      a torch.save(model) file: a pickle; loading it runs code\n"
    "              from the file, so it needs --allow-pickle\n"
    "  net.ts      a TorchScript file (torch.jit.save): no Python code runs\n"
    "  pkg.mod:fn  a function returning the module (the current directory is\n"
    "              importable); --weights W.pth loads a state dict into it")
EXIT_CODES = (
    "\b\nExit codes: 0 ok; 1 a numerical check failed; 2 bad usage or input;\n"
    "3 internal error; 130 interrupted (143: SIGTERM). Only 0 writes anything.")


def command_help(*extra: str) -> str:
    """A command's ``--help`` epilog: MODEL forms, the given paragraphs, exit codes."""
    return "\n\n".join([MODEL_FORMS, *extra, EXIT_CODES])


def warn(message: str) -> None:
    """One line ``warning: ...`` on stderr."""
    print_error("warning", message, style="yellow")


def print_table(table: Table, keys: int = 1, out: Console | None = None) -> None:
    """Print ``table`` within the terminal's width (numbers never cut; see repconv.cli.tables)."""
    target = out or console
    for t in fit_table(table, target.width, keys):
        target.print(t)


def say_wrote(message: str) -> None:
    """How an :class:`OutputPlan` reports each file it wrote or replaced."""
    console.print(escape(message))


# --------------------------------------------------------------------------- option types

class FiniteFloat(click.ParamType):
    """A float that is finite and within [min, max] (``min_open``: strictly above ``min``)."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False) -> None:
        self.min, self.max, self.min_open = min, max, min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float) and math.isfinite(value):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (number < self.min or (self.min_open and number == self.min)):
            self.fail(f"{value!r} must be {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        if self.max is not None and number > self.max:
            self.fail(f"{value!r} must be <= {self.max:g}", param, ctx)
        return number


class _BoundedInt(click.ParamType):
    name = "integer"

    def __init__(self, least: int, words: str) -> None:
        self.least, self.words = least, words

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if number < self.least:
            self.fail(f"{value!r} must be {self.words}", param, ctx)
        return number


PositiveInt = _BoundedInt(1, "positive")
NonNegativeInt = _BoundedInt(0, ">= 0")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_options(f: F) -> F:
    """MODEL argument plus --weights / --allow-pickle / --input-shape / --dtype."""
    f = click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                     help="Convert the model to this dtype and run it with inputs of it (default: the "
                          "model's own dtype).")(f)
    f = click.option("--input-shape", "input_shape", default=None,
                     help="Input shape, e.g. 1,3,224,224 (default: inferred from the first layer the model runs).")(f)
    f = click.option("--allow-pickle", is_flag=True,
                     help="Allow unpickling MODEL or --weights (runs code from the file; only for trusted files; "
                          "a warning says when it happens).")(f)
    f = click.option("--weights", default=None, type=click.Path(dir_okay=False),
                     help="State-dict file for a 'package.module:factory' MODEL.")(f)
    f = click.argument("model")(f)
    return f


def no_clobber_option(f: F) -> F:
    return click.option("--no-clobber", is_flag=True,
                        help="Refuse to replace an existing output file (default: replace it, and say so).")(f)


# --------------------------------------------------------------------------- model and input

def load_model_or_exit(spec: str, weights: str | None, allow_pickle: bool) -> Any:
    try:
        with step(f"loading {spec}"):
            return load_model(spec, weights=weights, allow_pickle=allow_pickle, on_unpickle=warn)
    except ModelLoadError as e:
        raise UsageFailure(str(e)) from None


def input_shape_or_exit(model: Any, text: str | None) -> tuple[tuple[int, ...], str | None]:
    """(shape, note): ``note`` says what an inferred shape was inferred from; None for a given shape."""
    try:
        if text:
            return parse_shape(text), None
        guess = guess_input_shape(model)
        shown = "x".join(map(str, guess.shape))
        return guess.shape, f"input shape {shown} {guess.describe()} (--input-shape to override)"
    except ModelLoadError as e:
        raise UsageFailure(str(e)) from None


def _own_dtype(module: Any) -> torch.dtype:
    dtypes = {p.dtype for p in list(module.parameters()) + list(module.buffers()) if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def apply_dtype(module: Any, name: str | None) -> tuple[Any, torch.dtype, str | None]:
    """``--dtype``: (module converted to it, the dtype inputs get, a note to print or None).
    Without ``--dtype``: the model as it is, inputs in its (single) floating dtype."""
    if name is None:
        dtype = _own_dtype(module)
        note = None if dtype == torch.float32 else f"running in {DTYPES_NAME[dtype]}, the model's dtype"
        return module, dtype, note
    dtype = DTYPES[name]
    if _own_dtype(module) == dtype and len({p.dtype for p in module.parameters() if p.is_floating_point()}) <= 1:
        return module, dtype, None
    return module.to(dtype), dtype, f"converted the model to {name} (--dtype)"


DTYPES_NAME = {v: k for k, v in DTYPES.items()}


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_input_size(shape: Sequence[int], dtype: torch.dtype, what: str = "input") -> None:
    """Refuse an input that would take over half of this machine's memory before allocating it (past
    that the kernel's OOM killer, not an exception, would end the process)."""
    need = tensor_bytes(shape, dtype)
    total = _memory_bytes()
    if total is not None and need > total // 2:
        raise UsageFailure(f"out of memory: {what} {tuple(shape)} {DTYPES_NAME.get(dtype, dtype)} needs "
                           f"{fmt_bytes(need)}, more than half of this machine's {fmt_bytes(total)}; "
                           "pass a smaller --input-shape")


def example_input(shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A seeded random input; its size is checked first and remembered for out-of-memory messages."""
    check_input_size(shape, dtype)
    try:
        x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    except RuntimeError as e:  # the allocator refused
        raise UsageFailure(f"out of memory allocating the input {tuple(shape)} {DTYPES_NAME.get(dtype, dtype)} "
                           f"({fmt_bytes(tensor_bytes(shape, dtype))}): pass a smaller --input-shape") from e
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta["repconv.input"] = describe_inputs([x])
    return x


def prepare_model(spec: str, weights: str | None, allow_pickle: bool, input_shape: str | None,
                  dtype: str | None, seed: int = 0) -> tuple[Any, torch.Tensor]:
    """The common start of a command: load MODEL, apply --dtype, resolve the input shape (printing
    what an inferred one came from), make the example input. Every failure is a UsageFailure."""
    module = load_model_or_exit(spec, weights, allow_pickle)
    module, dt, dtype_note = apply_dtype(module, dtype)
    if dtype_note:
        console.print(escape(dtype_note))
    shape, note = input_shape_or_exit(module, input_shape)
    if note:
        console.print(escape(note))
    return module, example_input(shape, dt, seed)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, protect: Sequence[str | os.PathLike[str] | None] = (),
                  option: str = "output", kind: str = "file", no_clobber: bool = False) -> Iterator[Path]:
    """One output, shorthand for an :class:`OutputPlan` of one file: yields the staged path, moved over
    ``path`` when the block succeeds. Prefer a plan made before the work (it checks paths up front)."""
    with OutputPlan(no_clobber=no_clobber, protect=protect) as plan:
        yield plan.file(path, option, kind).staged


def check_runs(module: Any, example: torch.Tensor) -> None:
    """Run the model once on ``example``; a failure is a UsageFailure naming its real cause (out of
    memory, dtype, shape, or the model's own exception: repconv.diagnose)."""
    from repconv.diagnose import describe_forward_failure

    with step("running the model once"), eval_mode(module), torch.no_grad():
        try:
            module(example.clone())
        except Exception as e:
            raise UsageFailure(describe_forward_failure(module, (example,), e)) from None
