"""MLP-Mixer (2105.01601): LayerNorm affine folds into the channel-MLP and head Linears, never the token MLP."""

from __future__ import annotations

import pytest
import torch

from repconv import FusionRefused
from repconv.dynamic import MixerBlock, fold_layernorm_affine, mixer_tiny
from repconv.dynamic.testing import assert_deploy_matches, assert_onnx_matches, randomize_bn


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: small tensors, and far less sensitive to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model():
    torch.manual_seed(0)
    return randomize_bn(mixer_tiny(num_classes=10, img_size=32, dropout=0.3))


def test_deploy_equals_training_model_in_eval():
    m = _model()
    d = m.to_deploy()
    assert not any(isinstance(x, torch.nn.Dropout) for x in d.modules())
    for blk in d.blocks:
        assert not blk.norm2.elementwise_affine  # folded into channel_mlp.fc1
        assert blk.norm1.elementwise_affine  # token-mixing LN keeps its affine
    assert not d.norm.elementwise_affine  # folded through the mean into the head
    assert_deploy_matches(m, d, (3, 32, 32))


def test_fold_matches_a_literal_layernorm_then_linear():
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 5)
    randomize_bn(norm)
    plain, folded = fold_layernorm_affine(norm, lin, reads="features")
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(plain(x)), lin(norm(x)))


def test_token_mixing_fold_is_refused_because_it_would_be_wrong():
    torch.manual_seed(0)
    blk = randomize_bn(MixerBlock(num_patches=6, dim=4, token_hidden=5, channel_hidden=8)).eval()
    with pytest.raises(FusionRefused, match="mixes tokens"):
        fold_layernorm_affine(blk.norm1, blk.token_mlp.fc1, reads="tokens")
    # Why: with the affine, every channel row c of the token Linear's output is
    # gamma_c * W xhat_c + (beta_c * W 1 + b): a per-channel affine AFTER the Linear, which the GELU
    # then blocks - no single token Linear (shared by all channels) absorbs a per-channel gamma.
    x = torch.randn(2, 6, 4)
    xhat = torch.nn.functional.layer_norm(x, (4,))
    fc1 = blk.token_mlp.fc1
    with torch.no_grad():
        got = fc1(blk.norm1(x).transpose(1, 2))  # (N, C, hidden)
        w, b, g, be = fc1.weight, fc1.bias, blk.norm1.weight, blk.norm1.bias
        want = g[:, None] * (xhat.transpose(1, 2) @ w.t()) + (be[:, None] * w.sum(1) + b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(blk.norm1.weight, blk.norm1.weight.mean())  # gamma really varies per channel


def test_dropout_is_active_in_training_only():
    m = _model().train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_onnx_dynamic_batch(tmp_path):
    assert_onnx_matches(_model().to_deploy(), (3, 32, 32), tmp_path / "mixer.onnx")
