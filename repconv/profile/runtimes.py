"""The runtimes a model can be timed on, and one runner per (variant, runtime, batch size).

A runner is a zero-argument callable doing one inference on a fixed input, plus the right timer for
its device (wall clock on CPU; CUDA events around the call and a synchronize on CUDA, because
kernel launches return before the GPU is done)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repconv.profile import memory, perop
from repconv.profile.machine import cuda_available
from repconv.profile.stats import Clock, Timer, wall_timer

RUNTIMES = ("torch", "torch-compile", "onnxruntime")
DEVICES = ("cpu", "cuda")


class ProfileError(ValueError):
    """Bad profiling request (unknown runtime/device, non-positive counts, ...): one line for the user."""


class MeasurementError(RuntimeError):
    """Nothing could be measured (every runtime failed on this model): one line for the user."""


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if cuda_available() else ["cpu"]


def check_device(device: str) -> torch.device:
    """Validate a device string; a CUDA request on a machine without a usable GPU is an error, not a fallback."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICES:
        raise ProfileError(f"unknown device {device!r}; available here: {', '.join(available_devices())}")
    if dev.type == "cuda":
        if not cuda_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check drivers / CUDA_VISIBLE_DEVICES)")
            raise ProfileError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ProfileError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def export_available() -> bool:
    try:
        from repconv.export.onnx import export_onnx  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_problems(device: torch.device, *, modules: bool, scripted: bool) -> dict[str, str | None]:
    """For each runtime: None if usable here for these variants, else why not.

    ``modules``: every variant is a PyTorch module (otherwise some are ONNX files: onnxruntime only).
    ``scripted``: some variant is TorchScript (torch.compile does not take those)."""
    problems: dict[str, str | None] = {}
    problems["torch"] = None if modules else "an ONNX model runs on onnxruntime only"
    if not modules:
        problems["torch-compile"] = "an ONNX model runs on onnxruntime only"
    elif scripted:
        problems["torch-compile"] = "torch.compile does not take TorchScript modules"
    elif device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        problems["torch-compile"] = "inductor needs a C++ compiler on CPU and none was found"
    elif device.type == "cuda" and not _has_triton():
        problems["torch-compile"] = "inductor needs Triton on CUDA and it is not installed"
    else:
        problems["torch-compile"] = None
    providers = _ort_providers()
    want = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if not providers:
        problems["onnxruntime"] = "onnxruntime is not installed"
    elif want not in providers:
        problems["onnxruntime"] = f"this onnxruntime build has no {want} (has: {', '.join(providers)})"
    elif modules and not export_available():
        problems["onnxruntime"] = "repconv.export_onnx is not available in this installation"
    else:
        problems["onnxruntime"] = None
    return problems


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_event_timer(device: torch.device) -> Timer:
    """Time one call with CUDA events recorded on the current stream, waiting for the end event."""

    def timer(fn: Callable[[], object]) -> float:
        # Events go on the current stream of *this* device (not whatever device is current).
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # nothing queued earlier may leak into this measurement
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # the host waits until the GPU has really finished the call
            return start.elapsed_time(end) / 1e3  # ms -> s

    return timer


