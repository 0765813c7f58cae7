"""Training-time blocks: deploy conversion is exact, forward passes trace, gradients flow; model
builders; and the third-party formulations in tests/thirdparty.

Tolerance: deploy vs. training-time eval outputs must agree to max|err| / max|ref| <= 1e-5 in fp32.
The folding itself runs in float64, so what remains is fp32 rounding of (a) the folded weights
(relative 6e-8 each) and (b) the two forward passes, which sum the same products in different
orders and through different intermediate roundings (several branch convs + BN + adds vs one conv).
For the fan-ins here (<= a few hundred terms) both stay around 1e-7..1e-6 of the output scale
(observed <= 7e-7, A0-deep <= 1e-6), so 1e-5 leaves ~10x headroom. A real mistake -- wrong tap,
wrong channel/group mapping, a dropped branch, BN applied with the wrong eps or from batch
statistics -- gives errors of 1e-3 and larger with the random BN statistics of ``randomize_bn_``
(the eps test below raises eps to 0.1 so even that term is far above the tolerance).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from repconv.algebra import ConvKernel, affine_then_conv, bn_module_scale_shift, compose, conv_then_affine
from repconv.blocks import (
    ACBlock,
    DemoNet,
    DiverseBranchBlock,
    DOConv2d,
    DODConv2d,
    MobileOneBlock,
    RepBlock,
    RepLKBlock,
    RepMLPBlock,
    RepVGGBlock,
    demo_model,
    mobileone_unit,
    plain_vgg_like,
    randomize_bn_,
    reparameterize_model,
    repvgg_a0,
    repvgg_a0_plain,
    repvgg_b3,
    unireplk_branches,
)
from tests.thirdparty import SETITEM_CASES, THIRD_PARTY_CASES

TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def prepared(block: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and non-trivial values for factors that start at a fixed point."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("D") or name.endswith("conv1.weight"):  # DO-Conv D = 0, DBB 1x1 = identity
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return randomize_bn_(block, seed).eval()


BLOCKS = {
    "repvgg": (lambda: RepVGGBlock(8, 8), (2, 8, 12, 20)),
    "repvgg_s2_g2": (lambda: RepVGGBlock(8, 16, stride=2, groups=2), (2, 8, 13, 16)),
    "repvgg_g4_identity": (lambda: RepVGGBlock(8, 8, groups=4), (2, 8, 9, 11)),
    "repvgg_k3x5_dil2": (lambda: RepVGGBlock(8, 8, (3, 5), dilation=2), (2, 8, 12, 14)),
    "repvgg_pad2": (lambda: RepVGGBlock(8, 8, 3, padding=2), (2, 8, 9, 9)),
    "acb_k3": (lambda: ACBlock(8, 16, 3), (2, 8, 12, 20)),
    "acb_k5_s2_g2": (lambda: ACBlock(8, 16, 5, stride=2, groups=2, gamma_init=1 / 3), (2, 8, 13, 17)),
    "acb_k3x5": (lambda: ACBlock(8, 8, (3, 5)), (2, 8, 10, 12)),
    "dbb": (lambda: DiverseBranchBlock(8, 16, 3), (2, 8, 12, 20)),
    "dbb_k5_s2_g2": (lambda: DiverseBranchBlock(8, 16, 5, stride=2, groups=2), (2, 8, 15, 16)),
    "dbb_depthwise": (lambda: DiverseBranchBlock(8, 8, 3, groups=8, act=True), (2, 8, 12, 20)),
    "dbb_k3x5_internal": (lambda: DiverseBranchBlock(8, 8, (3, 5), internal_channels=12), (2, 8, 11, 13)),
    "dbb_pad2": (lambda: DiverseBranchBlock(4, 8, 3, padding=2), (2, 4, 9, 9)),
    "doconv": (lambda: DOConv2d(8, 16, 3, padding=1, D_mul=12, bias=True), (2, 8, 12, 20)),
    "doconv_s2_g4": (lambda: DOConv2d(8, 16, 3, stride=2, padding=1, groups=4), (2, 8, 13, 16)),
    "doconv_reflect": (lambda: DOConv2d(8, 8, 3, padding=1, padding_mode="reflect"), (2, 8, 9, 11)),
    "dodconv": (lambda: DODConv2d(8, 3, padding=1, depth_multiplier=2), (2, 8, 9, 11)),
    "repmlp": (lambda: RepMLPBlock(8, 16, 8, 12, 4, 4), (2, 8, 8, 12)),
    "repmlp_single_partition": (lambda: RepMLPBlock(8, 8, 4, 6, 4, 6, reparam_conv_k=(1, 3), fc3_groups=1),
                                (2, 8, 4, 6)),
    "repmlp_nonsquare_parts": (lambda: RepMLPBlock(4, 8, 6, 8, 3, 2, reparam_conv_k=(3,), fc3_groups=2,
                                                   fc1_fc2_reduction=2), (2, 4, 6, 8)),
    "mobileone_dw": (lambda: MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=4), (2, 8, 12, 20)),
    "mobileone_dw_s2": (lambda: MobileOneBlock(8, 8, 3, stride=2, groups=8, num_conv_branches=2), (2, 8, 13, 16)),
    "mobileone_pw": (lambda: MobileOneBlock(8, 16, 1, num_conv_branches=3), (2, 8, 9, 11)),
    "mobileone_pw_identity": (lambda: MobileOneBlock(8, 8, 1, num_conv_branches=2), (2, 8, 9, 11)),
    "replk": (lambda: RepLKBlock(8, kernel_size=13, small_kernel=5), (2, 8, 16, 20)),
    "replk_s2_dense": (lambda: RepLKBlock(4, 8, kernel_size=7, stride=2, groups=1, small_kernel=3), (2, 4, 15, 16)),
    "unireplk_13": (lambda: RepLKBlock.unireplk(8, 13), (2, 8, 16, 20)),
    "unireplk_7": (lambda: RepLKBlock.unireplk(8, 7), (2, 8, 11, 9)),
}


def _make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = BLOCKS[name]
    torch.manual_seed(seed)
    block = prepared(factory(), seed)
    return block, torch.randn(shape)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_reparameterize_equals_eval(name):
    block, x = _make(name)
    with torch.no_grad():
        ref = block(x)
        deploy = copy.deepcopy(block)
        deploy.reparameterize()
        out = deploy(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL
    # deploy form: exactly one conv (RepMLP: fc3), no BatchNorm left, nothing of the branches
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].bias is not None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    assert deploy.deployed
    assert sum(p.numel() for p in deploy.parameters()) < sum(p.numel() for p in block.parameters())


@pytest.mark.parametrize("name", list(BLOCKS))
def test_fx_trace_training_and_deploy(name):
    block, x = _make(name, seed=1)
    with torch.no_grad():
        ref = block(x)
        traced = fx.symbolic_trace(block)
        assert torch.equal(traced(x), ref)
        ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
        assert operator.setitem not in ops
        deploy = copy.deepcopy(block)
        deploy.reparameterize()
        traced_deploy = fx.symbolic_trace(deploy)
        assert rel_err(traced_deploy(x), ref) <= TOL


@pytest.mark.parametrize("name", ["repvgg_s2_g2", "acb_k3", "dbb_k5_s2_g2", "dbb_depthwise", "doconv", "dodconv",
                                  "repmlp", "mobileone_dw", "replk", "unireplk_7"])
def test_train_mode_gradients_then_exact_deploy(name):
    """Every parameter learns in train mode; after a few SGD steps (BN statistics updated from the
    batches), the deploy conversion is still exact."""
    block, x = _make(name, seed=2)
    block.train()
    opt = torch.optim.SGD(block.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        out = block(x)
        (out.square().mean() + out.mean()).backward()
        for pname, p in block.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
        opt.step()
    block.eval()
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        assert rel_err(block(x), ref) <= TOL


def test_bn_eps_is_honoured():
    for name in ["dbb", "repmlp", "mobileone_dw", "repvgg"]:
        block, x = _make(name, seed=3)
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = 0.1
        with torch.no_grad():
            ref = block(x)
            block.reparameterize()
            assert rel_err(block(x), ref) <= TOL, name


def test_float64_blocks_fold_to_roundoff():
    for name in ["dbb_k5_s2_g2", "repmlp", "unireplk_13", "doconv_s2_g4"]:
        block, x = _make(name, seed=4)
        block, x = block.double(), x.double()
        with torch.no_grad():
            ref = block(x)
            block.reparameterize()
            out = block(x)
        assert out.dtype == torch.float64
        assert rel_err(out, ref) <= 1e-12, name


@pytest.mark.parametrize("name", ["repvgg", "acb_k5_s2_g2", "dbb", "dbb_depthwise", "doconv", "repmlp",
                                  "mobileone_pw", "unireplk_7"])
def test_deploy_flag_loads_deployed_state(name):
    """``deploy=True`` builds the deploy structure directly, so deployed checkpoints load."""
    block, x = _make(name, seed=5)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        block.reparameterize()  # idempotent
        factory, _ = BLOCKS[name]
        fresh = factory()
        if not isinstance(fresh, RepBlock):
            pytest.skip("not a RepBlock")
        fresh.reparameterize()
        fresh.load_state_dict(block.state_dict())
        assert rel_err(fresh.eval()(x), ref) <= TOL


def test_deploy_constructor_argument():
    b = RepVGGBlock(8, 8, deploy=True)
    assert b.deployed and b.conv_kxk is None and isinstance(b.reparam_conv, nn.Conv2d)
    d = DiverseBranchBlock(8, 8, 3, deploy=True)
    assert set(dict(d.named_children())) == {"reparam_conv", "act"}


def test_invalid_configurations():
    with pytest.raises(ValueError, match="odd"):
        RepVGGBlock(4, 4, 2)
    with pytest.raises(ValueError, match="padding"):
        ACBlock(4, 4, 5, padding=1)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        DiverseBranchBlock(4, 8, 3, groups=8)
    with pytest.raises(ValueError, match="tile"):
        RepMLPBlock(4, 4, 8, 8, 3, 4)
    with pytest.raises(ValueError, match="spans"):
        RepLKBlock(4, kernel_size=7, small_kernel=None, dilated_branches=[(3, 4)])
    with pytest.raises(ValueError):
        unireplk_branches(6)


def test_block_defaults_follow_papers():
    b = RepVGGBlock(8, 8)
    assert b.conv_kxk.conv.kernel_size == (3, 3) and b.conv_1x1.conv.padding == (0, 0)
    assert RepVGGBlock(8, 16).bn_identity is None and RepVGGBlock(8, 8, stride=2).bn_identity is None
    acb = ACBlock(4, 4)
    assert acb.conv_ver.conv.kernel_size == (3, 1) and acb.conv_hor.conv.kernel_size == (1, 3)
    dbb = DiverseBranchBlock(4, 4)
    w = dbb.branch_1x1_kxk.conv1.weight[:, :, 0, 0]
    assert torch.equal(w, torch.eye(4))  # the 1x1 of the 1x1-KxK branch starts as the identity
    assert DiverseBranchBlock(4, 4, groups=4).branch_1x1 is None
    assert DiverseBranchBlock(4, 4, groups=4).branch_1x1_kxk.conv1.out_channels == 8
    do = DOConv2d(4, 6, 3)
    assert do.D_mul == 9 and torch.count_nonzero(do.D) == 0 and do.bias is None
    assert DOConv2d(4, 6, 1).D is None
    mlp = RepMLPBlock(8, 8, 14, 14, 7, 7)
    assert [b.conv.kernel_size[0] for b in mlp.local] == [1, 3, 5] and mlp.fc3.groups == 4
    mo = MobileOneBlock(8, 8, 1)
    assert mo.conv_scale is None and mo.bn_identity is not None
    lk = RepLKBlock(8)
    assert lk.large.conv.kernel_size == (31, 31) and lk.small[0].conv.kernel_size == (5, 5)
    assert lk.large.conv.groups == 8
    assert unireplk_branches(13) == ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))
    unit = mobileone_unit(8, 16, stride=2, num_conv_branches=4)
    assert unit[0].conv_branches[0].conv.groups == 8 and len(unit[0].conv_branches) == 4


def test_pad_bn_equals_bn_then_pad_with_shift():
    """PadBN (zero-pad, then BN) is DBB's BN-and-pad: BN output padded with BN(0) per channel."""
    from repconv.blocks import PadBN

    layer = randomize_bn_(PadBN(6, (1, 2)), 7).eval()
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        scale, shift = bn_module_scale_shift(layer.bn, torch.float32)
        inner = layer.bn(x)
        expect = shift.reshape(1, -1, 1, 1).expand(2, 6, 7, 11).clone()
        expect[:, :, 1:-1, 2:-2] = inner
        torch.testing.assert_close(layer(x), expect)


