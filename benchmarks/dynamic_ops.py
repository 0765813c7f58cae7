"""Reference vs deploy form of every dynamic operator: PyTorch and ONNX Runtime, batch 1 and 8,
one thread and all threads, in one run.

    python benchmarks/dynamic_ops.py                 # default run (~3 min on 2 cores)
    python benchmarks/dynamic_ops.py --ops condconv,psconv --seconds 1 --json out.json

Reference = the training-time module in eval mode (the paper's naive form: per-sample loops,
masked multi-dilation convs, unfold aggregation, unfolded BNs). Deploy = ``to_deploy()``.
ONNX: the reference is exported at a static batch (its Python loops unroll); the deploy form with a
dynamic batch axis (standard ops: im2col + MatMul for per-sample convs) and, for per-sample-conv
operators, also at a static batch inside ``onnx_static_batch()`` (one grouped Conv) - "ORT static".

Every cell is a median over interleaved repetitions (reference and deploy alternate, so machine
drift hits both); "x" is the median of the per-repetition ratios reference/deploy. Layer sizes are
the papers' typical placements (stage 3/4 of ResNet/ShuffleNet/Swin-like networks).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repconv.dynamic import (  # noqa: E402
    ULSAM,
    CondConv2d,
    CoTAttention,
    DRConv2d,
    DynamicDWConv2d,
    MixerBlock,
    PSConv2d,
    SEBottleneck,
    SKConv,
    WeightNetConv2d,
    onnx_static_batch,
)
from repconv.dynamic._common import adaptive_avg_pool2d  # noqa: E402
from repconv.dynamic.testing import max_rel_err, randomize_bn  # noqa: E402
from repconv.profile.stats import measure_interleaved, paired_ratio  # noqa: E402


@dataclass
class Case:
    name: str
    paper: str
    build: Callable[[], tuple[nn.Module, nn.Module]]  # (reference, deploy)
    shape: tuple[int, ...]  # one sample
    per_sample_conv: bool = False  # has a static-batch ONNX variant
    note: str = ""


def _pair(train: nn.Module, form: str | None = None) -> tuple[nn.Module, nn.Module]:
    train = randomize_bn(train).eval()
    deploy = train.to_deploy(form) if form else train.to_deploy()
    return train, deploy.eval()


def _cot() -> tuple[nn.Module, nn.Module]:
    m = randomize_bn(CoTAttention(128)).eval()
    ref = CoTAttention(128, aggregation="unfold").eval()
    ref.load_state_dict(m.state_dict())
    return ref, m.to_deploy()


class _MixerDeploy(nn.Module):
    """One Mixer block folded as MlpMixer.to_deploy folds it (LN2 affine -> channel fc1, no dropout)."""

    def __init__(self, blk: MixerBlock) -> None:
        super().__init__()
        import copy

        from repconv.dynamic import fold_layernorm_affine

        self.blk = copy.deepcopy(blk).eval()
        for mlp in (self.blk.token_mlp, self.blk.channel_mlp):
            mlp.drop1, mlp.drop2 = nn.Identity(), nn.Identity()
        self.blk.norm2, self.blk.channel_mlp.fc1 = fold_layernorm_affine(
            self.blk.norm2, self.blk.channel_mlp.fc1, reads="features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk(x)


def _mixer() -> tuple[nn.Module, nn.Module]:
    blk = randomize_bn(MixerBlock(64, 128, 64, 512, dropout=0.1)).eval()
    return blk, _MixerDeploy(blk).eval()


CASES = [
    Case("condconv-3x3", "1904.04971", lambda: _pair(CondConv2d(128, 128, 3, num_experts=8)), (128, 14, 14), True,
         "128->128 3x3, E=8, 14x14"),
    Case("condconv-1x1", "1904.04971", lambda: _pair(CondConv2d(192, 1152, 1, num_experts=8)), (192, 7, 7), True,
         "192->1152 1x1, E=8, 7x7 (CondConv-EfficientNet-B0 last stage expansion)"),
    Case("weightnet", "2007.11823", lambda: _pair(WeightNetConv2d(116, 116, 1)), (116, 14, 14), True,
         "116->116 1x1, M=G=2, 14x14"),
    Case("d-dw", "2106.04263", lambda: _pair(DynamicDWConv2d(384, 7)), (384, 14, 14), True,
         "384 ch 7x7 DW, 14x14 (DWNet-T stage 3)"),
    Case("drconv", "2003.12243", lambda: _pair(DRConv2d(64, 64, 3, region_num=8)), (64, 14, 14), True,
         "64->64 3x3, m=8, 14x14"),
    Case("cot", "2107.12292", _cot, (128, 28, 28), False, "CoT block dim 128, 28x28"),
    Case("se-bottleneck", "1709.01507", lambda: _pair(SEBottleneck(512, 128)), (512, 28, 28), False,
         "512->128->512, r=16, 28x28"),
    Case("sk", "1903.06586", lambda: _pair(SKConv(128, groups=32)), (128, 28, 28), False,
         "128 ch, M=2, G=32, 28x28"),
    Case("ulsam", "2006.15102", lambda: _pair(ULSAM(128, 4)), (128, 28, 28), False, "128 ch, g=4, 28x28"),
    Case("psconv", "2007.06191", lambda: _pair(PSConv2d(128, 128)), (128, 28, 28), False,
         "128->128 3x3 {1,2,1,4}, 28x28, grouped"),
    Case("psconv-sparse", "2007.06191", lambda: _pair(PSConv2d(128, 128), "sparse"), (128, 28, 28), False,
         "same, one 9x9 sparse conv"),
    Case("mixer-block", "2105.01601", _mixer, (64, 128), False, "S=64, C=128, D_S=64, D_C=512"),
]


# --------------------------------------------------------------------------- ONNX helpers

class _ExportablePool(nn.Module):
    """nn.AdaptiveAvgPool2d(k) with the same bins in standard ops: torch.onnx refuses adaptive
    pooling when k does not divide H (DRConv's 3x3 pooling of 14x14); swapped in for the
    *reference's* ONNX export only (its PyTorch timing keeps nn.AdaptiveAvgPool2d)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d(x, self.size)


def _exportable(module: nn.Module) -> nn.Module:
    import copy

    module = copy.deepcopy(module)
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d) and isinstance(child.output_size, int):
                setattr(parent, name, _ExportablePool(child.output_size))
    return module