class Runner:
    """One inference callable plus how to time it, measure its memory and profile its ops."""

    runtime: str
    provider: str | None = None
    native_ops: bool | None = None

    def __call__(self) -> object:  # pragma: no cover - overridden
        raise NotImplementedError

    def timer(self, clock: Clock) -> Timer:
        return wall_timer(clock)

    def peak_memory_mb(self) -> float | None:
        return memory.cpu_peak_growth_mb(self)

    def per_op(self, iterations: int, top: int, workdir: Path) -> list[perop.OpTime]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Drop references so memory of one group does not pile up under the next."""


class TorchRunner(Runner):
    def __init__(self, module: nn.Module | Callable[..., Any], example: torch.Tensor, device: torch.device,
                 runtime: str = "torch") -> None:
        self.module = module
        self.example = example
        self.device = device
        self.runtime = runtime

    def __call__(self) -> object:
        with torch.inference_mode():
            return self.module(self.example)

    def timer(self, clock: Clock) -> Timer:
        if self.device.type == "cuda":
            return cuda_event_timer(self.device)
        return wall_timer(clock)

    def peak_memory_mb(self) -> float | None:
        if self.device.type == "cuda":
            return memory.cuda_peak_mb(self, self.device)
        return memory.cpu_peak_growth_mb(self)

    def per_op(self, iterations: int, top: int, workdir: Path) -> list[perop.OpTime]:
        return perop.torch_per_op(self, iterations=iterations, cuda=self.device.type == "cuda", top=top)

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        self.example = None  # type: ignore[assignment]


def ort_session_options(threads: int, flush_denormal: bool) -> tuple[Any, bool]:
    """SessionOptions with repconv's native ops registered when built; (options, native ops registered?)."""
    import onnxruntime as ort

    native = False
    try:
        from repconv.runtime import native_library, session_options

        so = session_options()
        native = native_library() is not None
    except ImportError:
        so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Interleaving keeps several sessions alive; a session's pool spinning after its own run would
    # steal cores from the next variant's run, so worker threads block instead of spinning.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if flush_denormal:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return so, native


class OrtRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path: Path, example: np.ndarray, device: torch.device, threads: int,
                 flush_denormal: bool) -> None:
        self.path = Path(path)
        self.example = example
        self.device = device
        self.threads = threads
        self.flush_denormal = flush_denormal
        self.provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        self.session = self._session()
        self.input_name = self.session.get_inputs()[0].name
        self.feed = {self.input_name: example}
        self._binding = self._bind() if device.type == "cuda" else None

    def _session(self, patch: Callable[[Any], None] | None = None) -> Any:
        import onnxruntime as ort

        so, self.native_ops = ort_session_options(self.threads, self.flush_denormal)
        if patch is not None:
            patch(so)
        providers: list[Any] = [self.provider]
        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        return ort.InferenceSession(str(self.path), sess_options=so, providers=providers)

    def _bind(self) -> Any:
        # Input and outputs stay on the GPU, so host<->device copies are not part of the latency.
        # session.run_with_iobinding returns after the CUDA EP synchronised its stream, so the
        # wall clock is a correct timer here.
        import onnxruntime as ort

        binding = self.session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(self.example, "cuda", self.device.index or 0)
        binding.bind_ortvalue_input(self.input_name, value)
        for out in self.session.get_outputs():
            binding.bind_output(out.name, "cuda", self.device.index or 0)
        self._input_value = value
        return binding

    def __call__(self) -> object:
        if self._binding is not None:
            self.session.run_with_iobinding(self._binding)
            return None
        return self.session.run(None, self.feed)

    def peak_memory_mb(self) -> float | None:
        """RSS growth of a fresh session's first runs: its arena grows to the working set and keeps it,
        so a warm session would show ~0. The session's weights (loaded at creation) are excluded."""
        if self.device.type == "cuda":
            return None  # ORT's CUDA arena is invisible to torch's allocator statistics
        fresh = self._session()
        return memory.cpu_peak_growth_mb(lambda: fresh.run(None, self.feed))

    def per_op(self, iterations: int, top: int, workdir: Path) -> list[perop.OpTime]:
        return perop.ort_per_op(self._session, self.feed, iterations=iterations, workdir=workdir, top=top)

    def close(self) -> None:
        self._binding = None
        self.session = None
        self.feed = {}


def onnx_input(path: Path) -> tuple[str, list[int | str | None]]:
    """Name and declared shape (ints, symbolic names or None) of the single input of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ProfileError(f"{path}: profiling needs exactly one graph input, found {len(inputs)}")
    dims: list[int | str | None] = []
    for d in inputs[0].type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return inputs[0].name, dims