# --------------------------------------------------------------------------- models

def test_repvgg_a0_reparameterizes_exactly_and_matches_plain():
    torch.manual_seed(0)
    model = randomize_bn_(repvgg_a0(), 3).eval()
    assert sum(p.numel() for p in model.parameters()) == 9_108_968
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        deploy = reparameterize_model(copy.deepcopy(model))
        out = deploy(x)
        assert rel_err(out, ref) <= TOL
        plain = plain_vgg_like(deploy).eval()
        torch.testing.assert_close(plain(x), out, rtol=0, atol=0)
    assert sum(p.numel() for p in deploy.parameters()) == 8_309_384
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())


def test_repvgg_a0_plain_shape():
    plain = repvgg_a0_plain()
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 22
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert [c.stride[0] for c in convs].count(2) == 5
    assert sum(p.numel() for p in plain.parameters()) == 8_309_384
    assert plain(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_repvgg_b3_sizes_on_meta_device():
    with torch.device("meta"):
        train = repvgg_b3()
        deploy = repvgg_b3(deploy=True)
    assert sum(p.numel() for p in train.parameters()) == 123_085_288
    assert sum(p.numel() for p in deploy.parameters()) == 110_960_872  # the paper's 110.96M
    assert len([m for m in train.modules() if isinstance(m, RepVGGBlock)]) == 28


def test_demo_model():
    model = demo_model()
    assert isinstance(model, DemoNet) and not model.training
    again = demo_model()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 20 and all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"RepVGGBlock", "ACBlock", "DiverseBranchBlock", "DOConv2d", "MobileOneBlock", "RepLKBlock",
            "BatchNorm1d", "Linear"} <= kinds
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (1, 10)
        assert torch.equal(fx.symbolic_trace(model)(x), ref)
        deploy = reparameterize_model(copy.deepcopy(model))
        assert rel_err(deploy(x), ref) <= TOL
    # the blocks fold; the DO-Conv's trailing BN and the Linear+BN1d head are left for the graph pass
    assert sum(isinstance(m, nn.Conv2d) for m in deploy.modules()) == 8
    assert not torch.equal(demo_model(seed=1)(x), ref)


