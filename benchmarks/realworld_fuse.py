"""repconv on real libraries' models against each library's own converter (issue 8).

For every model of ``tests/realworld/cases.py`` (timm re-parameterizable families, ultralytics YOLO /
RT-DETR from their yaml, torchvision classifiers, TorchScript files), prepared as the test suite does
(random weights, BatchNorm statistics measured on random images then perturbed, tiny constants
randomized), it prints:

* structure before, after ``repconv.fuse`` and after the library's converter: BatchNorm modules,
  Conv + Linear modules, and the aten convolution / matmul / batch-norm ops one forward executes;
* whether repconv reached the library's structure (no more of any of those), or, where the library's
  converter crashes or is wrong, whether it left no BatchNorm;
* max relative error (every output tensor, example and a fresh input, relative to max|ref|) of repconv
  and of the library, beside the unfused model's own fp32-vs-fp64 error;
* fuse time: ``repconv.fuse`` without and with verification, against the library's converter run
  out of place (a deepcopy then the conversion, as ``timm.utils.reparameterize_model`` does by
  default): medians of ``--reps`` interleaved runs.

Needs the second environment (``scripts/thirdparty-env``). Run:
    PYTHONPATH=$PWD .venv-thirdparty/bin/python benchmarks/realworld_fuse.py [--reps 3] [--only timm yolo]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

from repconv import fuse_with_report
from tests.realworld import cases as C
from tests.realworld import harness as H

console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets every column whole


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(case: C.Case, reps: int) -> dict:
    model, x = H.build(case)
    source = H.source_for(case, model, x)
    row: dict = {"case": case}
    try:
        fused, report = fuse_with_report(source, x, verify=False)
    except Exception as e:  # noqa: BLE001 - a row in the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
        return row
    row["report"] = report
    row["judgement"] = H.judge(model, fused, case, x)
    try:
        fuse_with_report(source, x)
        row["verified"] = "ok"
    except Exception as e:  # noqa: BLE001
        row["verified"] = type(e).__name__
    # interleaved timing: repconv without / with verification, the library's converter out of place
    runs: dict[str, list[float]] = {"fuse": [], "fuse+verify": [], "library": []}
    jobs = {"fuse": lambda: fuse_with_report(source, x, verify=False),
            "fuse+verify": lambda: fuse_with_report(source, x),
            "library": (lambda: case.anchor(copy.deepcopy(model))) if case.anchor else None}
    for rep in range(reps):
        names = list(jobs)
        for name in names[rep % 3:] + names[:rep % 3]:
            job = jobs[name]
            if job is None:
                continue
            try:
                runs[name].append(_timed(job))
            except Exception:  # noqa: BLE001 - a failing converter / verification still took its time
                runs[name].append(float("nan"))
    row["times"] = {k: statistics.median(v) if v else float("nan") for k, v in runs.items()}
    return row


def _s(st: H.Structure | None) -> str:
    if st is None:
        return "-"
    return f"{st.bn}/{st.conv_linear} | {st.aten_conv}/{st.aten_matmul}/{st.aten_bn}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=[], help="substrings of case ids (library:name)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    table = Table(title="repconv vs the library's converter  (modules bn/conv+linear | aten conv/matmul/bn)")
    for col in ("model", "before", "repconv", "library", "reached", "rel err repconv", "rel err library",
                "fp32 self err", "verify", "fuse s", "fuse+verify s", "library s", "fuse / library"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    notes = []
    reached: dict[str, list[bool]] = {}
    for case in C.all_cases():
        if args.only and not any(s in case.id for s in args.only):
            continue
        row = measure(case, args.reps)
        if "error" in row:
            table.add_row(case.id, "", f"[red]{row['error']}[/red]", *[""] * 10)
            continue
        j: H.Judgement = row["judgement"]
        t = row["times"]
        reached.setdefault(case.library, []).append(bool(j.reached))
        if j.anchor_note:
            notes.append(f"{case.id}: {case.anchor_name}: {j.anchor_note}")
        table.add_row(case.id, _s(j.before), _s(j.ours), _s(j.anchor), "yes" if j.reached else "[red]no[/red]",
                      f"{j.ours_error:.1e}", f"{j.anchor_error:.1e}" if j.anchor_error is not None else "-",
                      f"{j.self_error:.1e}", row["verified"], f"{t['fuse']:.2f}", f"{t['fuse+verify']:.2f}",
                      f"{t['library']:.3f}", f"{t['fuse'] / t['library']:.0f}x" if t["library"] else "-")
        console.print(f"measured {case.id}", style="dim")
    console.print(table)
    for n in notes:
        console.print(n)
    for library, hits in reached.items():
        console.print(f"{library}: reached the library's structure on {sum(hits)} of {len(hits)}")


if __name__ == "__main__":
    main()
