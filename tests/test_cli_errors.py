"""The CLI as a user meets it: a bad-input matrix.

Every case asserts the exit code, the one line on stderr (and what it says), that no traceback
appears, and the exact files present afterwards (nothing written on failure, no temp files).
CliRunner runs most cases in-process; real subprocesses cover what only a real process has:
a read-only folder, the working directory on sys.path, and SIGINT / SIGTERM sent while the
command imports torch, works, and writes its output.

``pytest tests/test_cli_errors.py -rP`` prints the matrix (lines starting ``MATRIX``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from repconv.cli.main import main
from tests.cli_models import small_repvgg

ROOT = Path(__file__).resolve().parents[1]
F = "tests.cli_models:small_repvgg"
SHAPE = ["--input-shape", "1,3,16,16"]
FAST = ["--warmup", "0", "--iters", "2", "--runtime", "torch"]


def tree(root: Path) -> list[str]:
    """Every file and folder under ``root`` (hidden ones too), relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the files the cases refer to; the command runs inside it."""
    torch.save(small_repvgg(), tmp_path / "net.pt")
    torch.save(small_repvgg().state_dict(), tmp_path / "w.pth")
    torch.save({"nope": torch.zeros(1)}, tmp_path / "wrong.pth")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "afile").write_text("a file, not a folder\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "existing.pt").write_bytes(b"old result")
    _save_from_main(tmp_path / "main.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _save_from_main(path: Path) -> None:
    """A pickle whose class lives in a script's __main__ (as `python train.py` would save it)."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

    Net.__module__, Net.__qualname__ = "__main__", "Net"
    main_module = sys.modules["__main__"]
    main_module.Net = Net
    try:
        torch.save(Net(), path)
    finally:
        delattr(main_module, "Net")