# --------------------------------------------------------------------------- third-party formulations

class _SetitemTracer(fx.Tracer):
    """fx tracer that records ``t[idx] = v`` (stock proxies refuse item assignment)."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        tracer = self

        class _P(fx.Proxy):
            def __setitem__(self, key, value):
                tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

        return _P(node, self)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _SetitemTracer()
    return fx.GraphModule(model, tracer.trace(model))


def _conv_sites(model: nn.Module) -> int:
    gm = _trace(model)
    mods = dict(gm.named_modules())
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d):
            n += 1
        elif node.op == "call_function" and node.target is torch.nn.functional.conv2d:
            n += 1
    return n


@pytest.mark.parametrize("case", THIRD_PARTY_CASES, ids=[c[0] for c in THIRD_PARTY_CASES])
def test_third_party_cases_run_and_trace(case):
    name, factory, shape, expected = case
    model = factory()
    assert not model.training
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        assert torch.isfinite(ref).all()
        assert torch.equal(factory()(x), ref)  # factories are deterministic
        if name in SETITEM_CASES:
            with pytest.raises(Exception, match="item assignment"):
                fx.symbolic_trace(model)
            gm = _trace(model)
            assert any(n.target is operator.setitem for n in gm.graph.nodes)
        else:
            gm = fx.symbolic_trace(model)
        assert torch.equal(gm(x), ref)
    assert _conv_sites(model) >= expected


def _load_renamed(dst: nn.Module, src: nn.Module, rename: list[tuple[str, str]]) -> None:
    """Copy ``src``'s state into ``dst`` after prefix renames (unmatched keys must not exist)."""
    state = {}
    for key, value in src.state_dict().items():
        for old, new in rename:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    dst.load_state_dict(state, strict=True)


