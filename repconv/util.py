"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


def tensor_leaves(out: object) -> list[torch.Tensor]:
    """Every tensor in a (nested tuple / list / dict) model output, in order."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line for the user (its type when the message is empty)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


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
