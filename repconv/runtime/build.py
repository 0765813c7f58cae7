"""Build the native ONNX Runtime custom-op library (``ai.repconv::Involution``).

``python -m repconv.runtime.build [--force] [--verbose]`` or ``repconv build-native``.

* Headers: the onnxruntime pip wheel ships none. Looked up in order: ``$ORT_INCLUDE_DIR``, the
  private deps folder (``$REPCONV_DEPS_DIR`` or ``<repo>/.deps``), the system include dirs; if absent
  they are fetched from Debian's ``libonnxruntime-dev`` (trixie) with ``apt-get download`` against a
  private apt configuration (the system's sources and state are not touched) and unpacked with
  ``dpkg -x`` into the deps folder. Only the C API header is used, and only API version 17 features,
  so the headers' ORT version need not match the installed runtime's.
* Library: never linked against libonnxruntime (ORT passes its API table to ``RegisterCustomOps``).
  Compiled with the portable baseline ``-march=x86-64-v2``; the hot loop carries AVX2 and AVX-512
  variants chosen at load time. Output: ``repconv/runtime/_build/libreponnx_ops.so`` (or
  ``$REPCONV_NATIVE_BUILD_DIR``) plus a stamp with the source fingerprint, so a library built from
  other sources is never picked up.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "BuildError",
    "LIB_NAME",
    "build",
    "build_dir",
    "deps_dir",
    "fetch_ort_headers",
    "find_ort_headers",
    "library_path",
    "source_fingerprint",
]

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR / "csrc"
SOURCES = (CSRC / "involution_op.cc",)
EXPORTS_MAP = CSRC / "exports.map"
HEADER = "onnxruntime_c_api.h"
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEV_PACKAGE = "libonnxruntime-dev"

if sys.platform == "darwin":
    LIB_NAME = "libreponnx_ops.dylib"
elif sys.platform == "win32":
    LIB_NAME = "reponnx_ops.dll"
else:
    LIB_NAME = "libreponnx_ops.so"


class BuildError(RuntimeError):
    """The native library could not be built; the message says what to do."""


def _source_checkout() -> Path | None:
    root = PACKAGE_DIR.parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repconv"


def build_dir() -> Path:
    """``$REPCONV_NATIVE_BUILD_DIR``, else ``repconv/runtime/_build`` (a user cache dir when the
    installed package is read-only)."""
    env = os.environ.get("REPCONV_NATIVE_BUILD_DIR")
    if env:
        return Path(env)
    if _source_checkout() is not None or os.access(PACKAGE_DIR, os.W_OK):
        return PACKAGE_DIR / "_build"
    return _user_cache() / "native"


def deps_dir() -> Path:
    """Where fetched headers go: ``$REPCONV_DEPS_DIR``, else ``.deps/`` at the repository root of a
    source checkout, else a user cache dir."""
    env = os.environ.get("REPCONV_DEPS_DIR")
    if env:
        return Path(env)
    root = _source_checkout()
    return root / ".deps" if root is not None else _user_cache() / "deps"


def library_path() -> Path:
    return build_dir() / LIB_NAME


def _compile_flags() -> list[str]:
    flags = ["-std=c++17", "-O3", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden"]
    flags += ["-Wall", "-Wextra", "-Wno-psabi"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=x86-64-v2")  # portable baseline; faster variants are dispatched at runtime
    if sys.platform == "darwin":
        flags += ["-Wl,-exported_symbol,_RegisterCustomOps", "-Wl,-exported_symbol,_repconv_involution_f32",
                  "-DREPCONV_NO_MULTIVERSION"]
    else:
        flags.append(f"-Wl,--version-script={EXPORTS_MAP}")  # export RegisterCustomOps only
    return flags


def source_fingerprint() -> str:
    """Hash of the sources, the export map and the flags: a stamp mismatch means rebuild."""
    h = hashlib.sha256()
    for path in (*SOURCES, EXPORTS_MAP):
        h.update(path.read_bytes())
    h.update(" ".join(_compile_flags()).encode())
    return h.hexdigest()[:32]


def _stamp_path() -> Path:
    return build_dir() / (LIB_NAME + ".stamp")


def is_current(path: Path | None = None) -> bool:
    """True when the library exists and was built from the current sources."""
    path = path or library_path()
    stamp = _stamp_path()
    try:
        return path.is_file() and stamp.read_text().strip() == source_fingerprint()
    except OSError:
        return False


def _has_header(d: Path) -> Path | None:
    for cand in (d, d / "onnxruntime", d / "onnxruntime" / "core" / "session"):
        if (cand / HEADER).is_file():
            return cand
    return None


def find_ort_headers(*, fetch: bool = False, verbose: bool = False) -> Path:
    """Directory containing ``onnxruntime_c_api.h`` (fetching it when allowed); BuildError otherwise."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        found = _has_header(Path(env))
        if found is None:
            raise BuildError(f"ORT_INCLUDE_DIR={env} does not contain {HEADER}")
        return found
    candidates = [deps_dir() / "onnxruntime-dev" / "usr" / "include", Path("/usr/include"), Path("/usr/local/include")]
    for cand in candidates:
        found = _has_header(cand)
        if found is not None:
            return found
    if not fetch:
        raise BuildError(
            f"ONNX Runtime C API headers not found (looked in {', '.join(map(str, candidates))}); "
            "set ORT_INCLUDE_DIR or run `python -m repconv.runtime.build` to fetch them"
        )
    return fetch_ort_headers(verbose=verbose)


