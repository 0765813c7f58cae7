"""INT8 post-training quantization of RepVGG vs QARepVGG on real trained weights (issue 11).

Trains the same small network twice on scikit-learn's bundled digits (8x8 grey images, 10 classes;
shipped with the package, nothing downloaded): once from RepVGG blocks, once from QARepVGG blocks
(arXiv 2212.01593). Each is fused and exported by repconv, quantized by ONNX Runtime (static, QDQ,
per-channel weights, calibrated on training images) and evaluated on the held-out test split. Printed:

* FP32 and INT8 accuracy of both, and the INT8 drift figures (SQNR, cosine, max relative error, top-1
  agreement) on the test split, with ORT latency medians of fp32 and INT8 from one interleaved run;
* ``repconv inspect --quant``'s risk ranking, beside each layer's measured sensitivity (the output
  SQNR on the test split when that layer alone is quantized, ``repconv compare --sensitivity``), and
  whether the ranking put the layer that lost most first.

The paper's claim, scaled down: RepVGG loses accuracy in INT8 because the BNs of its identity / 1x1
branches create outlier channels; QARepVGG keeps its FP32 accuracy. The figures vary with the seed:
the run repeats everything for each of ``--seeds`` and prints the medians.

Needs scikit-learn (``pip install -e ".[bench]"``). Run: python benchmarks/quant_repvgg.py [--epochs 12]
[--seeds 0,1,2] (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv import fuse_with_report
from repconv.blocks import QARepVGGBlock, RepVGGBlock
from repconv.quant.calib import batches
from repconv.quant.ort_quant import export_fp32, input_info, quantize_fp32, run_batches, session
from repconv.quant.risk import analyze_risk
from repconv.quant.sensitivity import sensitivity

console = Console(width=200)
WIDTHS = (16, 16, 32, 32, 32, 64, 64, 64)  # stem + 7 blocks on 8x8 inputs (strides 2 at 32 and 64)


class Net(nn.Module):
    """Stem + blocks, global average pooling, linear classifier; ``block`` is RepVGG's or QARepVGG's."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        layers, cin = [], 1
        for cout in WIDTHS:
            layers.append(block(cin, cout, 3, stride=2 if cout != cin and cin > 1 else 1))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0 - 0.5) / 0.5  # pixels 0..16 -> [-1, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return x_tr.reshape(-1, 1, 8, 8), y_tr, x_te.reshape(-1, 1, 8, 8), y_te


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    net.eval()
    return time.perf_counter() - t0


def accuracy(outputs: list[list[np.ndarray]], y: np.ndarray) -> float:
    pred = np.concatenate([o[0] for o in outputs]).argmax(1)
    return float((pred == y[: len(pred)]).mean())


def run_one(block: type[nn.Module], seed: int, epochs: int) -> dict:
    x_tr, y_tr, x_te, y_te = digits(seed)
    torch.manual_seed(seed)
    net = Net(block)
    seconds = train(net, x_tr, y_tr, epochs, seed)
    example = torch.from_numpy(x_te[:1])
    fp32, _ = export_fp32(net, example)
    name, batch, _ = input_info(fp32)
    calib = x_tr[:256]
    result = quantize_fp32(fp32, calib, x_te, method="minmax", calibration="256 training images")
    test = batches(x_te, batch)
    acc_fp32 = accuracy(run_batches(session(fp32, native=True), name, test), y_te)
    acc_int8 = accuracy(run_batches(session(result.model, native=True), name, test), y_te)
    fused, report = fuse_with_report(net, example)
    risk = analyze_risk(fused, report, [torch.from_numpy(b) for b in batches(calib, 32)])
    sens = sensitivity(fp32, batches(calib, batch), test)
    by_module = {s.module: s for s in sens.layers}
    predicted = [lr.name for lr in risk.layers]
    measured = [s.module for s in sens.layers]
    return {"seconds": seconds, "fp32": acc_fp32, "int8": acc_int8, "drift": result.drift, "latency": result.latency,
            "risk": risk, "sens": sens, "by_module": by_module, "hit": predicted[:1] == measured[:1],
            "spearman": spearman(predicted, measured)}


