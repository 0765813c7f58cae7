"""``repconv build-native``: compile the native ONNX Runtime kernel library (ai.repconv::Involution)."""

from __future__ import annotations

import click


@click.command("build-native")
@click.option("--force", is_flag=True, help="Rebuild even if the library is up to date.")
@click.option("--no-fetch", is_flag=True, help="Do not download ONNX Runtime headers; fail if they are absent.")
@click.option("--cxx", default=None, help="C++ compiler (default: $CXX, c++, g++, clang++).")
@click.option("-v", "--verbose", is_flag=True, help="Show the commands run.")
def build_native_command(force: bool, no_fetch: bool, cxx: str | None, verbose: bool) -> None:
    """Build the native ONNX Runtime kernels so exported models run the fast Involution kernel.

    Headers come from $ORT_INCLUDE_DIR, ./.deps, the system, or are fetched from Debian's
    libonnxruntime-dev (trixie) into ./.deps with a private apt configuration.
    """
    from repconv.cli.common import UsageFailure, console, step
    from repconv.runtime.build import BuildError, build

    try:
        with step("building the native kernel"):
            path = build(force=force, fetch=not no_fetch, cxx=cxx, verbose=verbose)
    except BuildError as e:  # missing headers / compiler: the environment, not a numerical check
        raise UsageFailure(str(e)) from None
    console.print(f"native library: {path}")
    console.print("ONNX Runtime sessions from repconv.runtime.session_options() now use it.")