@dataclass
class Case:
    id: str
    args: list[str]
    code: int
    message: str  # must appear in the one stderr line
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def wrong_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken conv+BN fold (kernel x1.5): what verification exists to catch."""
    from repconv.algebra import conv as conv_algebra

    real = conv_algebra.conv_then_affine
    monkeypatch.setattr("repconv.graph.affine.A.conv_then_affine",
                        lambda k, s, t: (lambda o: type(o)(o.weight * 1.5, o.bias, o.geom))(real(k, s, t)))


CASES = [
    # options and numbers
    Case("no MODEL", ["fuse"], 2, "Missing argument 'MODEL'"),
    Case("unknown option", ["fuse", F, "--bogus"], 2, "No such option '--bogus'. (see 'repconv fuse --help')"),
    Case("--rtol nan", ["fuse", F, "--rtol", "nan"], 2, "'nan' is not a finite number"),
    Case("--rtol inf", ["fuse", F, "--rtol", "inf"], 2, "'inf' is not a finite number"),
    Case("--atol -1", ["fuse", F, "--atol", "-1"], 2, "'-1' must be >= 0"),
    Case("--dtype float64", ["fuse", F, "--dtype", "float64"], 2, "Invalid value for '--dtype'"),
    Case("--input-shape 1,x", ["fuse", F, "--input-shape", "1,x"], 2, "is not a comma-separated list"),
    Case("--input-shape 0,3,8,8", ["fuse", F, "--input-shape", "0,3,8,8"], 2, "must have positive dimensions"),
    Case("export --rtol nan", ["export", F, "--onnx", "o.onnx", "--rtol", "nan"], 2, "not a finite number"),
    Case("export --opset 99", ["export", F, *SHAPE, "--onnx", "o.onnx", "--opset", "99"], 2,
         "--opset 99 is outside what the dynamo exporter supports (18..23)"),
    Case("export --opset 0", ["export", F, "--onnx", "o.onnx", "--opset", "0"], 2, "'0' must be positive"),
    Case("export nothing", ["export", F], 2, "nothing to export: give --onnx OUT.onnx and/or --bundle DIR"),
    Case("export --dtype bfloat16", ["export", F, "--onnx", "o.onnx", "--dtype", "bfloat16"], 2,
         "ONNX Conv takes bfloat16 only from opset 22"),
    Case("profile --seconds nan", ["profile", F, "--seconds", "nan"], 2, "--seconds must be positive and finite"),
    Case("profile --seconds inf", ["profile", F, "--seconds", "inf"], 2, "--seconds must be positive and finite"),
    Case("profile --seconds 0", ["profile", F, "--seconds", "0"], 2, "--seconds must be positive"),
    Case("profile --seconds 1e9", ["profile", F, "--seconds", "1e9"], 2, "(at most 86400)"),
    Case("profile --iters 0", ["profile", F, "--iters", "0"], 2, "--iters must be positive"),
    Case("profile --warmup -1", ["profile", F, "--warmup", "-1"], 2, "--warmup must be >= 0"),
    Case("profile --threads 0", ["profile", F, "--threads", "0"], 2, "--threads must be positive"),
    Case("profile --batch-sizes 1,0", ["profile", F, "--batch-sizes", "1,0"], 2, "--batch-sizes must be positive"),
    # model loading
    Case("no such file", ["fuse", "missing.pt"], 2, "missing.pt: no such file"),
    Case("not a PyTorch file", ["fuse", "bad.pt"], 2, "bad.pt is not a readable PyTorch file"),
    Case("factory attribute missing", ["fuse", "tests.cli_models:nope"], 2, "has no attribute 'nope'"),
    Case("module not importable", ["fuse", "no_such_module_xyz:f"], 2, "cannot import 'no_such_module_xyz'"),
    Case("pickle without --allow-pickle", ["fuse", "net.pt"], 2, "pass --allow-pickle"),
    Case("pickled weights without --allow-pickle", ["fuse", F, "--weights", "net.pt"], 2, "pass --allow-pickle"),
    Case("class pickled from __main__", ["fuse", "main.pt", "--allow-pickle"], 2,
         "main.pt was saved from a script run as __main__: the pickle refers to __main__.Net"),
    Case("state dict as MODEL", ["fuse", "w.pth"], 2, "holds a state dict, not a model"),
    Case("weights that do not fit", ["fuse", F, "--weights", "wrong.pth"], 2,
         "do not match tests.cli_models:small_repvgg: keys: 29 missing (0.k3.0.weight, 0.k3.1.weight, "
         "0.k3.1.bias, ...); 1 unexpected (nope)"),
    Case("ONNX file to fuse", ["fuse", "m.onnx"], 2, "is an ONNX file"),
    # the model does not run: the real cause
    Case("user forward raises", ["fuse", "tests.cli_models:raises", *SHAPE], 2,
         "the model's forward raised ValueError: only 8x8 crops are supported"),
    Case("out of memory in forward", ["fuse", "tests.cli_models:greedy", *SHAPE], 2,
         "out of memory running the model on input (1, 3, 16, 16) float32, 3.0 KiB"),
    Case("input too large", ["fuse", F, "--input-shape", "1,3,100000,100000"], 2,
         "out of memory: input (1, 3, 100000, 100000) float32 needs 111.8 GiB"),
    Case("dtype mismatch", ["fuse", "tests.cli_models:mixed_dtype", *SHAPE], 2,
         "dtype mismatch: the model mixes float16 (0.weight), float32 (1.weight): pass --dtype float32"),
    Case("wrong channels (fuse)", ["fuse", F, "--input-shape", "1,5,16,16"], 2,
         "its first layer 0.k3.0 (Conv2d, 3 input channels) expects (N, C=3, H, W)"),
    Case("wrong channels (export)", ["export", F, "--input-shape", "1,5,16,16", "--onnx", "o.onnx"], 2,
         "expects (N, C=3, H, W)"),
    Case("wrong channels (profile)", ["profile", F, "--input-shape", "1,5,16,16", *FAST], 2,
         "expects (N, C=3, H, W)"),
    # output paths: checked before any work
    Case("-o is a folder", ["fuse", F, *SHAPE, "-o", "adir"], 2, "-o adir is a directory"),
    Case("-o under a file", ["fuse", F, *SHAPE, "-o", "afile/f.pt"], 2,
         "cannot write afile/f.pt: afile is a file, not a directory"),
    Case("--report under a file", ["fuse", F, *SHAPE, "-o", "f.pt", "--report", "afile/r.json"], 2,
         "cannot write afile/r.json: afile is a file, not a directory"),
    Case("-o and --report the same", ["fuse", F, *SHAPE, "-o", "x.json", "--report", "x.json"], 2,
         "-o x.json: the name says a JSON report, but this writes a PyTorch model"),
    Case("-o and --report one file", ["fuse", F, *SHAPE, "-o", "same.bin", "--report", "same.bin"], 2,
         "-o and --report both name same.bin"),
    Case("--report same as -o", ["fuse", F, *SHAPE, "-o", "f.pt", "--report", "f.pt"], 2,
         "--report f.pt: the name says a PyTorch model, but this writes a JSON report"),
    Case("--json an .onnx name", ["profile", F, *SHAPE, *FAST, "--json", "m.onnx"], 2,
         "--json m.onnx: the name says an ONNX model, but this writes a JSON report; give a .json path"),
    Case("--onnx over the input", ["export", "m.onnx", "--onnx", "m.onnx"], 2, "refusing to overwrite the input"),
    Case("-o over the input", ["fuse", "net.pt", "--allow-pickle", *SHAPE, "-o", "net.pt"], 2,
         "refusing to overwrite the input net.pt"),
    Case("--no-clobber", ["fuse", F, *SHAPE, "-o", "existing.pt", "--no-clobber"], 2,
         "existing.pt exists; --no-clobber refuses to replace it"),
    Case("--plot under a file", ["profile", F, *SHAPE, *FAST, "--plot", "afile/p.png"], 2,
         "cannot write afile/p.png: afile is a file, not a directory"),
    Case("--bundle over a file", ["export", F, *SHAPE, "--bundle", "afile"], 2, "afile exists and is not a directory"),
    # checks that fail: exit 1, nothing written
    Case("verification fails", ["fuse", F, *SHAPE, "-o", "f.pt", "--report", "r.json"], 1,
         "fused model does not match (first diverging layer: 0", patch=wrong_fold),
    Case("ONNX Runtime differs", ["export", "tests.cli_models:noisy", *SHAPE, "--no-fuse", "--onnx", "o.onnx"], 1,
         "differs from PyTorch"),
    # interrupted in the middle of the work
    Case("Ctrl-C inside the forward", ["fuse", "tests.cli_models:interrupts", *SHAPE, "-o", "f.pt"], 130,
         "interrupted: nothing written"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_matrix(case: Case, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.patch is not None:
        case.patch(monkeypatch)
    before = tree(work)
    res = CliRunner().invoke(main, case.args)
    lines = stderr_lines(res.stderr)
    print(f"MATRIX | {case.id} | {res.exit_code} | {lines[-1] if lines else ''}")
    assert res.exit_code == case.code, res.output
    assert len(lines) == 1, res.stderr
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert tree(work) == before  # nothing written, no temp file left


def test_success_says_replaced_and_uses_umask(work: Path) -> None:
    old = os.umask(0o027)
    try:
        res = CliRunner().invoke(main, ["fuse", F, *SHAPE, "-o", "existing.pt", "--report", "new/sub/r.json"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert "replaced existing.pt" in res.output and "wrote new/sub/r.json" in res.output
    assert (work / "existing.pt").stat().st_mode & 0o777 == 0o640
    assert (work / "new" / "sub" / "r.json").stat().st_mode & 0o777 == 0o640
    fused = torch.load(work / "existing.pt", weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), small_repvgg()(x), rtol=1e-4, atol=1e-5)
    assert tree(work) == sorted([*_FIXTURE_FILES, "new", "new/sub", "new/sub/r.json"])
    res = CliRunner().invoke(main, ["fuse", F, *SHAPE, "-o", "fresh.pt"])
    assert res.exit_code == 0 and "wrote fresh.pt" in res.output
    assert (work / "fresh.pt").stat().st_mode & 0o777 == 0o666 & ~old


_FIXTURE_FILES = ["adir", "afile", "bad.pt", "existing.pt", "m.onnx", "main.pt", "net.pt", "w.pth", "wrong.pth"]


def test_allow_pickle_warns_and_applies_to_weights(work: Path) -> None:
    res = CliRunner().invoke(main, ["fuse", F, "--weights", "net.pt", "--allow-pickle", *SHAPE, "-o", "f.pt"])
    assert res.exit_code == 0, res.output
    assert stderr_lines(res.stderr) == [
        "warning: --allow-pickle: unpickling net.pt runs code from the file; use it only on files you trust"]
    res = CliRunner().invoke(main, ["fuse", F, "--weights", "w.pth", "--allow-pickle", *SHAPE, "-o", "g.pt"])
    assert res.exit_code == 0 and res.stderr == ""  # a plain state dict is loaded safely: nothing to warn of


def test_shape_inference_follows_execution_and_says_what_it_used(work: Path) -> None:
    res = CliRunner().invoke(main, ["inspect", "tests.cli_models:head_first"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert ("input shape 1x5x224x224 inferred from stem.0 (Conv2d, 5 input channels), the first layer the "
            "model runs") in text  # the Linear registered first is not what runs first
    torch.jit.save(torch.jit.script(small_repvgg()), str(work / "net.ts"))
    res = CliRunner().invoke(main, ["inspect", "net.ts"])
    assert res.exit_code == 0, res.output
    assert "inferred from 0.k3.0 (Conv2d, 3 input channels), the first conv/linear in its TorchScript graph" \
        in " ".join(res.output.split())


def test_dtype_option_fuses_in_half_precision(work: Path) -> None:
    res = CliRunner().invoke(main, ["fuse", F, *SHAPE, "--dtype", "float16", "-o", "h.pt"])
    assert res.exit_code == 0, res.output
    assert "converted the model to float16 (--dtype)" in res.output
    fused = torch.load(work / "h.pt", weights_only=False)
    assert {p.dtype for p in fused.parameters()} == {torch.float16}
    x = torch.randn(2, 3, 16, 16)
    ref = small_repvgg().half()(x.half()).float()  # the original, converted: the reference
    err = (fused(x.half()).float() - ref).abs().max() / ref.abs().max()
    assert err < 8 * torch.finfo(torch.float16).eps  # the documented 8-ulp floor
    res = CliRunner().invoke(main, ["fuse", "tests.cli_models:half_repvgg", *SHAPE, "-o", "own.pt"])
    assert res.exit_code == 0 and "running in float16, the model's dtype" in res.output


def test_python_api_names_the_dtype_fix() -> None:
    import repconv
    from repconv.pipeline import FuseInputError

    with pytest.raises(FuseInputError, match="parameters are float16 but the input is float32: pass --dtype float16"):
        repconv.fuse(small_repvgg().half(), torch.randn(1, 3, 16, 16))


# --------------------------------------------------------------------------- real processes

def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "repconv", *args]


def _unprivileged() -> list[str] | None:
    """A command prefix under which a 0555 folder is really read-only (root ignores modes)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--user", "--map-user=65534", "--map-group=65534", "true"],
                                  capture_output=True).returncode == 0:
        return [unshare, "--user", "--map-user=65534", "--map-group=65534"]
    return None