def _tp(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    for n, factory, shape, expected in THIRD_PARTY_CASES:
        if n == name:
            return factory(), shape, expected
    raise KeyError(name)


def _dbb_rename(tp: nn.Module) -> list[tuple[str, str]]:
    return [("dbb_origin.", "branch_kxk."), ("dbb_1x1.", "branch_1x1."), ("dbb_avg.conv.", "branch_avg.conv."),
            ("dbb_avg.bn.bn.", "branch_avg.pad_bn.bn."), ("dbb_avg.avgbn.", "branch_avg.bn."),
            ("dbb_1x1_kxk.conv1.", "branch_1x1_kxk.conv1."), ("dbb_1x1_kxk.bn1.bn.", "branch_1x1_kxk.pad_bn1.bn."),
            ("dbb_1x1_kxk.conv2.", "branch_1x1_kxk.conv2."), ("dbb_1x1_kxk.bn2.", "branch_1x1_kxk.bn2.")]


MAPPED = {
    "repvgg_block": (lambda: RepVGGBlock(8, 8),
                     [("rbr_dense.", "conv_kxk."), ("rbr_1x1.", "conv_1x1."), ("rbr_identity.", "bn_identity.")]),
    "repvgg_block_s2_g2": (lambda: RepVGGBlock(8, 16, stride=2, groups=2),
                           [("rbr_dense.", "conv_kxk."), ("rbr_1x1.", "conv_1x1.")]),
    "acnet_block": (lambda: ACBlock(8, 16, 3),
                    [("square_conv.", "conv_square.conv."), ("square_bn.", "conv_square.bn."),
                     ("ver_conv.", "conv_ver.conv."), ("ver_bn.", "conv_ver.bn."),
                     ("hor_conv.", "conv_hor.conv."), ("hor_bn.", "conv_hor.bn.")]),
    "acnet_block_k5_s2_g2": (lambda: ACBlock(8, 16, 5, stride=2, groups=2),
                             [("square_conv.", "conv_square.conv."), ("square_bn.", "conv_square.bn."),
                              ("ver_conv.", "conv_ver.conv."), ("ver_bn.", "conv_ver.bn."),
                              ("hor_conv.", "conv_hor.conv."), ("hor_bn.", "conv_hor.bn.")]),
    "dbb_block_g2_s2": (lambda: DiverseBranchBlock(8, 16, 3, stride=2, groups=2), None),
    "dbb_block_dw": (lambda: DiverseBranchBlock(8, 8, 3, groups=8), None),
    "dbb_block_k5_relu": (lambda: DiverseBranchBlock(8, 8, 5, act=True), None),
    "repmlp_block": (lambda: RepMLPBlock(8, 8, 8, 8, 4, 4, reparam_conv_k=(1, 3), fc3_groups=2),
                     [("avg.bn.", "gp_bn."), ("fc1_fc2.fc1.", "gp_fc1."), ("fc1_fc2.fc2.", "gp_fc2."),
                      ("repconv1.", "local.0."), ("repconv3.", "local.1.")]),
    "mobileone_block_dw": (lambda: MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=3),
                           [("rbr_skip.", "bn_identity."), ("rbr_conv.", "conv_branches."),
                            ("rbr_scale.", "conv_scale.")]),
    "replk_conv": (lambda: RepLKBlock(16, 16, 13, small_kernel=5),
                   [("lkb_origin.", "large."), ("small_conv.", "small.0.")]),
    "unireplk_dilated": (lambda: RepLKBlock.unireplk(16, 13),
                         [("lk_origin.", "large.conv."), ("origin_bn.", "large.bn.")]
                         + [(f"dil_conv_k{k}_{r}.", f"small.{i}.conv.") for i, (k, r) in
                            enumerate(unireplk_branches(13))]
                         + [(f"dil_bn_k{k}_{r}.", f"small.{i}.bn.") for i, (k, r) in enumerate(unireplk_branches(13))]),
    "timm_repvgg_block": (lambda: RepVGGBlock(16, 16), [("identity.", "bn_identity.")]),
}