def _export(module: nn.Module, x: torch.Tensor, dynamic: bool) -> bytes:
    module = _exportable(module)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if any(type(m).__name__ == "CoTAttentionDeploy" for m in module.modules()):
            from repconv.export.onnx import export_onnx  # the ai.repconv::Involution node + function

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.onnx"
                export_onnx(module, path, x, fuse=False, dynamic_batch=dynamic, target="onnxruntime")
                return path.read_bytes()
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes=axes)
    return buf.getvalue()


def _session(data: bytes, threads: int):  # noqa: ANN202
    import onnxruntime as ort

    from repconv.runtime import session_options

    # no spinning: reference and deploy sessions alternate, idle spinning workers would steal cores
    opts = session_options(spinning=False, intra_op_num_threads=threads, inter_op_num_threads=1)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- measurement

@dataclass
class Row:
    op: str
    paper: str
    config: str
    batch: int
    threads: int
    torch_ref_ms: float
    torch_deploy_ms: float
    torch_x: float
    ort_ref_ms: float | None = None
    ort_deploy_ms: float | None = None
    ort_x: float | None = None
    ort_static_ms: float | None = None
    ort_static_x: float | None = None
    max_rel_err: float = 0.0
    notes: list[str] = field(default_factory=list)


def _time_pair(fns: list[Callable[[], object]], seconds: float) -> list[float]:
    samples = measure_interleaved(fns, warmup=2, seconds=seconds, min_iters=5, max_iters=200)
    meds = [float(np.median(s)) * 1e3 for s in samples]
    ratios = [paired_ratio(samples[i], samples[0]).median for i in range(1, len(samples))]  # ref/cand
    return meds + ratios


