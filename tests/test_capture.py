"""Capture of code torch.fx cannot trace (repconv/pipeline/capture.py), on plain-torch models that
imitate the real libraries' patterns: ultralytics' index-routed layers with ``f`` / ``i`` attributes,
a head caching a grid by input shape and a block iterating a chunk list (neither traceable), a
module called several times, keyword arguments (RT-DETR's AIFI passes ``pos=``), list arguments,
attributes a parent reads (timm's ``resolution``), a branch the example never takes.

Reference: the unfused model in eval mode, on the example and a fresh input; fp32 tolerance
max|err| <= 1e-5 * max|ref| (a fold reorders a few sums: ~1e-7 relative here).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repconv import fuse_with_report
from repconv.blocks.common import randomize_bn_

RTOL = 1e-5


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).abs().max() / ref.abs().max())


def _check_outputs(model: nn.Module, fused: nn.Module, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(shape, generator=gen)
            ref, out = model(x), fused(x)
            refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
            for r, o in zip(refs, outs, strict=True):
                assert _rel(r, o) <= RTOL


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


# ----------------------------------------------------------------- ultralytics-like routing

class ChunkBlock(nn.Module):
    """C2f-style: ``list(t.chunk(2, 1))`` iterates a tensor (fx cannot trace it)."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1 = ConvBN(c, 2 * c, 1)
        self.m = nn.ModuleList(ConvBN(c, c) for _ in range(2))
        self.cv2 = ConvBN(4 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


class GridHead(nn.Module):
    """Detect-style: per-level conv-BN branches over a list input, and a grid cached by input shape
    (a shape comparison in Python: fx cannot trace it)."""

    def __init__(self, chs: tuple[int, ...], no: int = 5):
        super().__init__()
        self.cv = nn.ModuleList(nn.Sequential(ConvBN(c, c), nn.Conv2d(c, no, 1)) for c in chs)
        self.shape: torch.Size | None = None
        self.grid = torch.zeros(0)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        xs = [cv(x) for cv, x in zip(self.cv, xs, strict=True)]
        if self.shape != xs[0].shape:
            self.grid = torch.arange(sum(x.shape[2] * x.shape[3] for x in xs), dtype=xs[0].dtype)
            self.shape = xs[0].shape
        return torch.cat([x.flatten(2) for x in xs], 2) + self.grid


class RoutedNet(nn.Module):
    """Layers in an nn.Sequential that is never called as a whole; each layer's input chosen by its
    ``f`` attribute, outputs kept by index - ultralytics' ``BaseModel._predict_once``."""

    def __init__(self):
        super().__init__()
        layers = [ConvBN(3, 8, 3, 2), ChunkBlock(8), ConvBN(8, 16, 3, 2), ChunkBlock(16),
                  nn.Upsample(scale_factor=2.0), Concat(), ConvBN(24, 8, 1), GridHead((8, 16))]
        froms = [-1, -1, -1, -1, -1, [-1, 1], -1, [6, 3]]
        for i, (m, f) in enumerate(zip(layers, froms, strict=True)):
            m.f, m.i, m.type = f, i, type(m).__name__
        self.model = nn.Sequential(*layers)
        self.save = {1, 3, 6}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _ready(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn_(model, seed).eval()


def test_routed_layers_are_fused_where_they_are_called() -> None:
    model = _ready(RoutedNet())
    assert _bns(model) == 13
    x = torch.randn(2, 3, 32, 32)
    fused, report = fuse_with_report(model, x)
    assert _bns(fused) == 0  # every conv-BN, inside blocks fx cannot trace too
    assert report.regions and report.untraced[0].startswith("RoutedNet")
    layers = list(fused.model)
    assert [m.f for m in layers] == [m.f for m in model.model]  # the routing attributes survive
    assert [m.i for m in layers] == list(range(8)) and layers[0].type == "ConvBN"
    assert all(m is n for m, n in zip(model.model, [model.model[i] for i in range(8)], strict=True))
    assert _bns(model) == 13  # the user's model is untouched
    _check_outputs(model, fused, (2, 3, 32, 32))


def test_routing_attributes_survive_save_and_load() -> None:
    model = _ready(RoutedNet())
    fused, _ = fuse_with_report(model, torch.randn(1, 3, 32, 32))
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [m.f for m in loaded.model] == [m.f for m in model.model]
    _check_outputs(model, loaded, (1, 3, 32, 32))


# ----------------------------------------------------------------- calls with kwargs and lists

class PosBlock(nn.Module):
    """AIFI-like: a position term passed by keyword, a mask left at its default ``None``."""

    def __init__(self, c: int):
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        q = src if pos is None else src + pos
        if mask is not None:
            q = q * mask
        return self.bn(self.proj(q)) * scale


class KwargsParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.block = PosBlock(8)
        self.pos = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > 1:  # shape-dependent Python: the parent is not traceable
            x = self.block(x, pos=self.pos.expand_as(x), scale=0.5)
        return x


def test_keyword_arguments_reach_the_fused_submodule() -> None:
    model = _ready(KwargsParent())
    fused, report = fuse_with_report(model, torch.randn(2, 3, 16, 16))
    assert _bns(fused) == 0, report.left
    assert report.untraced[0].startswith("KwargsParent")
    _check_outputs(model, fused, (2, 3, 16, 16))


class ListHeadNet(nn.Module):
    """A head traced with a list argument: its graph reads ``xs[0]``, ``xs[1]``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(3, 8), ConvBN(3, 8, 3, 2)
        self.head = ListHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.a(x), self.b(x)]
        if feats[0].shape[-1] % 2:  # shape-dependent Python
            feats.reverse()
        return self.head(feats)


class ListHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.cv = nn.ModuleList(ConvBN(8, 4) for _ in range(2))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        for i in range(len(self.cv)):
            xs[i] = self.cv[i](xs[i]).flatten(2)
        return torch.cat(xs, 2)


def test_list_argument_is_traced_through_its_items() -> None:
    model = _ready(ListHeadNet())
    fused, report = fuse_with_report(model, torch.randn(1, 3, 16, 16))
    assert _bns(fused) == 0
    assert isinstance(fused.head, torch.fx.GraphModule)
    assert not any(u.startswith("head") for u in report.untraced)
    _check_outputs(model, fused, (1, 3, 16, 16))


# ----------------------------------------------------------------- several calls of one module

class Recurrent(nn.Module):
    """One block applied twice on different shapes; its ``skip`` flag is set by the parent between
    the calls, so one trace (made with the flag's last value) cannot compute both."""

    def __init__(self):
        super().__init__()
        self.block = StatefulBlock(8)
        self.down = ConvBN(8, 8, 3, 2)
        self.stem = ConvBN(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        outs = []
        for i in range(2):
            self.block.skip = i == 1
            x = self.block(x)
            outs.append(x.mean((2, 3)))
            if x.shape[-1] > 4:  # shape-dependent Python
                x = self.down(x)
        return torch.cat(outs, 1)


class StatefulBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = ConvBN(c, c)
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y + x if self.skip else y


def test_module_called_twice_is_checked_on_both_calls() -> None:
    model = _ready(Recurrent())
    fused, report = fuse_with_report(model, torch.randn(2, 3, 16, 16))
    # the whole block cannot serve both calls: its parts are fused instead, and that is said
    assert any(n.startswith("block: fused graph differs") and "call 1 of 2" in n for n in report.notes), report.notes
    assert not isinstance(fused.block, torch.fx.GraphModule)
    assert _bns(fused) == 0
    _check_outputs(model, fused, (2, 3, 16, 16))


class SharedTwice(nn.Module):
    """The same stateless block on two inputs of different sizes: one graph fits both calls."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(ConvBN(3, 8), ConvBN(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(x, 2)
        a, b = self.block(x), self.block(small)
        if a.shape[-1] == b.shape[-1]:
            return a - b
        return a.mean((2, 3)) + b.mean((2, 3))


def test_shared_module_fused_once_for_both_calls() -> None:
    model = _ready(SharedTwice())
    fused, report = fuse_with_report(model, torch.randn(1, 3, 16, 16))
    assert isinstance(fused.block, torch.fx.GraphModule) and _bns(fused) == 0
    assert not report.notes
    _check_outputs(model, fused, (1, 3, 16, 16))


class Entangled(nn.Module):
    """The parent calls a block as a whole and, directly, one of the block's own children."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(ConvBN(8, 8), ConvBN(8, 8))
        self.stem = ConvBN(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.block(x)
        z = self.block[1](x)
        return y + z if y.shape == z.shape else y


def test_module_called_whole_and_piecewise() -> None:
    model = _ready(Entangled())
    fused, _ = fuse_with_report(model, torch.randn(1, 3, 12, 12))
    assert _bns(fused) == 0
    _check_outputs(model, fused, (1, 3, 12, 12))


# ----------------------------------------------------------------- attributes and untaken branches

class Windowed(nn.Module):
    def __init__(self, c: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.body = ConvBN(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ReadsResolution(nn.Module):
    """timm EfficientViT-style: the parent reads ``self.mixer.resolution`` after the child ran."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.mixer = Windowed(8, 4)
        self.rare = ConvBN(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > self.mixer.resolution:
            x = F.avg_pool2d(self.mixer(x), x.shape[-1] // self.mixer.resolution)
        if x.abs().amax() > 1e6:  # a branch the example never takes
            x = self.rare(x)
        return x


def test_replaced_module_keeps_attributes_and_untaken_branch_is_reported() -> None:
    model = _ready(ReadsResolution())
    fused, report = fuse_with_report(model, torch.randn(1, 3, 16, 16))
    assert fused.mixer.resolution == 4 and isinstance(fused.mixer, torch.fx.GraphModule)
    assert copy.deepcopy(fused).mixer.resolution == 4
    assert type(fused.rare) is ConvBN and _bns(fused) == 1  # kept as it is, BN and all
    assert "rare: never called by the example inputs: kept as it is" in report.notes
    _check_outputs(model, fused, (1, 3, 16, 16))


def test_wrong_input_is_a_user_error_not_a_capture_failure() -> None:
    from repconv.pipeline import FuseInputError

    with pytest.raises(FuseInputError, match="does not accept input"):
        fuse_with_report(_ready(RoutedNet()), torch.randn(1, 4, 32, 32))


class StarArgs(nn.Module):
    """``*xs`` and a keyword-only flag: the graph cannot take the flag positionally, so the block is
    fused through its parts; ``*xs`` alone traces."""

    def __init__(self):
        super().__init__()
        self.sum_block = SumOfInputs()
        self.kw_block = KeywordOnly()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 2:  # shape-dependent Python
            return x
        return self.sum_block(x, 2 * x) + self.kw_block(x, double=True)


class SumOfInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ConvBN(3, 4)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return sum(self.body(x) for x in xs)


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ConvBN(3, 4)

    def forward(self, x: torch.Tensor, *, double: bool = False) -> torch.Tensor:
        y = self.body(x)
        return 2 * y if double else y


def test_varargs_traced_keyword_only_fused_in_parts() -> None:
    model = _ready(StarArgs())
    fused, report = fuse_with_report(model, torch.randn(1, 3, 8, 8))
    assert isinstance(fused.sum_block, torch.fx.GraphModule)
    assert any(u.startswith("kw_block: _Unsupported: keyword-only") for u in report.untraced), report.untraced
    assert _bns(fused) == 0
    _check_outputs(model, fused, (1, 3, 8, 8))
