"""The JSON report: writing, reading back (``--import``, ``--baseline``) and regression checks."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repconv.profile.core import SCHEMA, Comparison, ProfileReport, Result
from repconv.profile.machine import machine_label
from repconv.profile.runtimes import ProfileError
from repconv.profile.stats import MAD_TO_SIGMA

# Keys every result row must carry (the bundle's standalone benchmark writes the same).
REQUIRED_RESULT_KEYS = ("model", "variant", "runtime", "device", "batch_size", "threads",
                        "median_ms", "p90_ms", "p99_ms", "throughput", "peak_mem_mb")

# Regression rule: the median must worsen by more than max(5 %, 3 robust standard deviations of the
# baseline's samples) before it is called a regression, so run-to-run noise is not flagged.
REGRESSION_MIN_REL = 0.05
REGRESSION_SIGMAS = 3.0


def _finite(obj: Any) -> Any:
    """inf / nan (e.g. a speedup over a zero-length sample) become null: strict JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: ProfileReport, path: str | os.PathLike) -> None:
    data = _finite(report.to_dict())
    Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def validate_report_dict(data: Any, where: str = "report") -> None:
    """Raise :class:`ProfileError` naming the first problem if ``data`` is not a profile report."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a JSON object, got {type(data).__name__}")
    schema = data.get("schema", SCHEMA)
    if not str(schema).startswith("repconv.profile/"):
        raise ProfileError(f"{where}: not a repconv profile report (schema {schema!r})")
    if not isinstance(data.get("machine"), dict):
        raise ProfileError(f"{where}: missing 'machine' object")
    results = data.get("results")
    if not isinstance(results, list):
        raise ProfileError(f"{where}: missing 'results' list")
    for i, row in enumerate(results):
        if not isinstance(row, dict):
            raise ProfileError(f"{where}: results[{i}] is not an object")
        missing = [k for k in REQUIRED_RESULT_KEYS if k not in row]
        if missing:
            raise ProfileError(f"{where}: results[{i}] lacks {', '.join(missing)}")
        if not isinstance(row["median_ms"], int | float) or not isinstance(row["batch_size"], int):
            raise ProfileError(f"{where}: results[{i}] has a non-numeric median_ms or batch_size")


def report_from_dict(data: dict[str, Any], where: str = "report") -> ProfileReport:
    validate_report_dict(data, where)
    return ProfileReport(
        machine=dict(data["machine"]),
        config=dict(data.get("config") or {}),
        results=[Result.from_dict(r) for r in data["results"]],
        comparisons=[Comparison.from_dict(c) for c in data.get("comparisons") or [] if isinstance(c, dict)],
        notes=[str(n) for n in data.get("notes") or []],
        created=str(data.get("created", "")),
        schema=str(data.get("schema", SCHEMA)),
    )


def load_report(path: str | os.PathLike, *, source: str | None = None) -> ProfileReport:
    """Read a report written by ``repconv profile --json`` or by a bundle's benchmark.py.

    ``source`` (default: the machine it was measured on) is stamped on every row, so imported rows
    stay distinguishable from local ones in tables and plots."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{p}: not a readable JSON report ({e})") from None
    report = report_from_dict(data, where=str(p))
    label = source or machine_label(report.machine)
    for r in report.results:
        if r.source == "local":
            r.source = label
    return report


@dataclass(frozen=True)
class BaselineCheck:
    model: str
    variant: str
    runtime: str
    device: str
    batch_size: int
    baseline_ms: float
    current_ms: float
    change: float  # relative change of the median: +0.10 = 10 % slower
    threshold: float  # relative change that counts as beyond the noise
    status: str  # "regression", "improvement" or "same"

    @property
    def key(self) -> str:
        return f"{self.model} [{self.variant}] {self.runtime} {self.device} b{self.batch_size}"


def robust_sigma_ms(r: Result) -> float:
    """Spread of the baseline's samples that a few outliers cannot inflate (MAD, else IQR, else std)."""
    if r.mad_ms is not None:
        return MAD_TO_SIGMA * r.mad_ms
    if r.iqr_ms is not None:
        return r.iqr_ms / 1.349
    return r.std_ms or 0.0


def _key(r: Result, with_model: bool = True) -> tuple[Any, ...]:
    base = (r.variant, r.runtime, r.device, r.batch_size)
    return (r.model, *base) if with_model else base


def compare_to_baseline(current: list[Result], baseline: list[Result], *, min_rel: float = REGRESSION_MIN_REL,
                        sigmas: float = REGRESSION_SIGMAS) -> list[BaselineCheck]:
    """Match rows by (model, variant, runtime, device, batch size) and flag medians beyond the noise.

    If no row matches with the model name (a renamed file), rows are matched without it."""
    with_model = any(_key(r) in {_key(b) for b in baseline} for r in current)
    base = {_key(b, with_model): b for b in baseline}
    checks: list[BaselineCheck] = []
    for r in current:
        b = base.get(_key(r, with_model))
        if b is None or b.median_ms <= 0:
            continue
        threshold_ms = max(min_rel * b.median_ms, sigmas * robust_sigma_ms(b))
        delta = r.median_ms - b.median_ms
        status = "regression" if delta > threshold_ms else "improvement" if -delta > threshold_ms else "same"
        checks.append(BaselineCheck(r.model, r.variant, r.runtime, r.device, r.batch_size, b.median_ms,
                                    r.median_ms, delta / b.median_ms, threshold_ms / b.median_ms, status))
    return checks
