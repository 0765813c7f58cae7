"""All-or-nothing outputs: every path a command writes is checked before any work, each result is
written to a staged file beside its target, and all of them are moved into place only when the
whole command has succeeded.

    with OutputPlan(no_clobber=no_clobber, protect=[model]) as plan:
        out = plan.file(output, "-o", "model")       # checked now: exit 2 before any work
        rep = plan.file(report, "--report", "json")
        ...                                           # the work
        torch.save(fused, out.staged)                 # write to .staged, never to .path
    # leaving the block: every staged file renamed over its target ("wrote X" / "replaced X");
    # an exception, Ctrl-C or SIGTERM instead: every staged file removed, nothing written

Checks (each a one-line :class:`UsageFailure`): the name's suffix does not say another kind of file
(``--json m.onnx``); no two outputs name the same file; no output is one of the command's inputs;
an existing target is a file (a folder for folder outputs) and, with ``--no-clobber``, is refused;
the parent is (or can become) a folder; and the staged file can really be created there - that
probe is what catches read-only folders, read-only file systems and missing permissions. Results
get the user's umask (0644 by default), not the 0600 of a temp file. Replacing is said, never silent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from repconv.cli.errors import UsageFailure, interrupt_seen, mark_outputs_committed, signals_blocked

# suffix -> what a file of that name holds; an output whose name says another kind is refused
_SUFFIX_KIND = {".onnx": "onnx", ".pt": "model", ".pth": "model", ".ts": "model", ".json": "json",
                ".png": "png", ".jpg": "image", ".jpeg": "image", ".svg": "image", ".pdf": "image"}
KIND_NAMES = {"onnx": "an ONNX model", "model": "a PyTorch model", "json": "a JSON report", "png": "a PNG image",
              "image": "an image", "bundle": "a bundle folder"}
_KIND_SUFFIX = {"onnx": ".onnx", "model": ".pt", "json": ".json", "png": ".png"}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclass
class Output:
    """One planned output: write to ``staged``; ``path`` is where it lands on success."""

    option: str
    path: Path
    staged: Path
    directory: bool
    existed: bool
    create_parents: bool
    backup: Path | None = field(default=None, repr=False)


class OutputPlan:
    """The outputs of one command (see the module docstring).

    ``protect``: the command's inputs, never overwritten. ``say``: how "wrote X" / "replaced X" is
    printed (default: nothing)."""

    def __init__(self, *, no_clobber: bool = False, protect: Iterable[str | os.PathLike[str] | None] = (),
                 say: Callable[[str], None] | None = None) -> None:
        self.no_clobber = no_clobber
        self.protect = [Path(p) for p in protect if p]
        self.say = say or (lambda _msg: None)
        self.outputs: list[Output] = []
        self._mode = 0o666 & ~_umask()

    # -- planning ------------------------------------------------------------------------------

    def file(self, path: str | os.PathLike[str], option: str, kind: str) -> Output:
        """Plan a file output of ``kind`` (onnx, model, json, png; any other kind, e.g. "file", is not
        checked against the name's suffix)."""
        target = self._common_checks(path, option, kind)
        existed = target.exists()
        if existed:
            if target.is_dir():
                raise UsageFailure(f"{option} {path} is a directory")
            if not target.is_file():
                raise UsageFailure(f"{option} {path} exists and is not a regular file")
            self._may_replace(target, option)
        parent, create = self._parent(target, option)
        try:
            fd, name = tempfile.mkstemp(prefix=".repconv-", suffix=f"-{target.name}", dir=parent)
        except OSError as e:
            raise self._cannot_write(target, parent, e) from None
        os.fchmod(fd, self._mode)
        os.close(fd)
        return self._add(Output(option, target, Path(name), False, existed, create))

    def directory(self, path: str | os.PathLike[str], option: str, *, replace: bool = False,
                  is_ours: Callable[[Path], bool] = lambda _p: False, what: str = "folder") -> Output:
        """Plan a folder output (a bundle). An existing non-empty folder is replaced only when
        ``is_ours`` says it is one of ours and ``replace`` (``--force``) allows it."""
        target = self._common_checks(path, option, "bundle")
        existed = target.exists()
        if existed:
            if not target.is_dir():
                raise UsageFailure(f"{option} {path} exists and is not a directory")
            if any(target.iterdir()):
                if not is_ours(target):
                    raise UsageFailure(f"{path} is a non-empty directory that is not a repconv {what}; "
                                       "not touching it")
                if self.no_clobber:
                    raise UsageFailure(f"{path} exists; --no-clobber refuses to replace it")
                if not replace:
                    raise UsageFailure(f"{path} already holds a {what} (--force to replace it)")
        parent, create = self._parent(target, option)
        try:
            staged = Path(tempfile.mkdtemp(prefix=".repconv-", suffix=f"-{target.name}", dir=parent))
        except OSError as e:
            raise self._cannot_write(target, parent, e) from None
        return self._add(Output(option, target, staged, True, existed, create))

    def _common_checks(self, path: str | os.PathLike[str], option: str, kind: str) -> Path:
        text = os.fspath(path)
        if not text.strip():
            raise UsageFailure(f"{option} needs a path")
        target = Path(text)
        if target.is_symlink() and target.exists():
            target = target.resolve()  # write through a link to a file, as cp does
        says = _SUFFIX_KIND.get(target.suffix.lower())
        if says is not None and kind in KIND_NAMES and says != kind and not (kind == "png" and says == "image"):
            hint = f"; give a {_KIND_SUFFIX[kind]} path" if kind in _KIND_SUFFIX else ""
            raise UsageFailure(f"{option} {path}: the name says {KIND_NAMES[says]}, but this writes "
                               f"{KIND_NAMES[kind]}{hint}")
        for other in self.outputs:
            if _same(other.path, target):
                raise UsageFailure(f"{other.option} and {option} both name {path}")
        for p in self.protect:
            if _same(p, target):
                raise UsageFailure(f"refusing to overwrite the input {p} ({option})")
        return target

    def _may_replace(self, target: Path, option: str) -> None:
        if self.no_clobber:
            raise UsageFailure(f"{target} exists; --no-clobber refuses to replace it ({option})")
        if not os.access(target, os.W_OK):
            raise UsageFailure(f"{target} is read-only: not replacing it ({option})")

    def _parent(self, target: Path, option: str) -> tuple[Path, bool]:
        """The nearest existing folder above ``target`` (staged files go there) and whether the folders
        between must be created on success."""
        parent = target.parent if str(target.parent) else Path(".")
        probe = parent
        while not probe.exists():
            if probe.is_symlink():  # a dangling link
                raise UsageFailure(f"cannot write {target}: {probe} is a broken symbolic link")
            probe = probe.parent
        if not probe.is_dir():
            raise UsageFailure(f"cannot write {target}: {probe} is a file, not a directory")
        return probe, probe != parent

    def _cannot_write(self, target: Path, parent: Path, e: OSError) -> UsageFailure:
        if e.errno in (errno.EACCES, errno.EPERM):
            why = f"no permission to create files in {parent}"
        elif e.errno == errno.EROFS:
            why = f"{parent} is on a read-only file system"
        elif e.errno == errno.ENOSPC:
            why = f"no space left in {parent}"
        else:
            why = f"{e.strerror or type(e).__name__} in {parent}"
        return UsageFailure(f"cannot write {target}: {why}")

    def _add(self, out: Output) -> Output:
        self.outputs.append(out)
        return out

    # -- finishing -----------------------------------------------------------------------------

    def __enter__(self) -> OutputPlan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def discard(self) -> None:
        """Remove every staged file (signals held back meanwhile, so a second Ctrl-C cannot leave one)."""
        with signals_blocked():
            for o in self.outputs:
                _remove(o.staged)
            self.outputs = []

    def commit(self) -> None:
        """Move every staged result into place; if one move fails, undo the others and raise."""
        done: list[Output] = []
        with signals_blocked():
            late = interrupt_seen()
            if late is not None:  # an interrupt that something swallowed: the command did not finish
                self.discard()
                raise late
            try:
                for o in self.outputs:
                    self._put_in_place(o)
                    done.append(o)
            except OSError as e:
                for o in reversed(done):
                    self._undo(o)
                self.discard()
                failed = next(o for o in self.outputs if o not in done) if len(done) < len(self.outputs) else None
                where = failed.path if failed else ""
                raise UsageFailure(f"cannot write {where}: {e.strerror or e}; nothing written") from None
            for o in done:
                if o.backup is not None:
                    _remove(o.backup)
            mark_outputs_committed()
        for o in done:
            self.say(f"{'replaced' if o.existed else 'wrote'} {o.path}")
        self.outputs = []

    def _put_in_place(self, o: Output) -> None:
        if o.create_parents:
            o.path.parent.mkdir(parents=True, exist_ok=True)
        if o.directory:
            os.chmod(o.staged, 0o777 & ~_umask())
            if o.existed:  # rename() cannot replace a non-empty folder: move the old one aside first
                o.backup = Path(tempfile.mkdtemp(prefix=".repconv-old-", dir=o.path.parent))
                os.rmdir(o.backup)
                os.rename(o.path, o.backup)
            os.rename(o.staged, o.path)
            return
        os.chmod(o.staged, self._mode)
        if o.existed:
            backup = o.path.with_name(f".repconv-old-{os.getpid()}-{o.path.name}")
            with contextlib.suppress(OSError):  # a hard link to restore from if a later output fails
                os.link(o.path, backup)
                o.backup = backup
        os.replace(o.staged, o.path)

    def _undo(self, o: Output) -> None:
        with contextlib.suppress(OSError):
            if o.backup is None:
                if not o.existed:
                    _remove(o.path)
            elif o.directory:
                shutil.rmtree(o.path)
                os.rename(o.backup, o.path)
            else:
                os.replace(o.backup, o.path)


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
