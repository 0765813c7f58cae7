"""MLP-Mixer (Tolstikhin et al., arXiv 2105.01601) and its deploy form.

Block (pre-norm):  X = X + MLP_tok(LN1(X)^T)^T  (token mixing: Linear over the patch axis)
                   X = X + MLP_ch(LN2(X))       (channel mixing: Linear over the channel axis)
MLP = Linear -> GELU -> Dropout -> Linear -> Dropout. Head: LN -> mean over patches -> Linear.

Deploy (:meth:`MlpMixer.to_deploy`): dropout removed, and each LayerNorm's affine (gamma, beta) is
folded into the next Linear *where that is exact*:

* LN2 -> channel-MLP fc1: the Linear reads the normalised axis, W diag(gamma), b + W beta. Exact.
* head LN -> mean over patches -> head Linear: the per-channel affine commutes with the mean over
  patches, so it folds into the head Linear too. Exact.
* LN1 -> token-MLP fc1: REFUSED. gamma/beta scale and shift per *channel* while this Linear mixes
  *tokens* (it is applied to every channel row): W_tok (gamma_c xhat_c + beta_c) = gamma_c W_tok xhat_c
  + beta_c W_tok 1 is a different per-channel affine *after* the Linear, which the GELU then blocks.
  No single Linear absorbs it; LN1 keeps its affine (:func:`fold_layernorm_affine` raises).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from repconv.algebra import LinearKernel, affine_then_linear

from ._common import refuse

__all__ = ["MixerBlock", "MlpBlock", "MlpMixer", "fold_layernorm_affine", "mixer_tiny"]


class MlpBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MixerBlock(nn.Module):
    """One Mixer layer on (N, S, C) tokens (S patches, C channels)."""

    def __init__(self, num_patches: int, dim: int, token_hidden: int, channel_hidden: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = MlpBlock(num_patches, token_hidden, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = MlpBlock(dim, channel_hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MlpMixer(nn.Module):
    """MLP-Mixer. Paper configurations: S/16 (C=512, D_S=256, D_C=2048, 8 layers), B/16 (768, 384,
    3072, 12); patch stem = a stride-``patch`` conv ("per-patch fully-connected"); GELU."""

    def __init__(self, img_size: int = 224, patch: int = 16, in_chans: int = 3, dim: int = 512,
                 depth: int = 8, token_hidden: int = 256, channel_hidden: int = 2048, num_classes: int = 1000,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if img_size % patch:
            raise refuse(self, f"img_size={img_size} not divisible by patch={patch}")
        self.num_patches = (img_size // patch) ** 2
        self.stem = nn.Conv2d(in_chans, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(self.num_patches, dim, token_hidden, channel_hidden, dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (N, S, C)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))

    def to_deploy(self) -> MlpMixer:
        """A copy with dropout removed and every exactly-foldable LayerNorm affine folded."""
        d = copy.deepcopy(self).eval()
        for blk in d.blocks:
            for mlp in (blk.token_mlp, blk.channel_mlp):
                mlp.drop1, mlp.drop2 = nn.Identity(), nn.Identity()
            blk.norm2, blk.channel_mlp.fc1 = fold_layernorm_affine(blk.norm2, blk.channel_mlp.fc1, reads="features")
            # blk.norm1 -> token_mlp.fc1 stays: fold_layernorm_affine(..., reads="tokens") refuses.
        d.norm, d.head = fold_layernorm_affine(d.norm, d.head, reads="features")  # exact through the mean
        return d


def fold_layernorm_affine(norm: nn.LayerNorm, linear: nn.Linear, *, reads: str) -> tuple[nn.LayerNorm, nn.Linear]:
    """Fold LayerNorm's (gamma, beta) into the Linear that consumes it.

    ``reads="features"``: the Linear's inputs are the normalised features (channel MLP; also a
    head after a mean over tokens): returns (LayerNorm without affine, Linear with W diag(gamma),
    b + W beta). ``reads="tokens"``: the Linear mixes the *other* axis (token MLP) - not exact,
    raises :class:`repconv.algebra.FusionRefused`.
    """
    if reads == "tokens":
        raise refuse("MixerBlock.norm1 -> token_mlp.fc1",
                     "LayerNorm scales/shifts per channel but this Linear mixes tokens; the affine "
                     "does not fold into it (left in place)")
    if reads != "features":
        raise ValueError(f"fold_layernorm_affine: reads must be 'features' or 'tokens', got {reads!r}")
    if len(norm.normalized_shape) != 1 or norm.normalized_shape[0] != linear.in_features:
        raise refuse("LayerNorm -> Linear", f"normalized_shape {tuple(norm.normalized_shape)} is not the "
                                            f"Linear's input features ({linear.in_features})")
    if not norm.elementwise_affine:
        return norm, linear
    dtype = linear.weight.dtype
    gamma = norm.weight.detach().double()
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(gamma)
    k = affine_then_linear(gamma, beta, LinearKernel.of(linear).double())
    plain = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    return plain.to(device=norm.weight.device, dtype=dtype), k.to_module(dtype=dtype, device=linear.weight.device)


def mixer_tiny(num_classes: int = 10, img_size: int = 32, dropout: float = 0.1) -> MlpMixer:
    """A small Mixer for tests and demos: patch 4 (64 tokens at 32x32), C=64, D_S=32, D_C=256, 4 layers."""
    return MlpMixer(img_size, 4, 3, 64, 4, 32, 256, num_classes, dropout)
