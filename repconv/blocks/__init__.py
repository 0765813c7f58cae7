"""Training-time re-parameterizable blocks and model builders."""

# structural re-parameterization blocks (each has reparameterize())
from .acnet import ACBlock
from .common import ConvBN, PadBN, RepBlock, randomize_bn_, reparameterize_model
from .dbb import DiverseBranchBlock
from .doconv import DOConv2d, DODConv2d
from .involution import InhomogeneousDynamicDWConv, Involution
from .mobileone import MobileOneBlock, mobileone_unit
from .models import DemoNet, PlainVGG, RepVGG, demo_model, plain_vgg_like, repvgg_a0, repvgg_a0_plain, repvgg_b3
from .qarepvgg import QARepVGGBlock
from .rednet import RedNet, rednet26, rednet38, rednet50, resnet26, resnet38, resnet50
from .replk import RepLKBlock, unireplk_branches
from .repmlp import RepMLPBlock
from .repvgg import RepVGGBlock

__all__ = [
    "ACBlock", "ConvBN", "DOConv2d", "DODConv2d", "DemoNet", "DiverseBranchBlock", "MobileOneBlock", "PadBN",
    "PlainVGG", "QARepVGGBlock", "RepBlock", "RepLKBlock", "RepMLPBlock", "RepVGG", "RepVGGBlock", "demo_model",
    "mobileone_unit", "plain_vgg_like", "randomize_bn_", "reparameterize_model", "repvgg_a0", "repvgg_a0_plain",
    "repvgg_b3", "unireplk_branches", "Involution", "InhomogeneousDynamicDWConv", "RedNet", "rednet26", "rednet38",
    "rednet50", "resnet26", "resnet38", "resnet50",
]
