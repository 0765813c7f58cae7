"""Deployment bundles: a folder to copy to the target device and benchmark there without repconv.

Layout written by :func:`write_bundle`::

    DIR/
      model.onnx            the model (or one <variant>.onnx per variant when several are given)
      bundle.json           manifest: input shape, batch sizes, timing defaults, models
      benchmark.py          standalone benchmark (numpy + onnxruntime only), same JSON schema as
      repconv_stats.py      ``repconv profile --json``; the two helper modules are copied verbatim
      repconv_portable.py   from repconv/profile/ so statistics are computed identically
      native/               C++ source and build files of repconv's ONNX Runtime custom op
      README.md             step-by-step instructions
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import string
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from repconv.profile.core import DEFAULT_SECONDS, DEFAULT_WARMUP

_HERE = Path(__file__).resolve().parent
TEMPLATE_DIR = _HERE / "bundle_template"
RUNTIME_DIR = _HERE.parent / "runtime"
# What of repconv/runtime/ is needed to build the native op library on the device.
# build.py is repconv.runtime's standalone (stdlib-only) build script; it finds csrc/ beside itself.
_NATIVE_PATTERNS = ("build.py", "CMakeLists.txt", "*.cmake", "Makefile", "build*.sh", "*.cc", "*.cpp", "*.h", "*.hpp",
                    "*.map")


# benchmark.py runs ONNX Runtime (with repconv's native kernel when built on the device), so a bundle
# carries the onnxruntime form of the model whatever target the user's own file is for
BUNDLE_TARGET = "onnxruntime"


class BundleError(ValueError):
    """The bundle cannot be written as asked: one line for the user."""


def native_sources(runtime_dir: Path = RUNTIME_DIR) -> list[tuple[Path, Path]]:
    """(source file, path inside native/) for the custom op's C++ source and build script."""
    found: list[tuple[Path, Path]] = []
    if not runtime_dir.is_dir():
        return found
    for pattern in _NATIVE_PATTERNS:
        for p in sorted(runtime_dir.rglob(pattern)):
            rel = p.relative_to(runtime_dir)
            if p.is_file() and not any(part.startswith((".", "_", "build")) for part in rel.parts[:-1]):
                found.append((p, rel))
    return sorted(set(found), key=lambda t: str(t[1]))


