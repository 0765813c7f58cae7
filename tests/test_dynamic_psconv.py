"""PSConv (2007.06191): masked multi-dilation reference vs the grouped fast form and the sparse kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repconv import FusionRefused
from repconv.dynamic import PSConv2d, PSConv2dDeploy, PSConv2dSparse
from repconv.dynamic.psconv import dilation_matrix
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _direct(m: PSConv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula evaluated literally: per (c, k) pair, taps at offsets i*D(c, k)."""
    k, r = m.kernel_size, m.kernel_size // 2
    dmax = max(m.pattern)
    xp = F.pad(x, (r * dmax,) * 4)
    n, _, h, w = x.shape
    out = torch.zeros(n, m.out_channels, h, w, dtype=x.dtype)
    for c in range(m.out_channels):
        for ch in range(m.in_channels):
            d = int(m.dilations[c, ch])
            for i in range(k):
                for j in range(k):
                    y0, x0 = r * dmax + (i - r) * d, r * dmax + (j - r) * d
                    out[:, c] += m.weight[c, ch, i, j] * xp[:, ch, y0:y0 + h, x0:x0 + w]
    return out


def test_dilation_matrix_cycles_over_in_and_out_channels():
    d = dilation_matrix(4, 8, (1, 2, 1, 4))
    assert d[0].tolist() == [1, 2, 1, 4, 1, 2, 1, 4]
    assert d[1].tolist() == [4, 1, 2, 1, 4, 1, 2, 1]  # each row: previous one shifted by one phase
    assert all(torch.equal(d[c + 1], d[c].roll(1)) for c in range(3))


def test_masked_reference_is_the_papers_formula():
    torch.manual_seed(0)
    m = PSConv2d(8, 4).eval()
    x = torch.randn(2, 8, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _direct(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form, cls", [("grouped", PSConv2dDeploy), ("sparse", PSConv2dSparse)])
@pytest.mark.parametrize("cfg", [
    dict(in_channels=16, out_channels=8),
    dict(in_channels=8, out_channels=12, stride=2, bias=True),
    dict(in_channels=12, out_channels=12, pattern=(1, 2, 3)),
    dict(in_channels=8, out_channels=8, pattern=(1, 1, 2, 2), kernel_size=5),  # offsets {0,1}: no subgroup
])
def test_deploy_forms_equal_reference(form, cls, cfg):
    torch.manual_seed(0)
    m = PSConv2d(**cfg)
    d = m.to_deploy(form)
    assert isinstance(d, cls)
    assert_deploy_matches(m, d, (cfg["in_channels"], 11, 9))


def test_grouped_form_uses_few_groups_for_the_default_pattern():
    d = PSConv2d(16, 16).to_deploy()
    assert d.dilation_values == [1, 2, 4]
    assert [c.groups for c in d.convs] == [2, 4, 4]  # dilation 1 at offsets {0, 2}: a coset structure
    # MACs: exactly one dense 3x3 conv in total
    assert sum(c.weight.numel() for c in d.convs) == 16 * 16 * 9


def test_grouped_form_refuses_indivisible_channels_and_names_the_module():
    m = PSConv2d(10, 8)
    with pytest.raises(FusionRefused, match="PSConv2d.*divisible"):
        m.to_deploy()
    assert_deploy_matches(m, m.to_deploy("sparse"), (10, 6, 6))  # the sparse form still works


@pytest.mark.parametrize("form", ["grouped", "sparse"])
def test_onnx_dynamic_batch(tmp_path, form):
    torch.manual_seed(0)
    m = PSConv2d(8, 8, bias=True)
    assert_onnx_matches(m.to_deploy(form), (8, 10, 10), tmp_path / f"psconv_{form}.onnx")
