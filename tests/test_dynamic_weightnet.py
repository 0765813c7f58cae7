"""WeightNet (2007.11823): per-sample-loop reference vs batched kernel generation + one conv."""

from __future__ import annotations

import pytest
import torch

from repconv import FusionRefused
from repconv.dynamic import WeightNetConv2d
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.mark.parametrize("kwargs", [
    dict(in_channels=16, out_channels=8, kernel_size=1),                   # paper: 1x1 in ShuffleNetV2
    dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, M=4, G=2),  # M/G = 2: batched matmul path
    dict(in_channels=8, out_channels=8, kernel_size=3, groups=2, M=2, G=1),
])
def test_deploy_equals_per_sample_reference(kwargs):
    torch.manual_seed(0)
    m = WeightNetConv2d(**kwargs)
    assert_deploy_matches(m, m.to_deploy(), (kwargs["in_channels"], 9, 9))


def test_onnx_dynamic_batch(tmp_path):
    m = WeightNetConv2d(8, 8, 3, M=4, G=2)
    assert_onnx_matches(m.to_deploy(), (8, 9, 9), tmp_path / "weightnet.onnx")


def test_indivisible_grouped_fc_is_refused():
    with pytest.raises(FusionRefused, match="WeightNetConv2d"):
        WeightNetConv2d(3, 8, 1, M=2, G=2)  # 3*1*1 kernel elements per output not divisible by G
