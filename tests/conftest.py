"""Shared test settings.

* Tests run tiny convolutions: one intra-op thread avoids thread-pool contention on 2-core CI.
* Tests marked ``thirdparty`` need the real libraries of the second environment
  (``scripts/thirdparty-env``: timm, ultralytics, torchvision, OpenVINO, tract). Where those are not
  installed (the README's first environment) they are deselected, and the run says so; the second
  environment runs them. With ``REPCONV_NO_SKIPS=1`` (``scripts/test-all``, i.e. CI) every skip is a
  failure: a test that did not run did not pass.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(1)

THIRDPARTY_LIBS = ("torchvision", "timm", "ultralytics", "openvino", "tract")


def _missing_libs() -> list[str]:
    return [m for m in THIRDPARTY_LIBS if importlib.util.find_spec(m) is None]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "thirdparty: needs the real third-party libraries (scripts/thirdparty-env)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing_libs()
    if not missing:
        return
    if os.environ.get("REPCONV_REQUIRE_THIRDPARTY") == "1":
        raise pytest.UsageError(f"REPCONV_REQUIRE_THIRDPARTY=1 but not installed: {', '.join(missing)}")
    keep = [i for i in items if i.get_closest_marker("thirdparty") is None]
    dropped = [i for i in items if i.get_closest_marker("thirdparty") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        config._repconv_deselected = (len(dropped), missing)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    info = getattr(config, "_repconv_deselected", None)
    if info:
        terminalreporter.write_line(
            f"{info[0]} third-party tests deselected here ({', '.join(info[1])} not installed); "
            "scripts/test-all runs them in the second environment")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("REPCONV_NO_SKIPS") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped under REPCONV_NO_SKIPS=1 (a test that did not run did not pass): {report.longrepr}"
