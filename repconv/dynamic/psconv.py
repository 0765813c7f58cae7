"""PSConv: poly-scale convolution (Li et al., arXiv 2007.06191).

One KxK kernel whose dilation varies cyclically over (output, input) channel pairs:

    out[c] = sum_k sum_{i,j} W[c, k, i, j] * x[k, y + i*D(c,k), x + j*D(c,k)],
    D(c, k) = pattern[(k - c) mod t],  t = len(pattern)

so along a row (fixed output channel) the input channels cycle through the pattern, and each
output channel's row is the previous one shifted by one phase (the paper's Fig. 2; default
pattern {1, 2, 1, 4}, the paper's best). Padding is "same" for every dilation.

* :class:`PSConv2d` (training): the paper's naive implementation - one full convolution per distinct
  dilation with the kernel masked to the pairs of that dilation, summed (3 dense convs for {1,2,1,4}).
* :class:`PSConv2dDeploy` (``to_deploy()``, the default): the paper's fast form (appendix). Channels
  are grouped by phase: with channel k = i*t + b in phase b, the pairs (out phase a, in phase b)
  have dilation pattern[(b - a) mod t]. For each distinct dilation d, a channel gather puts, for
  every out phase a, the in phases {a + s : pattern[s] = d} side by side, and ONE dilated group conv
  (t groups) computes that dilation's share; the t-group outputs (phase-major) are summed and
  permuted back to the interleaved channel order. Total MACs = one dense conv.
* :class:`PSConv2dSparse` (``to_deploy("sparse")``): one dense conv whose kernel embeds every
  dilation, size (K-1)*max(D)+1 (9x9 for K=3, {1,2,1,4}), mostly zeros.

Benchmarks (benchmarks/dynamic_ops.py) keep the grouped form as the default: the sparse kernel
does (9/3)^2 = 9x the MACs of the dense conv and loses even to the masked reference.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Pair, pair, refuse

__all__ = ["PSConv2d", "PSConv2dDeploy", "PSConv2dSparse", "dilation_matrix"]


def dilation_matrix(out_channels: int, in_channels: int, pattern: tuple[int, ...]) -> Tensor:
    """(O, I) int64 matrix D with D[c, k] = pattern[(k - c) mod t]."""
    t = len(pattern)
    c = torch.arange(out_channels)[:, None]
    k = torch.arange(in_channels)[None, :]
    return torch.tensor(pattern, dtype=torch.long)[(k - c) % t]


class PSConv2d(nn.Module):
    """Poly-scale conv (arXiv 2007.06191). Paper defaults: ``kernel_size=3``, ``pattern=(1, 2, 1, 4)``
    (period t=4, the best of the paper's search), ``stride=1``, no bias; it replaces the 3x3 convs
    of ResNet bottlenecks (PS-ResNet)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int | Pair = 1,
                 pattern: tuple[int, ...] = (1, 2, 1, 4), bias: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise refuse(self, f"kernel_size must be odd for 'same' padding at every dilation, got {kernel_size}")
        if not pattern or min(pattern) < 1:
            raise refuse(self, f"dilation pattern must be non-empty positive integers, got {pattern}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.pattern = pair(stride), tuple(int(p) for p in pattern)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("dilations", dilation_matrix(out_channels, in_channels, self.pattern), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # The paper's naive form: one masked dense conv per distinct dilation.
        out = None
        for d in sorted(set(self.pattern)):
            mask = (self.dilations == d).to(self.weight.dtype)[:, :, None, None]
            pad = d * (self.kernel_size - 1) // 2
            y = F.conv2d(x, self.weight * mask, None, self.stride, pad, d)
            out = y if out is None else out + y
        assert out is not None
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def to_deploy(self, form: str = "grouped") -> nn.Module:
        """``"grouped"`` (default, the paper's fast form) or ``"sparse"`` (one large sparse kernel)."""
        if form == "grouped":
            return PSConv2dDeploy.from_train(self)
        if form == "sparse":
            return PSConv2dSparse.from_train(self)
        raise ValueError(f"PSConv2d.to_deploy: unknown form {form!r} (expected 'grouped' or 'sparse')")


def _subgroup(offsets: list[int], t: int) -> list[int] | None:
    """H with offsets == s0 + H when H is a subgroup of Z_t (closed under addition), else None."""
    h = sorted({(s - offsets[0]) % t for s in offsets})
    hs = set(h)
    return h if all((a + b) % t in hs for a in h for b in h) else None


def _phase_groups(offsets: list[int], t: int, order: list[int]) -> list[tuple[list[int], list[int]]]:
    """Conv groups (out phases, in phases) for the pairs (a, a + s), s in offsets.

    When offsets = s0 + H for a subgroup H whose cosets are contiguous in ``order``, out phases of a
    coset r + H all read the same in phases r + s0 + H: t/|H| groups, no input duplicated. Otherwise
    one group per out phase, its in phases gathered (inputs duplicated across groups).
    """
    h = _subgroup(offsets, t)
    if h is not None:
        blocks = [order[q:q + len(h)] for q in range(0, t, len(h))]
        if all(sorted((a - b[0]) % t for a in b) == h for b in blocks):
            return [(b, [(b[0] + offsets[0] + e) % t for e in h]) for b in blocks]
    return [([a], [(a + s) % t for s in offsets]) for a in order]


class PSConv2dDeploy(nn.Module):
    """The paper's fast PSConv: per distinct dilation, one channel gather + one dilated group conv;
    outputs summed in phase-grouped order and permuted back to the interleaved order once."""

    def __init__(self, m: PSConv2d) -> None:
        super().__init__()
        t = len(m.pattern)
        if m.in_channels % t or m.out_channels % t:
            raise refuse(m, f"grouped deploy form needs in/out channels ({m.in_channels}, {m.out_channels}) "
                            f"divisible by the pattern period t={t}; use to_deploy('sparse') instead")
        o, i, k = m.out_channels, m.in_channels, m.kernel_size
        ot, it = o // t, i // t
        w = m.weight.detach()
        branches = [(d, [s for s in range(t) if m.pattern[s] == d]) for d in sorted(set(m.pattern))]
        # Global out-phase order: cosets of the largest subgroup any branch uses, so that branch
        # runs with the fewest groups (e.g. {1,2,1,4}: dilation 1 on offsets {0,2} -> order 0,2,1,3).
        subgroups = [h for _, off in branches if (h := _subgroup(off, t)) is not None]
        big = max(subgroups, key=len) if subgroups else [0]
        order: list[int] = []
        for r in range(t):
            if r not in order:
                order += [(r + e) % t for e in big]
        self.convs = nn.ModuleList()
        self.dilation_values = [d for d, _ in branches]
        for n, (d, offsets) in enumerate(branches):
            groups = _phase_groups(offsets, t, order)
            index = [ii * t + b for _, ins in groups for b in ins for ii in range(it)]
            self.register_buffer(f"index{n}", torch.tensor(index, dtype=torch.long), persistent=False)
            conv = nn.Conv2d(len(index), o, k, m.stride, d * (k - 1) // 2, d, groups=len(groups), bias=False)
            conv = conv.to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                row0 = 0
                for outs, ins in groups:
                    rows = torch.tensor([j * t + a for a in outs for j in range(ot)], device=w.device)
                    cols = torch.tensor([ii * t + b for b in ins for ii in range(it)], device=w.device)
                    conv.weight[row0:row0 + len(rows)] = w[rows][:, cols]
                    row0 += len(rows)
            self.convs.append(conv)
        # position q*ot + j of the summed output holds interleaved channel j*t + order[q]
        grouped = torch.tensor([j * t + a for a in order for j in range(ot)])
        self.register_buffer("out_index", torch.argsort(grouped), persistent=False)
        self.bias = nn.Parameter(m.bias.detach().clone()) if m.bias is not None else None

    @staticmethod
    def from_train(m: PSConv2d) -> PSConv2dDeploy:
        return PSConv2dDeploy(m).eval()

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for n, conv in enumerate(self.convs):
            y = conv(torch.index_select(x, 1, getattr(self, f"index{n}")))
            out = y if out is None else out + y
        assert out is not None
        out = torch.index_select(out, 1, self.out_index)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out


class PSConv2dSparse(nn.Module):
    """PSConv as ONE dense conv with a (K-1)*max(D)+1 kernel: every (c, k) pair's taps are placed at
    its own dilation around the centre, zeros elsewhere. Any channel counts; many wasted MACs."""

    def __init__(self, m: PSConv2d) -> None:
        super().__init__()
        k, dmax = m.kernel_size, max(m.pattern)
        big = (k - 1) * dmax + 1
        centre, r = big // 2, k // 2
        w = m.weight.detach()
        weight = w.new_zeros(m.out_channels, m.in_channels, big, big)
        for d in sorted(set(m.pattern)):
            mask = (m.dilations == d).to(w.dtype)[:, :, None, None]
            pos = [centre + (j - r) * d for j in range(k)]
            weight[:, :, pos[0]:pos[-1] + 1:d, pos[0]:pos[-1] + 1:d] += w * mask
        self.conv = nn.Conv2d(m.in_channels, m.out_channels, big, m.stride, centre, bias=m.bias is not None)
        self.conv = self.conv.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if m.bias is not None:
                self.conv.bias.copy_(m.bias)

    @staticmethod
    def from_train(m: PSConv2d) -> PSConv2dSparse:
        return PSConv2dSparse(copy.deepcopy(m)).eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)