def fetch_ort_headers(dest: Path | None = None, *, verbose: bool = False) -> Path:
    """Fetch Debian trixie's ``libonnxruntime-dev`` into ``dest`` with a private apt configuration.

    Nothing under /etc/apt or /var/lib/apt is read for sources or written: apt gets its own sources
    list, lists, cache and an empty preferences dir, all inside ``dest``.
    """
    dest = dest or deps_dir()
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BuildError(
            "cannot fetch ONNX Runtime headers: apt-get/dpkg not available (not Debian/Ubuntu). "
            "Download onnxruntime_c_api.h (release matching API >= 17) and set ORT_INCLUDE_DIR"
        )
    if not DEBIAN_KEYRING.is_file():
        raise BuildError(f"cannot verify Debian archives: {DEBIAN_KEYRING} missing; set ORT_INCLUDE_DIR")
    apt = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    sources = apt / "etc" / "sources.list"
    sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    opts = [
        f"-oDir::Etc::SourceList={sources}",
        f"-oDir::Etc::SourceParts={apt / 'etc' / 'sources.list.d'}",
        f"-oDir::Etc::Preferences={apt / 'etc' / 'preferences'}",
        f"-oDir::Etc::PreferencesParts={apt / 'etc' / 'preferences.d'}",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::State::Status={apt / 'status'}",
        f"-oDir::Cache={apt / 'cache'}",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=",
        "-oAcquire::Languages=none",
        "-qq",
    ]
    (apt / "status").touch()
    _run(["apt-get", *opts, "update"], verbose=verbose, what="apt-get update (private trixie sources)")
    debs_dir = apt / "debs"
    for old in debs_dir.glob("*.deb"):
        old.unlink()
    _run(["apt-get", *opts, "download", DEV_PACKAGE], verbose=verbose, cwd=debs_dir,
         what=f"apt-get download {DEV_PACKAGE}")
    debs = sorted(debs_dir.glob(f"{DEV_PACKAGE}_*.deb"))
    if not debs:
        raise BuildError(f"apt-get download produced no {DEV_PACKAGE} package")
    target = dest / "onnxruntime-dev"
    if target.exists():
        shutil.rmtree(target)
    _run(["dpkg", "-x", str(debs[-1]), str(target)], verbose=verbose, what="dpkg -x")
    found = _has_header(target / "usr" / "include")
    if found is None:
        raise BuildError(f"{debs[-1].name} did not contain {HEADER}")
    return found


def _run(cmd: list[str], *, verbose: bool, what: str, cwd: Path | None = None) -> None:
    if verbose:
        print("+", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    if verbose and proc.stderr.strip():
        print(proc.stderr.strip(), file=sys.stderr)


def _compiler(cxx: str | None) -> str:
    for cand in (cxx, os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    raise BuildError("no C++ compiler found (tried $CXX, c++, g++, clang++); install g++ or set CXX")


def build(*, force: bool = False, fetch: bool = True, cxx: str | None = None, verbose: bool = False) -> Path:
    """Compile the library if it is missing or stale; return its path. Raises BuildError."""
    if sys.platform == "win32":
        raise BuildError("building the native library on Windows is not supported; the ONNX function fallback works")
    out = library_path()
    if not force and is_current(out):
        return out
    include = find_ort_headers(fetch=fetch, verbose=verbose)
    compiler = _compiler(cxx)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=LIB_NAME + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [compiler, *_compile_flags(), f"-I{include}", *map(str, SOURCES), "-o", str(tmp)]
        _run(cmd, verbose=verbose, what="compiling the native library")
        os.chmod(tmp, 0o755)  # mkstemp created it 0600
        os.replace(tmp, out)  # atomic: a concurrent reader sees the old or the new library, never half
    finally:
        tmp.unlink(missing_ok=True)
    _stamp_path().write_text(source_fingerprint() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repconv.runtime.build", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the library is current")
    parser.add_argument("--no-fetch", action="store_true", help="do not download headers; fail if absent")
    parser.add_argument("--cxx", default=None, help="C++ compiler (default: $CXX, c++, g++, clang++)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force, fetch=not args.no_fetch, cxx=args.cxx, verbose=args.verbose)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
