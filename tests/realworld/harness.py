"""How a fusion of a real library's model is judged (``/work/shared/THIRDPARTY.md``).

* :func:`prepare` gives a randomly initialised model statistics that make every term matter without
  exploding: BN affine randomized (gamma ~ N(1, 0.2), beta ~ N(0, 0.5)), running statistics measured
  on random images in train mode and then perturbed mildly, parameters that start tiny (layer scales
  of 1e-5, zero attention-bias tables, zero-initialised gates) randomized.
* :func:`structure` counts what a model still computes: BatchNorm modules, Conv + Linear modules, and
  the aten convolution / matmul / batch-norm ops one forward executes (module counts alone are fooled
  by functional calls).
* :func:`max_rel_error` compares every tensor leaf of two outputs relative to max|ref|.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from repconv.util import tensor_leaves

_BN = nn.modules.batchnorm._BatchNorm
_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Linear)
_MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "dot", "mv", "addmv"})


def _random_inputs(shapes: Sequence[Sequence[int]], gen: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(tuple(s), generator=gen, dtype=dtype) for s in shapes)


def prepare(model: nn.Module, input_shape: Sequence[int], seed: int = 0, calib_batch: int = 4,
            calib_steps: int = 2) -> nn.Module:
    """Randomize ``model`` in place as described in the module docstring; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.is_floating_point() and p.numel() and float(p.abs().max()) < 1e-3:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + 0.5)  # layer scale / zero-init table
        bns = [m for m in model.modules() if isinstance(m, _BN)]
        for m in bns:
            if m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
            if m.running_mean is not None:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        shape = (calib_batch, *tuple(input_shape)[1:])
        dtype = next(model.parameters()).dtype
        for _ in range(calib_steps):
            model(torch.randn(shape, generator=gen, dtype=dtype))
        model.eval()
        for m in bns:
            if m.running_mean is not None:
                std = m.running_var.clamp_min(1e-6).sqrt()
                m.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=gen))
                m.running_var.mul_(torch.empty(std.shape).uniform_(0.8, 1.25, generator=gen))
                m.momentum = 0.1
    return model


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if "conv" in name and "convert" not in name:
            self.ops["conv"] += 1
        elif name in _MATMUL_OPS:
            self.ops["matmul"] += 1
        elif "batch_norm" in name:
            self.ops["batch_norm"] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Structure:
    bn: int
    conv_linear: int
    aten_conv: int
    aten_matmul: int
    aten_bn: int

    def within(self, bound: Structure) -> bool:
        """No more of anything than ``bound``."""
        return all(getattr(self, f) <= getattr(bound, f) for f in self.__dataclass_fields__)

    def __str__(self) -> str:
        return (f"bn {self.bn}, conv+linear {self.conv_linear}, aten conv {self.aten_conv} / "
                f"matmul {self.aten_matmul} / bn {self.aten_bn}")


