"""Where the time goes, per operator: torch.profiler for PyTorch, ORT's own trace for ONNX Runtime.

Both report *self* time per op type, averaged per inference call, with each op's share of the total.
Custom operators keep their names (``repconv::involution`` in PyTorch, ``Involution`` in ONNX Runtime
when repconv's native library is registered), so their cost is attributed to them."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Profiler bookkeeping rows that are not operators of the model.
_TORCH_SKIP_PREFIXES = ("ProfilerStep", "[memory]", "Activity Buffer Request", "cudaDeviceSynchronize",
                        "## ", "Torch-Compiled Region", "TorchDynamo Cache Lookup")


@dataclass(frozen=True)
class OpTime:
    op: str
    time_ms: float  # self time per inference call
    share: float  # fraction of the total self time of all ops
    calls: float  # invocations per inference call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def top_ops(totals_us: dict[str, float], counts: dict[str, int], iterations: int, top: int) -> list[OpTime]:
    """Rank op types by self time; shares are of the grand total, so the top-N may sum to < 1."""
    grand = sum(totals_us.values())
    ranked = sorted(totals_us.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return [OpTime(op=name, time_ms=us / 1e3 / iterations, share=(us / grand if grand > 0 else 0.0),
                   calls=counts.get(name, 0) / iterations) for name, us in ranked]


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence native writes to file descriptor 2 (kineto prints profiler_start/stop lines there)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Operator namespaces that ship with PyTorch; an op from any other namespace (repconv::involution) is a
# custom op, and the aten ops it runs inside are booked to it so its cost shows under its own name.
_BUILTIN_NAMESPACES = frozenset({"aten", "prim", "profiler", "cuda", "c10d", "_c10d_functional", "quantized",
                                 "mkldnn", "onednn", "inductor", "triton", "torch", "autograd", "detectron2"})


def _custom_owner(ev: Any) -> Any | None:
    """The outermost custom-op ancestor of a profiler event (or the event itself), if any."""
    owner = None
    node = ev
    while node is not None:
        ns, sep, _ = str(node.name).partition("::")
        if sep and ns not in _BUILTIN_NAMESPACES:
            owner = node
        node = node.cpu_parent
    return owner


def torch_per_op(fn: Callable[[], object], *, iterations: int, cuda: bool, top: int = 10) -> list[OpTime]:
    """Run ``fn`` ``iterations`` times under torch.profiler; self CPU (or CUDA kernel) time per op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # one untimed call, so lazy initialisation is not attributed to the first op
    with _quiet_stderr_fd(), profile(activities=activities) as prof:
        for _ in range(iterations):
            fn()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        name = str(ev.name)
        if name.startswith(_TORCH_SKIP_PREFIXES):
            continue
        us = float(ev.self_device_time_total if cuda else ev.self_cpu_time_total)
        owner = _custom_owner(ev)
        if owner is not None and owner is not ev:
            name = str(owner.name)  # time inside a custom op belongs to it
        elif owner is ev or us > 0:
            counts[name] += 1
        if us > 0:
            totals[name] += us
    return top_ops(totals, counts, iterations, top)


def parse_ort_trace(events: Iterable[dict[str, Any]], *,
                    skip_first_run: bool = True) -> tuple[dict[str, float], dict[str, int], int]:
    """(self time in us per op type, invocations per op type, runs counted) from an ORT profile trace.

    ORT writes one ``cat: "Node"`` event per executed kernel (name ``<node>_kernel_time``, op type in
    ``args.op_name``) and one ``cat: "Session"`` ``model_run`` event per run. The first run is
    dropped when there are several: it carries one-time allocations."""
    evs = [e for e in events if isinstance(e, dict)]
    runs = sorted((e for e in evs if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e.get("ts", 0))
    cutoff = runs[1]["ts"] if skip_first_run and len(runs) > 1 else None
    n_runs = len(runs) - (1 if cutoff is not None else 0)
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in evs:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if cutoff is not None and e.get("ts", 0) < cutoff:
            continue
        op = str((e.get("args") or {}).get("op_name") or e.get("name"))
        totals[op] += float(e.get("dur", 0))
        counts[op] += 1
    return dict(totals), dict(counts), max(1, n_runs)


def ort_per_op(make_session: Callable[[Any], Any], feed: dict[str, Any], *, iterations: int, workdir: str | Path,
               top: int = 10) -> list[OpTime]:
    """Profile ``iterations`` runs with ORT's built-in profiler and rank op types by kernel time.

    ``make_session(options_patch)`` builds a session after ``options_patch(sess_options)`` has
    turned profiling on; the trace is written under ``workdir`` and removed after parsing."""
    prefix = str(Path(workdir) / "ort_profile")

    def patch(so: Any) -> None:
        so.enable_profiling = True
        so.profile_file_prefix = prefix

    sess = make_session(patch)
    for _ in range(iterations + 1):
        sess.run(None, feed)
    trace = sess.end_profiling()
    try:
        with open(trace, encoding="utf-8") as f:
            events = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.remove(trace)
    totals, counts, runs = parse_ort_trace(events)
    return top_ops(totals, counts, runs, top)

