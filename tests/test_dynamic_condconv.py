"""CondConv (1904.04971): per-sample-loop reference vs one-matmul + batch-as-groups deploy form."""

from __future__ import annotations

import pytest
import torch

from repconv import FusionRefused
from repconv.dynamic import CondConv2d, CondConv2dDeploy
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.mark.parametrize("kwargs", [
    dict(in_channels=8, out_channels=12, kernel_size=3),
    dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, groups=2, bias=True),
    dict(in_channels=6, out_channels=4, kernel_size=(1, 3), dilation=2),
    dict(in_channels=8, out_channels=8, kernel_size=1, num_experts=3),
])
def test_deploy_equals_per_sample_reference(kwargs):
    torch.manual_seed(0)
    m = CondConv2d(num_experts=kwargs.pop("num_experts", 4), routing_dropout=0.2, **kwargs)
    d = m.to_deploy()
    assert isinstance(d, CondConv2dDeploy) and not d.training
    assert_deploy_matches(m, d, (kwargs["in_channels"], 9, 10))


def test_naive_forward_trains():
    m = CondConv2d(4, 4, 3, num_experts=3, routing_dropout=0.2).train()
    m(torch.randn(2, 4, 6, 6)).square().mean().backward()
    assert m.weight.grad is not None and m.routing.weight.grad is not None


def test_onnx_dynamic_batch(tmp_path):
    m = CondConv2d(8, 8, 3, stride=2, num_experts=4, bias=True)
    assert_onnx_matches(m.to_deploy(), (8, 10, 10), tmp_path / "condconv.onnx")


def test_bad_groups_is_refused_with_module_name():
    with pytest.raises(FusionRefused, match="CondConv2d"):
        CondConv2d(6, 8, 3, groups=4)
