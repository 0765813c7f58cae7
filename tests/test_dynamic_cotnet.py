"""CoTNet (2107.12292): CoT block deploy form (folded BNs, involution op) vs the unfold reference."""

from __future__ import annotations

import onnx
import pytest
import torch

from repconv import FusionRefused
from repconv.dynamic import CoTAttention, CoTAttentionDeploy, cotnet26, to_deploy
from repconv.dynamic.cotnet import unfold_aggregate
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches, max_rel_err, randomize_bn


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _pair(dim: int = 32, **kw) -> tuple[CoTAttention, CoTAttention]:
    torch.manual_seed(0)
    m = randomize_bn(CoTAttention(dim, **kw))
    ref = CoTAttention(dim, aggregation="unfold", **kw)
    ref.load_state_dict(m.state_dict())
    return m.eval(), ref.eval()


def test_unfold_aggregate_is_the_aggregation_formula():
    torch.manual_seed(0)
    v, a = torch.randn(2, 8, 5, 6), torch.randn(2, 2 * 9, 5, 6)
    got = unfold_aggregate(v, a, 3, 2)
    vp = torch.nn.functional.pad(v, (1, 1, 1, 1))
    want = torch.zeros_like(v)
    for t in range(9):
        ky, kx = divmod(t, 3)
        w = a[:, t::9].repeat_interleave(4, dim=1)  # head of channel c is c // 4
        want += w * vp[:, :, ky:ky + 5, kx:kx + 6]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(kernel_size=5, share_planes=4, key_groups=2)])
def test_block_deploy_equals_unfold_reference(kw):
    m, ref = _pair(32, **kw)
    d = m.to_deploy()
    assert isinstance(d, CoTAttentionDeploy)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in d.modules())
    assert_deploy_matches(ref, d, (32, 9, 10))
    assert_deploy_matches(ref, m, (32, 9, 10))  # the op-based training path too


def test_block_trains():
    m = CoTAttention(16, share_planes=8).train()
    m(torch.randn(2, 16, 6, 6)).square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_cotnet26_deploy_and_onnx(tmp_path):
    torch.manual_seed(0)
    net = randomize_bn(cotnet26(num_classes=10, base_width=8)).eval()
    ref = randomize_bn(cotnet26(num_classes=10, base_width=8, aggregation="unfold")).eval()
    ref.load_state_dict(net.state_dict())
    d = to_deploy(net)
    assert not any(isinstance(x, CoTAttention) for x in d.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_err(ref(x), d(x)) < 1e-4
    # already folded by to_deploy: skip export_onnx's own fusion + verification (slow on a whole net)
    data = assert_onnx_matches(d, (3, 64, 64), tmp_path / "cotnet26.onnx", fuse=False)
    nodes = onnx.load_from_string(data).graph.node  # one ai.repconv::Involution node per CoT block
    assert sum(n.op_type == "Involution" and n.domain == "ai.repconv" for n in nodes) == 8


def test_indivisible_heads_are_refused():
    with pytest.raises(FusionRefused, match="CoTAttention"):
        CoTAttention(20, share_planes=8)
