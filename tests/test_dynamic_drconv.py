"""DRConv (2003.12243): straight-through training mask, argmax+gather deploy form, tie resolution."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F

from repconv import FusionRefused
from repconv.dynamic import DRConv2d
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches, ort_session


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, region_num=4), dict(kernel_size=3, stride=2, region_num=2),
                                    dict(kernel_size=1, region_num=8)])
def test_deploy_equals_reference(kwargs):
    torch.manual_seed(0)
    m = DRConv2d(8, 6, **kwargs)
    assert_deploy_matches(m, m.to_deploy(), (8, 9, 10))


def test_reference_is_the_papers_region_formula():
    """Independent check: every pixel convolved with the kernel of its argmax region."""
    torch.manual_seed(1)
    m = DRConv2d(4, 3, 3, region_num=3).eval()
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        kernels = m.region_kernels(x).reshape(2, 3, 3, 4, 3, 3)
        region = m.guide(x).argmax(1)
        want = torch.zeros(2, 3, 6, 7)
        for n in range(2):
            for r in range(3):
                full = F.conv2d(x[n:n + 1], kernels[n, r], padding=1)[0]
                want[n] += full * (region[n] == r)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_is_softmax_backward():
    torch.manual_seed(2)
    m = DRConv2d(4, 3, 3, region_num=4).train()
    x = torch.randn(2, 4, 5, 5)
    guide = m.guide(x).detach().requires_grad_(True)
    mask = m.guided_mask(guide)
    assert torch.equal(mask.detach(), F.one_hot(guide.argmax(1), 4).permute(0, 3, 1, 2).float())
    g = torch.randn_like(mask)
    (mask * g).sum().backward()
    s = torch.softmax(guide.detach(), 1)
    want = s * (g - (s * g).sum(1, keepdim=True))  # the paper's formula
    torch.testing.assert_close(guide.grad, want)


def _tied(m: DRConv2d, all_regions: bool) -> DRConv2d:
    """Make guide channels exactly equal: all of them, or regions 1 and 2 (region 0 strictly lower)."""
    with torch.no_grad():
        if all_regions:
            m.guide.weight.zero_()
            m.guide.bias.fill_(0.25)
        else:
            m.guide.weight[2] = m.guide.weight[1]
            m.guide.bias[2] = m.guide.bias[1]
            m.guide.weight[0] = 0
            m.guide.bias[0] = -1e4
    return m


@pytest.mark.parametrize("all_regions", [True, False])
def test_exact_ties_pick_the_first_region_in_torch_and_onnx(tmp_path, all_regions):
    torch.manual_seed(3)
    m = _tied(DRConv2d(4, 3, 3, region_num=3), all_regions).eval()
    d = m.to_deploy()
    x = torch.randn(2, 4, 6, 6)
    first = 0 if all_regions else 1
    with torch.no_grad():
        kernels = m.region_kernels(x).reshape(2, 3, 3, 4, 3, 3)
        want = torch.cat([F.conv2d(x[n:n + 1], kernels[n, first], padding=1) for n in range(2)])
        assert torch.equal(m.guide(x).argmax(1), torch.full((2, 6, 6), first))
        torch.testing.assert_close(d(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    data = assert_onnx_matches(d, (4, 6, 6), tmp_path / "drconv_tie.onnx")
    argmax = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "ArgMax"]
    assert argmax and all({a.name: a.i for a in n.attribute}.get("select_last_index", 0) == 0 for n in argmax)
    sess = ort_session(data)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(9, 9), (14, 14), (28, 13)])  # 14, 28: the k x k pooling bins overlap
def test_onnx_dynamic_batch(tmp_path, hw):
    torch.manual_seed(4)
    assert_onnx_matches(DRConv2d(8, 6, 3, region_num=4).to_deploy(), (8, *hw), tmp_path / "drconv.onnx")


def test_even_kernel_is_refused():
    with pytest.raises(FusionRefused, match="DRConv2d"):
        DRConv2d(4, 4, 2)
