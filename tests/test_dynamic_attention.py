"""SENet (1709.01507), SKNet (1903.06586), ULSAM (2006.15102): conv-BN folding, merged ULSAM subspaces."""

from __future__ import annotations

import pytest
import torch

from repconv import FusionRefused
from repconv.dynamic import ULSAM, SEBottleneck, SEModule, SKConv, ULSAMDeploy
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches, max_rel_err, randomize_bn


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _no_bn(m: torch.nn.Module) -> bool:
    return not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


CASES = {
    "se_bottleneck": (lambda: SEBottleneck(16, 8, stride=2, reduction=4), (16, 9, 9)),
    "se_identity": (lambda: SEBottleneck(32, 8), (32, 6, 6)),
    "sk": (lambda: SKConv(32, groups=8, r=4, L=8), (32, 9, 8)),
    "sk_stride3": (lambda: SKConv(16, stride=2, M=3, groups=4), (16, 9, 9)),
    "ulsam": (lambda: ULSAM(16, 4), (16, 7, 9)),
}


@pytest.mark.parametrize("name", CASES)
def test_deploy_equals_training_module(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    m = randomize_bn(build()).eval()
    d = m.to_deploy()  # no example inputs: the local fold (generic repconv.fuse is tested below)
    assert _no_bn(d)
    assert_deploy_matches(m, d, shape)


def test_se_gate_is_the_papers_formula():
    torch.manual_seed(0)
    se = SEModule(32, 16).eval()
    x = torch.randn(2, 32, 5, 5)
    z = x.mean((2, 3))
    w1, w2 = se.fc1.weight.flatten(1), se.fc2.weight.flatten(1)
    s = torch.sigmoid(torch.relu(z @ w1.t() + se.fc1.bias) @ w2.t() + se.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(se(x), x * s[:, :, None, None])


def test_ulsam_deploy_merges_subspaces():
    d = ULSAM(32, 8).to_deploy()
    assert isinstance(d, ULSAMDeploy) and tuple(d.pw_weight.shape) == (8, 4) and tuple(d.dw_weight.shape) == (32, 1)


@pytest.mark.parametrize("name", ["se_bottleneck", "sk", "ulsam"])
def test_generic_fuse_folds_every_bn(name):
    pytest.importorskip("repconv.pipeline")
    from repconv import fuse

    build, shape = CASES[name]
    m = randomize_bn(build()).eval()
    x = torch.randn(2, *shape)
    fused = fuse(m, (x,))
    assert _no_bn(fused)
    with torch.no_grad():
        assert max_rel_err(m(x), fused(x)) < 1e-5


@pytest.mark.parametrize("name", ["se_bottleneck", "sk", "ulsam"])
def test_onnx_dynamic_batch(tmp_path, name):
    build, shape = CASES[name]
    m = randomize_bn(build()).eval()
    assert_onnx_matches(m.to_deploy(), shape, tmp_path / f"{name}.onnx")


def test_indivisible_subspaces_are_refused():
    with pytest.raises(FusionRefused, match="ULSAM"):
        ULSAM(10, 4)