def structure(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Structure:
    mods = list(model.modules())
    counter = _OpCounter()
    with torch.no_grad(), counter:
        model(*inputs)
    return Structure(sum(isinstance(m, _BN) for m in mods), sum(isinstance(m, _CONV_LINEAR) for m in mods),
                     counter.ops["conv"], counter.ops["matmul"], counter.ops["batch_norm"])


def max_rel_error(ref: Any, out: Any) -> float:
    """Largest |ref - out| / max|ref| over every tensor leaf of the two outputs."""
    r, o = tensor_leaves(ref), tensor_leaves(out)
    assert len(r) == len(o), f"{len(r)} vs {len(o)} output tensors"
    worst = 0.0
    for a, b in zip(r, o, strict=True):
        assert a.shape == b.shape, f"output shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        a64, b64 = a.detach().double(), b.detach().double()
        scale = float(a64.abs().max()) if a64.numel() else 0.0
        worst = max(worst, float((a64 - b64).abs().max()) / scale if scale else 0.0)
    return worst


def fp64_self_error(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """The unfused model's own fp32-vs-fp64 error: the floor any fusion's error sits on."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return max_rel_error(m64(*(t.double() for t in inputs)), model(*inputs))


@dataclass
class Judgement:
    before: Structure
    ours: Structure
    anchor: Structure | None  # None: no bound from the library (its converter crashed, is wrong, or drops outputs)
    anchor_error: float | None
    ours_error: float
    self_error: float
    anchor_note: str = ""

    @property
    def reached(self) -> bool:
        """No more of anything than the library's result; without one, no BatchNorm left."""
        if self.anchor is None:
            return self.ours.bn == 0 and self.ours.aten_bn == 0
        return self.ours.within(self.anchor)


def outputs_error(model: nn.Module, candidate: nn.Module, checks: Sequence[tuple[torch.Tensor, ...]],
                  select: Callable[[Any], Any] = lambda out: out) -> float:
    with torch.no_grad():
        return max(max_rel_error(select(model(*x)), select(candidate(*x))) for x in checks)


# A converter whose result is off by more than this is wrong (a missed BN or a bad padding gives
# 1e-2 and more); below it, fp32 rounding of these random-statistics models (channels with tiny
# variance make large folded weights) reaches 5e-4 for any converter, repconv's and the libraries'.
ANCHOR_TOL = 1e-3


def judge(model: nn.Module, ours: nn.Module, case: Any, inputs: tuple[torch.Tensor, ...], seed: int = 1,
          self_error: bool = True) -> Judgement:
    """Compare repconv's result ``ours`` and the library's converter (``case.anchor``) with the unfused
    ``model``, on the example and a fresh input."""
    gen = torch.Generator().manual_seed(seed)
    checks = [inputs, _random_inputs([t.shape for t in inputs], gen, inputs[0].dtype)]
    before = structure(model, inputs)
    anchor = anchor_err = None
    note = ""
    if case.anchor is not None:
        try:
            converted = case.anchor(copy.deepcopy(model)).eval()
            with torch.no_grad():
                n_ref, n_lib = len(tensor_leaves(model(*inputs))), len(tensor_leaves(converted(*inputs)))
            anchor_err = outputs_error(model, converted, checks, case.anchor_outputs)
            if n_lib != n_ref:
                note = f"library converter drops outputs ({n_lib} of {n_ref} output tensors left)"
            elif anchor_err > ANCHOR_TOL:
                note = f"library converter is wrong: max rel error {anchor_err:.2g}"
            else:
                anchor = structure(converted, inputs)
        except Exception as e:  # noqa: BLE001 - the library's bug, recorded
            note = f"library converter crashed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    self_err = fp64_self_error(model, inputs) if self_error and inputs[0].dtype == torch.float32 else 0.0
    return Judgement(before, structure(ours, inputs), anchor, anchor_err, outputs_error(model, ours, checks),
                     self_err, note)


@dataclass
class Outcome:
    judgement: Judgement
    report: Any  # repconv.FuseReport
    fused: nn.Module
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]


def build(case: Any, seed: int = 0, dtype: torch.dtype | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``case``'s model, prepared (see :func:`prepare`), and an example input."""
    dtype = dtype or case.dtype
    torch.manual_seed(seed)
    model = prepare(case.build().to(dtype), case.input_shape, seed)
    return model, _random_inputs([case.input_shape], torch.Generator().manual_seed(seed + 100), dtype)


def evaluate(case: Any, seed: int = 0, verify: bool = True, self_error: bool = True) -> Outcome:
    """Build ``case`` (a :class:`tests.realworld.cases.Case`), fuse it with repconv as a user would (with
    verification unless ``verify=False``) and judge the result against the library's converter."""
    from repconv import fuse_with_report

    model, x = build(case, seed)
    fused, report = fuse_with_report(source_for(case, model, x), x, verify=verify)
    return Outcome(judge(model, fused, case, x, self_error=self_error), report, fused, model, x)


def exactness(case: Any, model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> float:
    """Max relative error of repconv's fusion of a float64 copy of ``model`` against that copy, on
    ``inputs`` and a fresh input: ~1e-13 when every fold is exact, >= 1e-3 for any real mistake."""
    from repconv import fuse_with_report

    m64 = copy.deepcopy(model).double()
    x64 = tuple(t.double() for t in inputs)
    fused, _ = fuse_with_report(source_for(case, m64, x64), x64, verify=False)
    checks = [x64, _random_inputs([t.shape for t in x64], torch.Generator().manual_seed(seed), torch.float64)]
    return outputs_error(m64, fused, checks)


def source_for(case: Any, model: nn.Module, x: tuple[torch.Tensor, ...]) -> nn.Module:
    from .cases import to_torchscript

    return to_torchscript(model, case.name.rpartition("-")[2], x[0]) if case.library == "torchscript" else model
