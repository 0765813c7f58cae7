"""The ``repconv`` command: one group, each sub-command in its own module.

The CLI layer only parses arguments and prints; the work lives in the library."""

from __future__ import annotations

import importlib

import click

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repconv")
def main() -> None:
    """Fuse, verify, export and profile re-parameterizable PyTorch models."""


for _mod, _attr in _COMMANDS:
    try:
        main.add_command(getattr(importlib.import_module(_mod), _attr))
    except ModuleNotFoundError as _e:  # an optional sub-command module that is not there
        if _e.name != _mod:
            raise

if __name__ == "__main__":
    main()
