"""What the CLI prints: tables that fit 80 columns without cutting numbers, progress only on a
terminal, and README examples that run as written."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from repconv.cli.main import main
from repconv.cli.progress import progress_display
from repconv.cli.tables import fit_table
from repconv.profile.core import ProfileReport, Result, profile_model
from repconv.profile.render import fmt_count, fmt_ms, results_table
from repconv.util import step
from tests.cli_models import small_repvgg

ROOT = Path(__file__).resolve().parents[1]


def _render(tables: list, width: int) -> str:
    out = Console(file=io.StringIO(), width=width, highlight=False, color_system=None)
    for t in tables:
        out.print(t)
    return out.file.getvalue()


@pytest.fixture(scope="module")
def report() -> ProfileReport:
    """A real (short) profile of the original and fused model, plus one imported row from a device."""
    rep = profile_model(small_repvgg(), (1, 3, 16, 16), runtimes=["torch"], iters=3, warmup=0, batch_sizes=[1, 4])
    device = Result(model="tests.cli_models:small_repvgg", variant="fused", runtime="onnxruntime", device="cpu",
                    batch_size=1, threads=4, median_ms=12.5, p90_ms=13.25, p99_ms=14.0, throughput=80.0,
                    peak_mem_mb=None, source="pi / Cortex-A72")
    return ProfileReport(machine=rep.machine, config=rep.config, results=[*rep.results, device],
                         comparisons=rep.comparisons, notes=[])


@pytest.mark.parametrize("width", [80, 60])
def test_profile_table_fits_without_cutting_numbers(report: ProfileReport, width: int) -> None:
    table = results_table(report, title="latency per batch")
    wide = _render([table], 400)
    assert max(len(line) for line in wide.splitlines()) > width  # it really had to be fitted
    text = _render(fit_table(table, width, keys=4), width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    tokens = set(text.split())
    for r in report.results:  # every figure appears whole (the same formatting the table uses)
        for value in (fmt_ms(r.median_ms), fmt_ms(r.p90_ms), fmt_ms(r.p99_ms), fmt_count(r.throughput)):
            assert value in tokens, (value, text)
    for c in report.comparisons:
        assert f"{c.ratio_median:.2f}" in tokens


def test_wide_enough_table_is_left_alone(report: ProfileReport) -> None:
    table = results_table(report, title="latency per batch")
    assert fit_table(table, 400) == [table]


def test_progress_only_on_a_terminal_and_only_for_slow_steps() -> None:
    def run(terminal: bool, seconds: float) -> str:
        out = Console(file=io.StringIO(), force_terminal=terminal, width=80)
        with progress_display(out, delay=0.05), step("tracing and fusing"):
            time.sleep(seconds)
        return out.file.getvalue()

    assert "tracing and fusing" in run(True, 0.5)
    assert run(True, 0.0) == ""  # under the delay: never shown
    assert run(False, 0.5) == ""  # a pipe or a log: nothing


def test_cli_steps_reach_the_display(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
    monkeypatch.setattr("repconv.cli.progress.err_console", terminal)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["fuse", "tests.cli_models:slow", "--input-shape", "1,3,16,16"])
    assert res.exit_code == 0, res.output
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.file.getvalue())
    assert "verifying" in shown  # three 0.5 s forwards of the original: over the 1 s delay
    assert res.stderr == ""  # CliRunner's own stderr is no terminal: no progress there


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    fuse_block, export_block = blocks
    ns: dict = {}
    exec(compile(fuse_block, "README.md", "exec"), ns)  # noqa: S102 - the README's own code, as written
    assert ns["check"].ok and ns["check"].max_rel < 1e-5
    # the export example at a smaller input, to keep the test short; everything else as written
    ns = {}
    exec(compile(export_block.replace("224, 224", "32, 32"), "README.md", "exec"), ns)  # noqa: S102
    assert ns["path"] == Path("out/rednet26.onnx") and (tmp_path / "out" / "rednet26.onnx").is_file()
