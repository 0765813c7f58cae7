"""RepVGG benchmarks for `repconv.fuse` (issue: foundation and fuse).

(a) latency: RepVGG-A0 training-time (eval) vs repconv-fused vs a hand-built plain VGG of the same
    shape; 1 thread and all threads; interleaved repetitions, medians, fused/plain ratio per pair.
    Target: fused / plain <= 1.02.
(b) fuse time and fuse+verify time for RepVGG-A0 (targets < 1 s and < 3 s on 2 cores), and fuse
    time against parameter count up to RepVGG-B3 (~110M deploy params): time per million
    parameters should stay flat (linear growth).
(c) accuracy: max relative error of the fused fp32 model against a float64 evaluation of the
    original, with the fold done in float64 (repconv) beside the same fold done in fp32 (the
    textbook converter). Target <= 1e-6.

Run: python benchmarks/fuse_repvgg.py [--reps 15] [--skip-b3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv import fuse_with_report
from repconv.blocks.common import randomize_bn_
from repconv.blocks.models import RepVGG, plain_vgg_like, repvgg_a0, repvgg_b3
from repconv.blocks.repvgg import RepVGGBlock

console = Console()


def timed(fn, *args) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def latency(models: dict[str, nn.Module], x: torch.Tensor, reps: int, threads: int) -> dict[str, list[float]]:
    """Interleave the models rep by rep (rotating their order) so machine drift hits all alike."""
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            for _ in range(3):
                m(x)
        names = list(models)
        for rep in range(reps):
            # rotate the order each repetition so no model always runs right after the same one
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name].append(timed(models[name], x) * 1e3)
    return times


def section_a(reps: int) -> None:
    torch.manual_seed(0)
    train = randomize_bn_(repvgg_a0()).eval()
    x = torch.randn(1, 3, 224, 224)
    fused = fuse_with_report(train, x)[0]
    plain = plain_vgg_like(train).eval()
    models = {"training-time": train, "repconv fused": fused, "hand-built plain": plain}
    table = Table(title="(a) RepVGG-A0 latency, 1x3x224x224, CPU (median ms over interleaved reps)")
    for col in ("threads", *models, "fused / plain (median of paired ratios)", "fused / training"):
        table.add_column(col, justify="right")
    for threads in sorted({1, torch.get_num_threads()}):
        t = latency(models, x, reps, threads)
        ratios = [f / p for f, p in zip(t["repconv fused"], t["hand-built plain"], strict=True)]
        q = statistics.quantiles(ratios, n=4)
        med = {k: statistics.median(v) for k, v in t.items()}
        table.add_row(str(threads), *(f"{med[k]:.2f}" for k in models),
                      f"{statistics.median(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})",
                      f"{med['repconv fused'] / med['training-time']:.3f}")
    console.print(table)


def section_b(skip_b3: bool) -> None:
    torch.set_num_threads(torch.get_num_threads())
    x = torch.randn(1, 3, 224, 224)
    torch.manual_seed(0)
    a0 = randomize_bn_(repvgg_a0()).eval()
    fuse_t = [timed(lambda: fuse_with_report(a0, x, verify=False)) for _ in range(3)]
    verify_t = [timed(lambda: fuse_with_report(a0, x, verify=True)) for _ in range(3)]
    table = Table(title="(b) fuse time, RepVGG-A0 (median of 3)")
    for col in ("step", "seconds", "target"):
        table.add_column(col, justify="right")
    table.add_row("fuse", f"{statistics.median(fuse_t):.3f}", "< 1 s")
    table.add_row("fuse + verify (3 samples)", f"{statistics.median(verify_t):.3f}", "< 3 s")
    console.print(table)

    scaling = Table(title="(b) fuse time vs parameters (verify off, median of 2)")
    for col in ("model", "train params (M)", "deploy params (M)", "fuse s", "s per M params"):
        scaling.add_column(col, justify="right")
    sizes: list[tuple[str, callable]] = [  # type: ignore[valid-type]
        ("A0", repvgg_a0),
        ("A2-like", lambda: RepVGG([2, 4, 14, 1], [1.5, 1.5, 1.5, 2.75])),
        ("B1-like", lambda: RepVGG([4, 6, 16, 1], [2, 2, 2, 4])),
    ]
    if not skip_b3:
        sizes.append(("B3", repvgg_b3))
    for name, build in sizes:
        torch.manual_seed(0)
        m = randomize_bn_(build()).eval()
        n = sum(p.numel() for p in m.parameters())
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fused, _ = fuse_with_report(m, x, verify=False)
            ts.append(time.perf_counter() - t0)
        dn = sum(p.numel() for p in fused.parameters())
        s = statistics.median(ts)
        scaling.add_row(name, f"{n / 1e6:.1f}", f"{dn / 1e6:.1f}", f"{s:.2f}", f"{s / (n / 1e6):.4f}")
        del m, fused
    console.print(scaling)


def fold_fp32(model: RepVGG) -> nn.Module:
    """The textbook RepVGG conversion, all in fp32 (what official converters do)."""
    out = copy.deepcopy(model)
    for block in [m for m in out.modules() if isinstance(m, RepVGGBlock)]:
        def fold(conv: nn.Conv2d | None, bn: nn.BatchNorm2d,
                 block: RepVGGBlock = block) -> tuple[torch.Tensor, torch.Tensor]:
            std = (bn.running_var + bn.eps).sqrt()
            t = (bn.weight / std).reshape(-1, 1, 1, 1)
            if conv is None:  # identity as a 3x3 kernel
                c = bn.num_features
                w = torch.zeros(c, c // block.groups, 3, 3)
                for i in range(c):
                    w[i, i % (c // block.groups), 1, 1] = 1
            else:
                w = conv.weight
            return w * t, bn.bias - bn.running_mean * bn.weight / std

        w3, b3 = fold(block.conv_kxk.conv, block.conv_kxk.bn)
        w1, b1 = fold(block.conv_1x1.conv, block.conv_1x1.bn)
        w, b = w3 + F.pad(w1, [1, 1, 1, 1]), b3 + b1
        if block.bn_identity is not None:
            wi, bi = fold(None, block.bn_identity)
            w, b = w + wi, b + bi
        conv = nn.Conv2d(block.in_channels, block.out_channels, 3, block.conv_kxk.conv.stride, 1,
                         groups=block.groups)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        block.reparam_conv = conv
        for name in ("conv_kxk", "conv_1x1", "bn_identity"):
            setattr(block, name, None)
    return out


def section_c() -> None:
    torch.manual_seed(0)
    model = randomize_bn_(repvgg_a0()).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        ours = fuse_with_report(model, x[:1], verify=False)[0](x).double()
        fp32 = fold_fp32(model)(x).double()
        orig = model(x).double()
    scale = float(truth.abs().max())

    def rel(y: torch.Tensor) -> str:
        return f"{float((y - truth).abs().max()) / scale:.2e}"

    table = Table(title="(c) max |error| / max |output| vs float64 evaluation of the original, RepVGG-A0, fp32")
    for col in ("model", "rel. error", "target"):
        table.add_column(col, justify="right")
    table.add_row("original training-time model (fp32)", rel(orig), "floor")
    table.add_row("repconv fused (fold in float64)", rel(ours), "<= 1e-6")
    table.add_row("same fold done in fp32", rel(fp32), "")
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--skip-b3", action="store_true")
    args = p.parse_args()
    torch.set_flush_denormal(True)  # random BN statistics otherwise make denormals that run ~50x slower
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, denormals flushed")
    section_a(args.reps)
    section_b(args.skip_b3)
    section_c()


if __name__ == "__main__":
    main()
