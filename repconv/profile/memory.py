"""Peak memory of inference: CPU resident-set growth, CUDA allocator high-water mark."""

from __future__ import annotations

from collections.abc import Callable

import torch

from repconv.profile.portable import cpu_peak_growth_mb

__all__ = ["cpu_peak_growth_mb", "cuda_peak_mb"]


def cuda_peak_mb(fn: Callable[[], object], device: torch.device, repeats: int = 2) -> float:
    """torch.cuda.max_memory_allocated over ``repeats`` calls (weights and activations on that device)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20
