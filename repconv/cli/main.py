"""The ``repconv`` command: one group, each sub-command in its own module (imported on first use).

The CLI layer only parses arguments and prints; the work lives in the library. Errors, exit codes
and interrupts: :mod:`repconv.cli.errors`; the helpers every command shares: :mod:`repconv.cli.common`."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from repconv.cli.errors import RepconvGroup

# (module, attribute) of each sub-command; a module that is missing is simply not offered.
_COMMANDS = [
    ("repconv.cli.fuse_cmd", "fuse_command"),
    ("repconv.cli.fuse_cmd", "inspect_command"),
    ("repconv.cli.export_cmd", "export_command"),
    ("repconv.cli.quantize_cmd", "quantize_command"),
    ("repconv.cli.compare_cmd", "compare_command"),
    ("repconv.cli.profile_cmd", "profile_command"),
    ("repconv.cli.build_cmd", "build_native_command"),
]

EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 a numerical check failed (verification, ONNX Runtime vs PyTorch, "
                   "profile regression); 2 bad usage or input (nothing written); 3 internal error; "
                   "130 interrupted (143 on SIGTERM), nothing written.")


def _progress() -> contextlib.AbstractContextManager[Any]:
    from repconv.cli.progress import progress_display  # imports torch: only once a command runs

    return progress_display()


@click.group("repconv", cls=RepconvGroup, commands_from=_COMMANDS, wrap_invoke=_progress, epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repconv")
def main() -> None:
    """Fuse, verify, export and profile re-parameterizable PyTorch models."""


if __name__ == "__main__":  # `python -m repconv` also installs the signal handlers before torch is imported
    main(prog_name="repconv")