def spearman(a: list[str], b: list[str]) -> float:
    """Rank correlation of two orderings of the same layers."""
    pos = {name: i for i, name in enumerate(b)}
    n = len(a)
    d2 = sum((i - pos[name]) ** 2 for i, name in enumerate(a))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1)) if n > 1 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; figures are medians over them")
    ap.add_argument("--top", type=int, default=5, help="risk-ranking rows shown per network")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # 8x8 images: threads only add overhead (16x slower on a loaded 2-core machine)
    seeds = [int(s) for s in args.seeds.split(",")]
    nets = {"RepVGG": RepVGGBlock, "QARepVGG": QARepVGGBlock}
    runs: dict[str, list[dict]] = {k: [] for k in nets}
    for seed in seeds:
        for label, block in nets.items():  # interleaved: seed by seed, both networks
            runs[label].append(run_one(block, seed, args.epochs))

    med = statistics.median
    table = Table(title=f"digits test split ({len(seeds)} seed(s): medians), ONNX Runtime INT8 static QDQ, "
                        "per-channel weights, minmax calibration on 256 training images", title_justify="left")
    for col in ("network", "train s", "FP32 acc %", "INT8 acc %", "drop per seed (points)", "SQNR dB", "cosine",
                "max rel err", "top-1 agree %", "fp32 ms", "INT8 ms", "INT8/fp32"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for label, rs in runs.items():
        table.add_row(label, f"{med(r['seconds'] for r in rs):.1f}", f"{100 * med(r['fp32'] for r in rs):.2f}",
                      f"{100 * med(r['int8'] for r in rs):.2f}",
                      ", ".join(f"{100 * (r['fp32'] - r['int8']):.2f}" for r in rs),
                      f"{med(r['drift'].sqnr_db for r in rs):.1f}", f"{med(r['drift'].cosine for r in rs):.5f}",
                      f"{med(r['drift'].max_rel for r in rs):.3g}",
                      f"{100 * med(r['drift'].top1_agreement for r in rs):.1f}",
                      f"{med(r['latency'].fp32_ms for r in rs):.3f}", f"{med(r['latency'].int8_ms for r in rs):.3f}",
                      f"{med(r['latency'].ratio for r in rs):.2f}")
    console.print(table)

    for label, rs in runs.items():
        r = rs[0]
        t = Table(title=f"{label}, seed {seeds[0]}: inspect --quant risk ranking vs measured sensitivity "
                        "(test-split output SQNR with that layer alone in INT8)", title_justify="left")
        for col in ("risk rank", "layer", "predicted output SQNR dB", "layer SQNR dB", "act max/med", "w max/med",
                    "worst outlier <- branch", "measured SQNR dB", "sensitivity rank"):
            t.add_column(col, justify="left" if col in ("layer", "worst outlier <- branch") else "right")
        order = [s.module for s in r["sens"].layers]
        for lr in r["risk"].layers[: args.top]:
            s = r["by_module"].get(lr.name)
            top = lr.top_outlier
            outlier = "-"
            if top is not None:
                what, o = top
                outlier = f"{what[:3]} ch {o.channel} x{o.ratio:.1f}"
                if o.top is not None:
                    outlier += f" <- {o.top.label} {100 * o.top.share:.0f}%"
            t.add_row(str(lr.rank), lr.name, f"{lr.risk_sqnr_db:.1f}", f"{lr.sqnr_db:.1f}", f"{lr.act_ratio:.1f}",
                      f"{lr.weight_ratio:.1f}", outlier, f"{s.drift.sqnr_db:.1f}" if s else "-",
                      str(order.index(lr.name) + 1) if lr.name in order else "-")
        console.print(t)
        hits = sum(x["hit"] for x in rs)
        rho = ", ".join(f"{x['spearman']:.2f}" for x in rs)
        console.print(f"{label}: the risk ranking named the layer that lost most first in {hits}/{len(rs)} seed(s); "
                      f"rank correlation of predicted vs measured per seed: {rho}")


if __name__ == "__main__":
    main()