def _uses_custom_domain(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(n.domain == "ai.repconv" for n in proto.graph.node) or any(
        f.domain == "ai.repconv" for f in proto.functions)


def _check_input(path: Path, input_shape: Sequence[int], batch_sizes: Sequence[int]) -> None:
    from repconv.profile.runtimes import ProfileError, onnx_input

    try:
        _, dims = onnx_input(path)
    except ProfileError as e:
        raise BundleError(str(e)) from None
    if len(dims) != len(input_shape):
        raise BundleError(f"{path}: input has rank {len(dims)}, input shape {tuple(input_shape)} has "
                          f"rank {len(input_shape)}")
    for i, (d, s) in enumerate(zip(dims, input_shape, strict=True)):
        if i > 0 and isinstance(d, int) and d != s:
            raise BundleError(f"{path}: input dimension {i} is {d}, input_shape says {s}")
    if isinstance(dims[0], int) and any(b != dims[0] for b in batch_sizes):
        raise BundleError(f"{path}: batch dimension is fixed to {dims[0]}; batch sizes {list(batch_sizes)} "
                          "need a model exported with a dynamic batch dimension")


def write_bundle(
    onnx_path: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] | None = None,
    model_name: str | None = None,
    variant: str = "fused",
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = DEFAULT_SECONDS,
    macs: int | Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a self-contained benchmark folder for ``onnx_path`` at ``out_dir``; return ``out_dir``.

    ``onnx_path`` is one ONNX file (labelled ``variant``) or a mapping variant -> file, the first
    being the reference of the on-device ratios. The folder is assembled beside ``out_dir`` and
    renamed into place, so a failure leaves nothing half-written; an existing bundle is replaced
    only with ``overwrite``, and a folder that is not a bundle never."""
    files = {variant: Path(onnx_path)} if not isinstance(onnx_path, Mapping) else {
        str(k): Path(v) for k, v in onnx_path.items()}
    if not files:
        raise BundleError("no ONNX model given")
    shape = [int(d) for d in input_shape]
    if not shape or any(d <= 0 for d in shape):
        raise BundleError(f"input shape {tuple(input_shape)} must have positive dimensions")
    sizes = [int(b) for b in (batch_sizes if batch_sizes is not None else [shape[0]])]
    if not sizes or any(b <= 0 for b in sizes):
        raise BundleError(f"batch sizes must be positive, got {sizes}")
    if warmup < 0 or (iters is not None and iters <= 0) or (iters is None and (seconds is None or seconds <= 0)):
        raise BundleError("warmup must be >= 0 and iters or seconds positive")
    for p in files.values():
        if not p.is_file():
            raise BundleError(f"{p}: no such ONNX file")
        _check_input(p, shape, sizes)

    target = Path(out_dir)
    if target.exists():
        if not target.is_dir():
            raise BundleError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            if not (target / "bundle.json").is_file():
                raise BundleError(f"{target} is a non-empty directory that is not a repconv bundle; not touching it")
            if not overwrite:
                raise BundleError(f"{target} already holds a bundle (overwrite=True / --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)

    from repconv import __version__
    from repconv.profile.counting import count_onnx_parameters

    name = model_name or next(iter(files.values())).stem
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        models: list[dict[str, Any]] = []
        custom = False
        for var, src in files.items():
            fname = "model.onnx" if len(files) == 1 else f"{_safe(var)}.onnx"
            shutil.copyfile(src, tmp / fname)
            custom = custom or _uses_custom_domain(src)
            m = macs.get(var) if isinstance(macs, Mapping) else macs
            models.append({"file": fname, "model": name, "variant": var,
                           "params": count_onnx_parameters(src), "macs": m})
        shutil.copyfile(TEMPLATE_DIR / "benchmark.py", tmp / "benchmark.py")
        shutil.copyfile(_HERE / "stats.py", tmp / "repconv_stats.py")
        shutil.copyfile(_HERE / "portable.py", tmp / "repconv_portable.py")
        natives = native_sources()
        for src, rel in natives:
            dst = tmp / "native" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        manifest = {
            "name": name, "created": created, "repconv": __version__, "input_shape": shape,
            "batch_sizes": sizes, "warmup": warmup, "iters": iters, "seconds": None if iters else seconds,
            "models": models, "custom_ops": custom, "native": "native" if natives else None,
        }
        (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(manifest, [rel for _, rel in natives]), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "model"


def _readme(manifest: dict[str, Any], native_files: list[Path]) -> str:
    rows = [f"| `{m['file']}` | {m['model']} [{m['variant']}] |" for m in manifest["models"]]
    rows += ["| `bundle.json` | manifest (input shape, batch sizes, timing defaults) |",
             "| `benchmark.py` | standalone benchmark; writes `repconv profile` JSON |",
             "| `repconv_stats.py`, `repconv_portable.py` | statistics and memory helpers (same code as repconv) |"]
    if native_files:
        rows.append("| `native/` | C++ source and build files of the `ai.repconv` custom ops |")
    rows.append("| `README.md` | this file |")
    if native_files:
        listing = "\n".join(f"    native/{p.as_posix()}" for p in native_files)
        need = ("The model uses repconv's custom `ai.repconv::Involution` op. ONNX Runtime can run it without "
                "the native library (through the model-local function carried in the file), but the native "
                "kernel is faster:" if manifest["custom_ops"] else
                "This model uses no repconv custom op; the native library is optional and included for completeness:")
        names = {p.name for p in native_files}
        steps = []
        if "build.py" in names:
            steps.append("    ORT_INCLUDE_DIR=/path/to/onnxruntime/include python3 native/build.py   "
                         "# -> native/_build/")
        if "CMakeLists.txt" in names:
            steps.append("    cmake -S native -B native/build -DORT_INCLUDE_DIR=/path/to/onnxruntime/include && "
                         "cmake --build native/build")
        how = ("Build it with either of:\n\n" + "\n".join(steps) + "\n\n" if steps else "") + (
            "It needs a C++17 compiler and ONNX Runtime's C API header `onnxruntime_c_api.h`, which the pip wheel "
            "does not ship: use the `include/` folder of the onnxruntime release archive for the device's "
            "platform (any version >= 1.17; the library is not linked against onnxruntime). "
            "On Debian-like systems `build.py` can fetch `libonnxruntime-dev` itself when ORT_INCLUDE_DIR is unset.")
        native = (f"## 2. Build the native op library (optional)\n\n{need}\n\n{listing}\n\n{how}\n\n"
                  "`benchmark.py` picks up a library built anywhere under `native/`, or pass "
                  "`--custom-op-library PATH`.")
    else:
        native = "## 2. Native ops\n\nNot needed: this bundle has no native op sources."
    text = string.Template((TEMPLATE_DIR / "README.md").read_text(encoding="utf-8"))
    return text.substitute(
        name=manifest["name"], version=manifest["repconv"], created=manifest["created"],
        file_table="\n".join(rows), input_shape="x".join(map(str, manifest["input_shape"])),
        batch_sizes_csv=",".join(map(str, manifest["batch_sizes"])), native_section=native)