@pytest.mark.parametrize("name", list(MAPPED))
def test_third_party_equals_repconv_block(name):
    """Each formulation computes the same function as the matching repconv block (weights mapped by
    name), and that block's deploy form reaches the case's expected conv count: the expectation is
    achievable and the two implementations of the paper agree."""
    tp, shape, expected = _tp(name)
    build, rename = MAPPED[name]
    ours = build().eval()
    if rename is None:
        rename = _dbb_rename(tp)
    src = tp
    if name.startswith("dbb"):
        src = copy.deepcopy(tp)  # IdentityBasedConv1x1 keeps W - I as its weight; ours stores W
        with torch.no_grad():
            for mod in src.modules():
                if type(mod).__name__ == "IdentityBasedConv1x1":
                    mod.weight.copy_(mod.get_actual_kernel())
        rename = [("dbb_1x1_kxk.idconv1.", "branch_1x1_kxk.conv1."), *rename]
    _load_renamed(ours, src, rename)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = tp(x)
        assert rel_err(ours(x), ref) <= 1e-6
        reparameterize_model(ours)
        assert rel_err(ours(x), ref) <= TOL
    assert sum(isinstance(m, nn.Conv2d) for m in ours.modules()) <= expected


def _bn(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return bn_module_scale_shift(bn, torch.float64)


def test_expected_counts_reachable_for_plain_code():
    """The cases without a repconv counterpart: fold them by hand with the algebra to show the
    expected conv counts are reachable (and the stated leftovers are needed)."""
    # sequential_bn_around_convs: 3 convs + 1 BN
    seq, shape, expected = _tp("sequential_bn_around_convs")
    x = torch.randn(shape).double()
    with torch.no_grad():
        ref = seq.double()(x)
        c0, b0, c1, b1, relu, b2, c2, relu2, b3, c3, b4 = seq
        k01 = compose(conv_then_affine(ConvKernel.of(c0), *_bn(b0)), conv_then_affine(ConvKernel.of(c1), *_bn(b1)))
        k2 = affine_then_conv(*_bn(b2), ConvKernel.of(c2))
        k3 = conv_then_affine(ConvKernel.of(c3), *_bn(b4))
        out = k3.apply(b3(torch.relu(k2.apply(torch.relu(k01.apply(x))))))
        torch.testing.assert_close(out, ref)
        assert expected == 3
        # the BN before the padded conv does not fold forward
        with pytest.raises(Exception, match="padded"):
            affine_then_conv(*_bn(b3), ConvKernel.of(c3))

    # shared_conv: two distinct fused convs
    sh, shape, expected = _tp("shared_conv")
    x = torch.randn(shape).double()
    with torch.no_grad():
        sh = sh.double()
        ref = sh(x)
        k1 = conv_then_affine(ConvKernel.of(sh.conv), *_bn(sh.bn1))
        k2 = conv_then_affine(ConvKernel.of(sh.conv), *_bn(sh.bn2))
        torch.testing.assert_close(k2.apply(torch.relu(k1.apply(x))), ref)
        assert expected == 2

    # replk_block: the BN before pw1 (1x1, no padding) folds; 3 convs
    blk, shape, expected = _tp("replk_block")
    x = torch.randn(shape).double()
    with torch.no_grad():
        blk = blk.double()
        ref = blk(x)
        pw1 = affine_then_conv(*_bn(blk.prelkb_bn), conv_then_affine(ConvKernel.of(blk.pw1.conv), *_bn(blk.pw1.bn)))
        lk = RepLKBlock(16, 16, 13, small_kernel=5).double().eval()
        _load_renamed(lk, blk.large_kernel, [("lkb_origin.", "large."), ("small_conv.", "small.0.")])
        lk.reparameterize()
        pw2 = conv_then_affine(ConvKernel.of(blk.pw2.conv), *_bn(blk.pw2.bn))
        out = x + pw2.apply(torch.relu(lk(torch.relu(pw1.apply(x)))))
        torch.testing.assert_close(out, ref)
        assert expected == 3
