"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


def tensor_leaves(out: object) -> list[torch.Tensor]:
    """Every tensor in a (nested tuple / list / dict) model output, in order."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line for the user (its type when the message is empty). A TorchScript
    interpreter error puts its TorchScript traceback first and the real error last: that one is used."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__[:limit]
    line = lines[-1] if lines[0].startswith("The following operation failed in the TorchScript") else lines[0]
    return line[:limit]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then restore every submodule's own train flag (it is the caller's)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


# --------------------------------------------------------------------------- progress steps

StepListener = Callable[[str], AbstractContextManager[None]]
_STEP_LISTENER: ContextVar[StepListener | None] = ContextVar("repconv_step_listener", default=None)


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Mark a stretch of slow work (``with step("verifying"):``). A front end that installed a listener
    with :func:`report_steps` shows it as progress; otherwise this does nothing."""
    listener = _STEP_LISTENER.get()
    if listener is None:
        yield
        return
    with listener(what):
        yield


@contextlib.contextmanager
def report_steps(listener: StepListener) -> Iterator[None]:
    """Route every :func:`step` run inside this block (same thread) to ``listener``."""
    token = _STEP_LISTENER.set(listener)
    try:
        yield
    finally:
        _STEP_LISTENER.reset(token)
