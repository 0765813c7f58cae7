"""Pure tensor math for re-parameterization: no modules, no graphs."""

from .conv import (
    ConvGeometry,
    ConvKernel,
    FusionRefused,
    add,
    affine_then_conv,
    align,
    avg_pool,
    bn_module_scale_shift,
    bn_scale_shift,
    compose,
    compose_deferred,
    concat,
    conv_then_affine,
    crop,
    expand_dilation,
    fuse_bn_conv,
    fuse_conv_bn,
    identity,
    pad_kernel,
    to_groups,
)
from .linear import LinearKernel, affine_then_linear, compose_linear, conv_to_fc, linear_then_affine

__all__ = [
    "ConvGeometry", "ConvKernel", "FusionRefused", "LinearKernel", "add", "affine_then_conv",
    "affine_then_linear", "align", "avg_pool", "bn_module_scale_shift", "bn_scale_shift", "compose",
    "compose_deferred",
    "compose_linear", "concat", "conv_then_affine", "conv_to_fc", "crop", "expand_dilation", "fuse_bn_conv",
    "fuse_conv_bn", "identity", "linear_then_affine", "pad_kernel", "to_groups",
]