def run(case: Case, batches: list[int], thread_counts: list[int], seconds: float, ort_enabled: bool) -> list[Row]:
    torch.manual_seed(0)
    ref, dep = case.build()
    rows = []
    for batch in batches:
        x = torch.randn(batch, *case.shape)
        with torch.no_grad():
            err = max_rel_err(ref(x), dep(x))
        sessions: dict[str, bytes] = {}
        notes: list[str] = []
        if ort_enabled:
            try:
                sessions["ref"] = _export(ref, x, dynamic=False)
            except Exception as e:  # e.g. AdaptiveAvgPool2d(3) of a 14x14 map has no ONNX form
                notes.append(f"reference not exportable: {str(e).splitlines()[0][:90]}")
            sessions["dep"] = _export(dep, x, dynamic=True)
            if case.per_sample_conv:
                with onnx_static_batch():
                    sessions["static"] = _export(dep, x, dynamic=False)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            with torch.no_grad():
                t_ref, t_dep, r_t = _time_pair([lambda x=x: ref(x), lambda x=x: dep(x)], seconds)
            row = Row(case.name, case.paper, case.note, batch, threads, t_ref, t_dep, r_t, max_rel_err=err,
                      notes=list(notes))
            if ort_enabled:
                xn = x.numpy()
                sess = {k: _session(v, threads) for k, v in sessions.items()}
                for k in ("dep", "static"):
                    if k in sess:
                        out = sess[k].run(None, {"input": xn})[0]
                        row.max_rel_err = max(row.max_rel_err, max_rel_err(dep(x).detach(), out))
                names = list(sess)
                samples = measure_interleaved([lambda s=s, xn=xn: s.run(None, {"input": xn}) for s in sess.values()],
                                              warmup=2, seconds=seconds, min_iters=5, max_iters=200)
                med = {k: float(np.median(v)) * 1e3 for k, v in zip(names, samples, strict=True)}
                by = dict(zip(names, samples, strict=True))

                def speedup(k: str, by=by) -> float | None:
                    return paired_ratio(by[k], by["ref"]).median if "ref" in by and k in by else None

                row.ort_ref_ms, row.ort_deploy_ms = med.get("ref"), med["dep"]
                row.ort_x = speedup("dep")
                row.ort_static_ms, row.ort_static_x = med.get("static"), speedup("static")
            rows.append(row)
            print(f"  {case.name:14s} b={batch} t={threads}: torch {t_ref:8.2f} -> {t_dep:8.2f} ms (x{r_t:.2f})"
                  + (f" | ORT {_fmt(row.ort_ref_ms)} -> {_fmt(row.ort_deploy_ms)} ms ({_fmt(row.ort_x, True)})"
                     if ort_enabled else ""), file=sys.stderr, flush=True)
    return rows


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _fmt(v: float | None, ratio: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if ratio else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Dynamic operators: reference (training module, eval) vs deploy form; medians in ms",
              show_lines=False)
    for col in ("op", "batch", "thr", "torch ref", "torch deploy", "x", "ORT ref", "ORT deploy (dyn batch)", "x",
                "ORT static", "x", "max rel err"):
        t.add_column(col, justify="left" if col == "op" else "right")
    last = None
    for r in rows:
        if last is not None and r.op != last:
            t.add_section()
        last = r.op
        t.add_row(r.op, str(r.batch), str(r.threads), _fmt(r.torch_ref_ms), _fmt(r.torch_deploy_ms),
                  _fmt(r.torch_x, True), _fmt(r.ort_ref_ms), _fmt(r.ort_deploy_ms), _fmt(r.ort_x, True),
                  _fmt(r.ort_static_ms), _fmt(r.ort_static_x, True), f"{r.max_rel_err:.1e}")
    console = Console(width=160)
    console.print(t)
    console.print("configs: " + "; ".join(f"{c.name}: {c.note} ({c.paper})" for c in CASES))
    for note in sorted({f"{r.op}: {n}" for r in rows for n in r.notes}):
        console.print("note: " + note)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="all", help="comma-separated subset of: " + ",".join(c.name for c in CASES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="thread counts (torch and ORT)")
    p.add_argument("--seconds", type=float, default=0.5, help="timing budget per cell and backend")
    p.add_argument("--no-ort", action="store_true", help="PyTorch only")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    wanted = None if args.ops == "all" else set(args.ops.split(","))
    cases = [c for c in CASES if wanted is None or c.name in wanted]
    if wanted and len(cases) != len(wanted):
        p.error(f"unknown op in {args.ops!r}")
    batches = [int(b) for b in args.batches.split(",")]
    threads = sorted({int(t) for t in args.threads.split(",")})
    t0 = time.perf_counter()
    load0 = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows: list[Row] = []
    for case in cases:
        rows += run(case, batches, threads, args.seconds, not args.no_ort)
    print_table(rows)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, onnxruntime {_ort_version()}, {os.cpu_count()} CPUs, flush_denormal on, "
          f"load average {load0} at start / {load} at end; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