def test_read_only_folder_exit_2_before_any_work(tmp_path: Path) -> None:
    prefix = _unprivileged()
    if prefix is None:
        pytest.fail("cannot run unprivileged here (root without `unshare --user`): no read-only folder possible")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([*prefix, *_cli("fuse", "tests.cli_models:slow", *SHAPE, "-o", "ro/f.pt")],
                              capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
        seconds = time.perf_counter() - t0
    finally:
        ro.chmod(0o755)
    lines = stderr_lines(proc.stderr)
    print(f"MATRIX | read-only folder (subprocess) | {proc.returncode} | {lines[-1] if lines else ''}")
    assert proc.returncode == 2, proc.stderr
    assert lines == ["error: cannot write ro/f.pt: no permission to create files in ro"]
    assert tree(tmp_path) == ["ro"]
    assert seconds < 30  # refused before the (slow) model was even loaded and run


MYNETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def factory():
    return Net().eval()
'''


def test_working_directory_is_importable(tmp_path: Path) -> None:
    (tmp_path / "mynets.py").write_text(MYNETS)
    env = _env()  # the repository only: mynets.py is found because it is in the working directory
    proc = subprocess.run(_cli("fuse", "mynets:factory", *SHAPE, "-o", "f.pt"), capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(tmp_path))  # pickle a mynets.Net here, as the user's own script would
    try:
        import mynets

        torch.save(mynets.factory(), tmp_path / "net.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynets", None)
    proc = subprocess.run([sys.executable, "-c", "from repconv.cli.entry import run; run()", "fuse", "net.pt",
                           "--allow-pickle", *SHAPE, "-o", "g.pt"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr  # the console-script entry, which has no cwd on sys.path itself
    assert "warning: --allow-pickle: unpickling net.pt runs code from the file" in proc.stderr
    assert {"f.pt", "g.pt"} <= set(tree(tmp_path))


def _wait_for(stream: object, needle: str, timeout: float = 120) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()  # type: ignore[attr-defined]
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared: {''.join(seen)[-2000:]}")


def test_sigint_while_importing_torch(tmp_path: Path) -> None:
    # -X importtime prints a line as each module finishes importing: once torch's own submodules
    # appear, torch is being imported and the command has not started.
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "repconv", "fuse", F, *SHAPE,
                             "-o", "f.pt"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=_env())
    _wait_for(proc.stderr, "| torch.")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in stderr_lines(err) if not ln.startswith("import time:")]
    print(f"MATRIX | SIGINT while importing torch (subprocess) | {proc.returncode} | {lines[-1] if lines else ''}")
    assert proc.returncode == 130, err[-2000:]
    assert lines == ["interrupted: nothing written"]
    assert "Traceback" not in err
    assert tree(tmp_path) == []


@pytest.mark.parametrize("sig,code,message", [(signal.SIGTERM, 143, "terminated (SIGTERM): nothing written")])
def test_signal_during_work(tmp_path: Path, sig: int, code: int, message: str) -> None:
    proc = subprocess.Popen(_cli("fuse", "tests.cli_models:slow", *SHAPE, "-o", "out/f.pt", "--report", "r.json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    _wait_for_file_or_output(proc, tmp_path)
    err, lines = _send(proc, sig, "while fusing")
    assert proc.returncode == code, err
    assert lines == [message]
    assert tree(tmp_path) == []


def _send(proc: subprocess.Popen, sig: int, when: str) -> tuple[str, list[str]]:
    """Send ``sig`` to the running command, wait for it, print its matrix row: (stderr, its lines)."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = stderr_lines(err)
    print(f"MATRIX | {signal.Signals(sig).name} {when} (subprocess) | {proc.returncode} | {lines[-1] if lines else ''}")
    return err, lines


def _wait_for_file_or_output(proc: subprocess.Popen, root: Path, timeout: float = 120) -> None:
    """Wait until the command is at work: its staged outputs exist (they are made before the work)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(name.startswith(".repconv-") for name in tree(root)):
            time.sleep(1.0)  # well inside the fusing (several 0.5 s forwards)
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    raise AssertionError("the command never started its work")


SLOW_SAVE = '''
import sys, time, torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)       # the staged file is written ...
    print("STAGED", f, file=sys.stderr, flush=True)
    for _ in range(600):                     # ... and the command is still saving (short sleeps: a
        time.sleep(0.1)                      # signal caught by another thread wakes no long sleep)
