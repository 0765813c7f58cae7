"""Dynamic depth-wise conv D-DW (2106.04263): per-sample reference vs BN-folded batch-as-groups DW conv."""

from __future__ import annotations

import pytest
import torch

from repconv.dynamic import DynamicDWConv2d
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches, randomize_bn


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.mark.parametrize("kwargs", [dict(kernel_size=7), dict(kernel_size=3, stride=2, bias=False)])
def test_deploy_equals_per_sample_reference(kwargs):
    torch.manual_seed(0)
    m = randomize_bn(DynamicDWConv2d(16, reduction=4, **kwargs))
    d = m.to_deploy()
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in d.modules())
    assert_deploy_matches(m, d, (16, 11, 12))


def test_training_uses_batch_statistics():
    m = DynamicDWConv2d(8, 3).train()
    m(torch.randn(3, 8, 6, 6)).sum().backward()
    assert m.fc1.weight.grad is not None and int(m.bn.num_batches_tracked) == 1


def test_onnx_dynamic_batch(tmp_path):
    m = randomize_bn(DynamicDWConv2d(16, 7))
    assert_onnx_matches(m.to_deploy(), (16, 9, 9), tmp_path / "ddw.onnx")
