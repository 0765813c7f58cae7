"""Profiling a model before and after fusion: variants x runtimes x batch sizes, interleaved."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repconv.profile import counting
from repconv.profile.machine import busy_note, cpu_settings, load_average, machine_info
from repconv.profile.runtimes import (
    RUNTIMES,
    MeasurementError,
    OrtRunner,
    ProfileError,
    Runner,
    TorchRunner,
    check_device,
    onnx_input,
    runtime_problems,
)
from repconv.profile.stats import Clock, measure_interleaved, paired_ratio, summarize

SCHEMA = "repconv.profile/1"

# Defaults sized so the README example (a small model at 1x3x64x64) profiles original + fused on three
# runtimes in well under a minute on 2 cores, while still collecting hundreds of samples per variant.
DEFAULT_WARMUP = 10
DEFAULT_SECONDS = 1.0
PER_OP_ITERATIONS = 20
# torch.compile is opt-in: its first compilation of a model costs 20-60 s on a 2-core CPU, longer than
# everything else in a default run together; "all" (or naming it) includes it.
DEFAULT_RUNTIMES = ("torch", "onnxruntime")

DENORMAL_NOTE = ("denormals flushed to zero on CPU (torch.set_flush_denormal(True); "
                 "ORT session.set_denormal_as_zero=1)")


@dataclass
class Result:
    """One (model, variant, runtime, device, batch size) measurement; latency figures in ms."""

    model: str
    variant: str
    runtime: str
    device: str
    batch_size: int
    threads: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    iqr_ms: float | None = None
    mad_ms: float | None = None
    samples: int | None = None
    throughput: float | None = None  # items per second at the median latency
    peak_mem_mb: float | None = None
    params: int | None = None
    macs: int | None = None  # multiply-accumulates per item
    provider: str | None = None
    native_ops: bool | None = None
    per_op: list[dict[str, Any]] | None = None
    source: str = "local"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Comparison:
    """Paired ratio candidate/reference (< 1: candidate faster), median and IQR over repetitions."""

    model: str
    runtime: str
    device: str
    batch_size: int
    reference: str
    candidate: str
    pairs: int
    ratio_median: float
    ratio_p25: float
    ratio_p75: float
    speedup: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ProfileReport:
    machine: dict[str, Any]
    config: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "created": self.created,
            "machine": self.machine,
            "config": self.config,
            "results": [r.to_dict() for r in self.results],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "notes": list(self.notes),
        }


@dataclass
class Variant:
    """A model to time: a PyTorch module or an ONNX file, under a display name."""

    model: str  # the model's name (its spec)
    variant: str  # "original", "fused", ...
    module: nn.Module | None = None
    onnx: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.model} [{self.variant}]"


def _is_onnx(obj: object) -> bool:
    return isinstance(obj, str | Path) and str(obj).lower().endswith(".onnx")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _try_fuse(module: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, str | None]:
    """(fused module, None) or (None, why not)."""
    try:
        from repconv.pipeline import fuse
    except ImportError:
        return None, "fusion is not available in this installation; profiled the model as given only"
    try:
        return fuse(module, (example,), verify=True), None
    except Exception as e:  # a refused or failed fusion must not hide the original's numbers
        return None, f"fusion failed ({_first_line(e)}); profiled the model as given only"


def _export(module: nn.Module, path: Path, example: torch.Tensor, dynamic_batch: bool) -> Path:
    from repconv.export.onnx import export_onnx

    # half precision: ORT and PyTorch round differently, so allow 8 ulps as verification does
    half = example.dtype in (torch.float16, torch.bfloat16)
    rtol = 8 * torch.finfo(example.dtype).eps if half else 1e-4
    return Path(export_onnx(module, path, (example,), fuse=False, dynamic_batch=dynamic_batch, rtol=rtol))


def _validate(runtimes: Sequence[str] | None, batch_sizes: Sequence[int] | None, threads: int | None,
              warmup: int, iters: int | None, seconds: float | None, top: int) -> None:
    if runtimes is not None and list(runtimes) != ["all"]:
        unknown = [r for r in runtimes if r not in RUNTIMES]
        if unknown:
            raise ProfileError(f"unknown runtime {', '.join(map(repr, unknown))}; known: {', '.join(RUNTIMES)}")
        if not runtimes:
            raise ProfileError("no runtime selected")
    if batch_sizes is not None and (not batch_sizes or any(b <= 0 for b in batch_sizes)):
        raise ProfileError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if threads is not None and threads <= 0:
        raise ProfileError(f"threads must be positive, got {threads}")
    if warmup < 0:
        raise ProfileError(f"warmup must be >= 0, got {warmup}")
    if iters is not None and iters <= 0:
        raise ProfileError(f"iterations must be positive, got {iters}")
    if iters is None and (seconds is None or seconds <= 0):
        raise ProfileError(f"seconds must be positive, got {seconds}")
    if top <= 0:
        raise ProfileError(f"top must be positive, got {top}")


def _onnx_shape(path: Path, given: Sequence[int] | None) -> tuple[int, ...]:
    _, dims = onnx_input(path)
    if given is not None:
        if len(given) != len(dims):
            raise ProfileError(f"{path}: input has rank {len(dims)}, --input-shape has rank {len(given)}")
        for i, (d, g) in enumerate(zip(dims, given, strict=True)):
            if i > 0 and isinstance(d, int) and d != g:
                raise ProfileError(f"{path}: input dimension {i} is fixed to {d}, --input-shape says {g}")
        return tuple(given)
    if all(isinstance(d, int) for d in dims[1:]):
        first = dims[0] if isinstance(dims[0], int) else 1
        return (first, *dims[1:])  # type: ignore[return-value]
    raise ProfileError(f"{path}: input shape {dims} has symbolic dimensions; pass --input-shape")


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inference latency is measured in eval mode; the caller's training flags are restored."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(modules, flags, strict=True):
            m.train(was)


def profile_model(
    model: nn.Module | str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    compare: nn.Module | str | Path | None = None,
    fuse: bool = True,
    model_name: str | None = None,
    compare_name: str | None = None,
    runtimes: Sequence[str] | None = None,
    device: str = "cpu",
    batch_sizes: Sequence[int] | None = None,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = DEFAULT_SECONDS,
    per_op: bool = False,
    top: int = 10,
    flush_denormal: bool = True,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> ProfileReport:
    """Time ``model`` (a module or an ``.onnx`` path) and its fused form, or ``compare``, side by side.

    Every (runtime, batch size) group times all variants interleaved: one call of each per repetition,
    order rotating, ``iters`` repetitions or until ``seconds`` have passed; the first variant is the
    reference of the paired ratios. ``runtimes`` defaults to those of :data:`DEFAULT_RUNTIMES` usable
    here for these variants; ``["all"]`` means every usable one. Inputs are made in ``dtype`` (the
    model's own: convert the model first). Raises :class:`ProfileError` for a
    request that cannot be honoured."""
    _validate(runtimes, batch_sizes, threads, warmup, iters, seconds, top)
    dev = check_device(device)
    t_start = time.perf_counter()  # progress stamps only; never part of a measurement
    load_before = load_average()  # before our own fusing/exporting adds to it

    def say(msg: str) -> None:
        if progress is not None:
            progress(f"[{time.perf_counter() - t_start:5.1f}s] {msg}")

    notes: list[str] = []

    # -- the variants -------------------------------------------------------------------------------
    name = model_name or (str(model) if _is_onnx(model) else type(model).__name__)
    if _is_onnx(model):
        shape = _onnx_shape(Path(model), input_shape)  # type: ignore[arg-type]
    elif isinstance(model, nn.Module):
        shape = tuple(input_shape) if input_shape else _infer_shape(model)
    else:
        raise ProfileError(f"cannot profile a {type(model).__name__}: give an nn.Module or an .onnx path")
    sizes = list(batch_sizes) if batch_sizes is not None else [shape[0]]
    if _is_onnx(model):
        fixed = onnx_input(Path(model))[1][0]  # type: ignore[arg-type]
        if isinstance(fixed, int) and any(b != fixed for b in sizes):
            raise ProfileError(f"{model}: the batch dimension is fixed to {fixed}; cannot run batch sizes {sizes}")
    gen = torch.Generator().manual_seed(seed)
    base_input = torch.randn((1, *shape[1:]), generator=gen, dtype=dtype)

    def make(obj: nn.Module | str | Path, label: str) -> Variant:
        if _is_onnx(obj):
            return Variant(label, "original", onnx=Path(obj))  # type: ignore[arg-type]
        if isinstance(obj, nn.Module):
            return Variant(label, "original", module=obj)
        raise ProfileError(f"cannot profile a {type(obj).__name__}: give an nn.Module or an .onnx path")

    variants = [make(model, name)]
    if compare is not None:
        other = compare_name or (str(compare) if _is_onnx(compare) else type(compare).__name__)
        if other == name:
            other += " (compare)"
        variants.append(make(compare, other))
        if variants[1].onnx is not None:
            _onnx_shape(variants[1].onnx, shape)  # same input contract, or a clear error now
    elif fuse and variants[0].module is not None:
        say("fusing")
        with _eval_mode([variants[0].module]):
            fused, why = _try_fuse(variants[0].module, base_input)
        if fused is not None:
            variants.append(Variant(name, "fused", module=fused))
        else:
            notes.append(str(why))

    modules = [v.module for v in variants if v.module is not None]
    problems = runtime_problems(dev, modules=len(modules) == len(variants),
                                scripted=any(isinstance(m, torch.jit.ScriptModule) for m in modules))
    usable = [r for r in RUNTIMES if problems[r] is None]
    if runtimes is None or list(runtimes) == ["all"]:
        chosen = usable if runtimes else [r for r in usable if r in DEFAULT_RUNTIMES]
        if not chosen:
            raise ProfileError("no runtime is usable here: " + "; ".join(f"{r}: {p}" for r, p in problems.items()))
        all_modules = len(modules) == len(variants)
        for r in RUNTIMES if runtimes else DEFAULT_RUNTIMES:
            if problems[r] is not None and all_modules:
                notes.append(f"{r} skipped: {problems[r]}")
        if runtimes is None and "torch-compile" in usable:
            notes.append("torch-compile not run by default (compiling each variant takes tens of seconds on CPU); "
                         "add it with --runtime torch,torch-compile,onnxruntime or --runtime all")
    else:
        chosen = list(dict.fromkeys(runtimes))
        for r in chosen:
            if problems[r] is not None:
                raise ProfileError(f"runtime {r!r} is not usable: {problems[r]}; usable here: "
                                   f"{', '.join(usable) or 'none'}")

    # -- static figures: parameters and MACs per item ------------------------------------------------
    statics: list[tuple[int | None, int | None]] = []
    with _eval_mode(modules):
        for v in variants:
            if v.module is not None:
                statics.append((counting.count_parameters(v.module), counting.count_macs(v.module, base_input)))
            else:
                statics.append((counting.count_onnx_parameters(v.onnx), None))  # type: ignore[arg-type]

    config = {
        "runtimes": chosen, "device": str(dev), "batch_sizes": sizes, "input_shape": list(shape),
        "warmup": warmup, "iters": iters, "seconds": None if iters is not None else seconds,
        "per_op": per_op, "flush_denormal": flush_denormal, "seed": seed, "interleaved": True,
        "dtype": str(dtype).removeprefix("torch."),
        "ort_thread_spinning": False,
    }
    report = ProfileReport(machine={}, config=config, notes=notes,
                           created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    if flush_denormal and dev.type == "cpu":
        notes.append(DENORMAL_NOTE)

    device_modules: dict[int, nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="repconv-profile-") as tmp, _eval_mode(modules), \
            cpu_settings(threads, flush_denormal and dev.type == "cpu") as n_threads:
        report.machine = machine_info(device=str(dev), threads=n_threads, flush_denormal=flush_denormal)
        report.machine["load_avg_1m"] = load_before
        busy = busy_note(report.machine)
        if busy:
            notes.append(busy)
        config["threads"] = n_threads
        workdir = Path(tmp)
        onnx_files: dict[int, Path] = {i: v.onnx for i, v in enumerate(variants) if v.onnx is not None}
        if "onnxruntime" in chosen:
            try:
                for i, v in enumerate(variants):
                    if v.module is not None:
                        say(f"exporting {v.label} to ONNX")
                        onnx_files[i] = _export(v.module, workdir / f"variant{i}.onnx", base_input,
                                                dynamic_batch=sizes != [1])
            except Exception as e:
                notes.append(f"onnxruntime skipped: export failed ({_first_line(e)})")
                chosen.remove("onnxruntime")

        def module_on_device(i: int) -> nn.Module:
            if i not in device_modules:
                mod = variants[i].module
                assert mod is not None
                # A copy on CUDA: the caller's module stays where it was.
                device_modules[i] = mod if dev.type == "cpu" else copy.deepcopy(mod).to(dev)
            return device_modules[i]

        compiled: dict[int, Any] = {}

        def make_runner(runtime: str, i: int, x: torch.Tensor) -> Runner:
            if runtime == "onnxruntime":
                return OrtRunner(onnx_files[i], x.numpy(), dev, n_threads, flush_denormal)
            if runtime == "torch":
                return TorchRunner(module_on_device(i), x.to(dev), dev)
            if i not in compiled:  # one compiled wrapper per variant; it recompiles per batch size itself
                compiled[i] = torch.compile(module_on_device(i), dynamic=False)
            return TorchRunner(compiled[i], x.to(dev), dev, runtime="torch-compile")

        for runtime in chosen:
            for b in sizes:
                say(f"{runtime}, batch {b}: preparing")
                x = torch.randn((b, *shape[1:]), generator=torch.Generator().manual_seed(seed + b), dtype=dtype)
                runners: list[Runner] = []
                try:
                    runners = [make_runner(runtime, i, x) for i in range(len(variants))]
                    group = _measure_group(runners, variants, statics, b, n_threads, str(dev), warmup=warmup,
                                           iters=iters, seconds=seconds, clock=clock, per_op=per_op, top=top,
                                           workdir=workdir, say=lambda m, p=f"{runtime}, batch {b}": say(f"{p}: {m}"))
                except Exception as e:  # one runtime failing (e.g. an op it lacks) must not lose the others
                    notes.append(f"{runtime}, batch {b}: skipped ({_first_line(e)})")
                    continue
                finally:
                    for r in runners:
                        r.close()
                report.results.extend(group[0])
                report.comparisons.extend(group[1])
        device_modules.clear()
        compiled.clear()
    if not report.results:
        raise MeasurementError("nothing could be measured: " + "; ".join(notes))
    return report


def _measure_group(runners: Sequence[Runner], variants: Sequence[Variant],
                   statics: Sequence[tuple[int | None, int | None]], batch: int, threads: int, device: str, *,
                   warmup: int, iters: int | None, seconds: float | None, clock: Clock, per_op: bool, top: int,
                   workdir: Path, say: Callable[[str], None]) -> tuple[list[Result], list[Comparison]]:
    """Memory, interleaved timing and (optionally) per-op profiles of one (runtime, batch size) group."""
    for r in runners:
        r()  # one-time work (compilation, kernel selection for this shape) stays out of memory and timing
    mems = [r.peak_memory_mb() for r in runners]
    say(f"timing {len(runners)} variant(s) interleaved")
    samples = measure_interleaved(runners, warmup=warmup, iters=iters, seconds=seconds,
                                  timer=runners[0].timer(clock), clock=clock)
    per_ops: list[list[dict[str, Any]] | None] = [None] * len(runners)
    if per_op:
        say("per-op profiles")
        per_ops = [[o.to_dict() for o in r.per_op(PER_OP_ITERATIONS, top, workdir)] for r in runners]
    results = []
    for v, s, mem, (params, macs), ops, r in zip(variants, samples, mems, statics, per_ops, runners, strict=True):
        st = summarize(s)
        results.append(Result(
            model=v.model, variant=v.variant, runtime=r.runtime, device=device, batch_size=batch, threads=threads,
            median_ms=st.median_ms, p90_ms=st.p90_ms, p99_ms=st.p99_ms, min_ms=st.min_ms, max_ms=st.max_ms,
            mean_ms=st.mean_ms, std_ms=st.std_ms, iqr_ms=st.iqr_ms, mad_ms=st.mad_ms, samples=st.samples,
            throughput=batch / (st.median_ms / 1e3) if st.median_ms > 0 else None, peak_mem_mb=mem,
            params=params, macs=macs, provider=r.provider, native_ops=r.native_ops, per_op=ops))
    comparisons = []
    for j in range(1, len(variants)):
        if not any(t > 0 for t in samples[0]):
            continue  # a clock too coarse to see the reference: no ratio rather than a division by zero
        comparisons.append(Comparison(
            model=variants[0].model, runtime=runners[0].runtime, device=device, batch_size=batch,
            reference=variants[0].label, candidate=variants[j].label,
            **paired_ratio(samples[0], samples[j]).to_dict()))
    return results, comparisons


def _infer_shape(model: nn.Module) -> tuple[int, ...]:
    from repconv.io import ModelLoadError, infer_input_shape

    try:
        return infer_input_shape(model)
    except ModelLoadError as e:
        raise ProfileError(str(e)) from None
