"""Importable factories for CLI tests (`tests.cli_models:small_repvgg`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Branchy(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.ident = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.k3(x) + self.k1(x)
        if self.ident is not None:
            y = y + self.ident(x)
        return F.relu(y)


def small_repvgg() -> nn.Module:
    """Two RepVGG-style blocks with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(Branchy(3, 8, 2), Branchy(8, 8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def stem_and_block() -> nn.Module:
    """A conv and its BN as two children of one Sequential (the fused region spans siblings), then a block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), Branchy(8, 8))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            raise ValueError("only 8x8 crops are supported")
        return self.conv(x)


def raises() -> nn.Module:
    """The user's forward raises its own error for inputs larger than 8x8."""
    return _Raises().eval()


class _Greedy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.empty(1 << 45, dtype=torch.uint8)  # 32 TiB: the allocator refuses at once
        return self.conv(x) + scratch[:1].float()


def greedy() -> nn.Module:
    """A forward that runs out of memory (a real allocator failure, without using any memory)."""
    return _Greedy().eval()


def mixed_dtype() -> nn.Module:
    """A float16 conv followed by a float32 BN: one dtype has to be chosen (--dtype)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3).half(), nn.BatchNorm2d(4)).eval()


def half_repvgg() -> nn.Module:
    return small_repvgg().half()


class _HeadFirst(nn.Module):
    """The head is registered before the stem: shape inference must follow execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.stem = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.stem(x)).mean(dim=(2, 3)))


def head_first() -> nn.Module:
    torch.manual_seed(0)
    return _HeadFirst().eval()


class _Interrupts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt  # what Ctrl-C does in the middle of a forward


def interrupts() -> nn.Module:
    return _Interrupts().eval()


class _Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = small_repvgg()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.5)  # fusing runs the forward several times: seconds of work to interrupt
        return self.block(x)


def slow() -> nn.Module:
    return _Slow().eval()


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.rand_like(x[:, :1])


def noisy() -> nn.Module:
    """Random output: ONNX Runtime cannot agree with PyTorch (a check failure, exit 1)."""
    return _Noisy().eval()