torch.save = slow_save
from repconv.cli.entry import run
run()
'''


@pytest.mark.parametrize("sig,code,message", [(signal.SIGINT, 130, "interrupted: nothing written"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM): nothing written")])
def test_signal_while_saving_leaves_no_temp_file(tmp_path: Path, sig: int, code: int, message: str) -> None:
    (tmp_path / "old.pt").write_bytes(b"the previous result")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "fuse", F, *SHAPE, "-o", "old.pt"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    staged = _wait_for(proc.stderr, "STAGED")[-1].split(maxsplit=1)[1].strip()
    assert Path(staged).name.startswith(".repconv-") and Path(staged).stat().st_size > 1000  # really mid-save
    err, lines = _send(proc, sig, "while saving")
    assert proc.returncode == code, err
    assert lines == [message]
    assert tree(tmp_path) == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == b"the previous result"


def test_rtol_means_what_it_says_for_fp32() -> None:
    """No hidden floor for float32: an error of 4 float32 ulps fails rtol=0 and passes rtol=1e-6;
    float16 keeps its documented floor of 8 ulps (the same relative error passes at rtol=0)."""
    from repconv.verification import verify

    class Scale(torch.nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    x = torch.linspace(1, 2, 64)
    four_ulps = 1 + 4 * torch.finfo(torch.float32).eps
    assert not verify(Scale(1.0), Scale(four_ulps), x, rtol=0, atol=0).ok
    assert verify(Scale(1.0), Scale(four_ulps), x, rtol=1e-6, atol=0).ok
    half = x.half()
    one_ulp16 = 1 + torch.finfo(torch.float16).eps
    assert verify(Scale(1.0), Scale(one_ulp16), half, rtol=0, atol=0).ok  # under the 8-ulp floor
    assert not verify(Scale(1.0), Scale(1 + 16 * torch.finfo(torch.float16).eps), half, rtol=0, atol=0).ok
