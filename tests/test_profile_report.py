"""JSON report shape, import, baseline regression rule, per-op trace parsing, tables (no timing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from repconv.profile.core import Comparison, ProfileReport, Result
from repconv.profile.perop import parse_ort_trace, top_ops
from repconv.profile.render import baseline_table, fmt_count, per_op_tables, results_table
from repconv.profile.report import (
    REQUIRED_RESULT_KEYS,
    compare_to_baseline,
    load_report,
    validate_report_dict,
    write_report,
)
from repconv.profile.runtimes import ProfileError


def result(variant: str = "original", median: float = 2.0, mad: float = 0.01, **kw: object) -> Result:
    base = dict(model="m", variant=variant, runtime="torch", device="cpu", batch_size=1, threads=2,
                median_ms=median, p90_ms=median * 1.1, p99_ms=median * 1.3, min_ms=median * 0.9,
                max_ms=median * 2, mean_ms=median, std_ms=0.1, iqr_ms=0.02, mad_ms=mad, samples=100,
                throughput=1e3 / median, peak_mem_mb=1.5, params=1000, macs=123456)
    base.update(kw)
    return Result(**base)  # type: ignore[arg-type]


def report(*results: Result, machine: dict | None = None) -> ProfileReport:
    rep = ProfileReport(machine=machine or {"hostname": "here", "cpu_model": "Test CPU", "threads": 2},
                        config={"warmup": 1}, results=list(results), created="2024-01-01T00:00:00+00:00")
    if len(results) >= 2:
        rep.comparisons.append(Comparison(model="m", runtime="torch", device="cpu", batch_size=1,
                                          reference="m [original]", candidate="m [fused]", pairs=100,
                                          ratio_median=0.5, ratio_p25=0.45, ratio_p75=0.55, speedup=2.0))
    return rep


def test_json_shape_round_trip(tmp_path: Path) -> None:
    rep = report(result(), result("fused", 1.0))
    path = tmp_path / "r.json"
    write_report(rep, path)
    data = json.loads(path.read_text())
    assert set(data) >= {"schema", "machine", "config", "results", "comparisons", "notes"}
    assert data["schema"] == "repconv.profile/1"
    for row in data["results"]:
        assert set(REQUIRED_RESULT_KEYS) <= set(row)
        assert {"min_ms", "std_ms", "params", "macs"} <= set(row)
    assert data["comparisons"][0]["ratio_median"] == 0.5
    back = load_report(path)
    assert [r.variant for r in back.results] == ["original", "fused"]
    assert back.results[1].median_ms == 1.0
    assert all(r.source == "here / Test CPU" for r in back.results)  # imported rows name their machine


@pytest.mark.parametrize("data, message", [
    ([], "JSON object"),
    ({"schema": "other/1", "machine": {}, "results": []}, "not a repconv profile"),
    ({"machine": {}}, "'results'"),
    ({"machine": {}, "results": [{"model": "m"}]}, "lacks"),
    ({"results": []}, "'machine'"),
])
def test_validation_names_the_problem(data: object, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        validate_report_dict(data)


def test_load_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        load_report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not a readable JSON"):
        load_report(bad)


def test_baseline_flags_only_changes_beyond_noise() -> None:
    base = [result("original", 10.0, mad=0.05), result("fused", 10.0, mad=1.0)]
    # original: threshold max(5% = 0.5 ms, 3 * 1.4826 * 0.05 = 0.22 ms) = 0.5 ms -> 10.6 is a regression
    # fused: noisy baseline, threshold 3 * 1.4826 * 1.0 = 4.4 ms -> 14 ms is still within the noise
    now = [result("original", 10.6), result("fused", 14.0)]
    checks = {c.variant: c for c in compare_to_baseline(now, base)}
    assert checks["original"].status == "regression"
    assert checks["original"].threshold == pytest.approx(0.05)
    assert checks["fused"].status == "same"
    assert checks["fused"].threshold == pytest.approx(3 * 1.4826 * 1.0 / 10.0)
    faster = compare_to_baseline([result("original", 9.0)], base)
    assert faster[0].status == "improvement" and faster[0].change == pytest.approx(-0.1)


def test_baseline_matches_renamed_model_and_ignores_unmatched() -> None:
    base = [result(model="old.pt")]
    assert compare_to_baseline([result(model="new.pt", median_ms=3.0)], base)[0].status == "regression"
    assert compare_to_baseline([result(batch_size=8)], [result()]) == []


def test_parse_ort_trace_skips_first_run_and_names_custom_ops() -> None:
    def node(op: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{op}_node_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        node("Conv", 1, 90),  # first run: one-time allocations, dropped
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 10},
        node("Conv", 201, 6), node("Involution", 203, 3), node("Conv", 205, 2),
        {"cat": "Node", "name": "Conv_fence_before", "ts": 206, "dur": 1, "args": {"op_name": "Conv"}},
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 10},
        node("Conv", 301, 8), node("Involution", 305, 5),
    ]
    totals, counts, runs = parse_ort_trace(events)
    assert runs == 2
    assert totals == {"Conv": 16, "Involution": 8}
    ops = top_ops(totals, counts, runs, top=5)
    assert [o.op for o in ops] == ["Conv", "Involution"]
    assert ops[0].share == pytest.approx(16 / 24)
    assert ops[0].time_ms == pytest.approx(0.008)
    assert ops[0].calls == 1.5
    assert len(top_ops(totals, counts, runs, top=1)) == 1


def render(renderable: object) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_tables_show_ratio_imports_and_per_op() -> None:
    local = report(result(), result("fused", 1.0, per_op=[{"op": "aten::conv2d", "time_ms": 0.5, "share": 0.9,
                                                             "calls": 2.0}]))
    remote = report(result(source="pi / Cortex-A72", runtime="onnxruntime"))
    text = render(results_table(local, [remote]))
    assert "original" in text and "fused" in text
    assert "0.50 (0.45-0.55)" in text  # the per-pair ratio with its IQR
    assert "pi / Cortex-A72" in text and "source" in text
    tables = per_op_tables(local)
    assert len(tables) == 1
    assert "aten::conv2d" in render(tables[0]) and "90.0%" in render(tables[0])
    checks = compare_to_baseline([result(median_ms=3.0)], [result()])
    assert "regression" in render(baseline_table(checks))
    assert fmt_count(1_234_567) == "1.23M" and fmt_count(None) == "-"


def test_torch_per_op_books_custom_op_time_under_its_name() -> None:
    import torch

    from repconv.ops import involution
    from repconv.profile.perop import torch_per_op

    x = torch.randn(1, 4, 8, 8)
    kernel = torch.randn(1, 9, 8, 8)  # one group, K=3
    conv = torch.nn.Conv2d(4, 4, 1)

    def fn() -> None:
        with torch.inference_mode():
            conv(involution(x, kernel, 3, 1, 1, 1))

    ops = {o.op: o for o in torch_per_op(fn, iterations=2, cuda=False, top=50)}
    assert "repconv::involution" in ops and ops["repconv::involution"].calls == 1.0
    assert sum(o.share for o in ops.values()) == pytest.approx(1.0)
