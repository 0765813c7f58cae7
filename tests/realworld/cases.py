"""The real models repconv is judged on, each with the library's own converter (the anchor).

Everything is built offline from the libraries' code with random weights (no downloads). Inputs are
as small as each model allows, to keep the suite within CI's budget.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# ultralytics reads these at import: no network, no banner, settings in a throw-away folder
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="repconv-yolo-"))

Converter = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Case:
    name: str
    library: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    anchor: Converter | None
    anchor_name: str
    # float64 where the output passes through top-k selection: fp32 rounding noise (the library's own
    # converter's too) reorders near-tied queries, which no tolerance absorbs
    dtype: torch.dtype = torch.float32
    # the outputs the library's converter promises to keep (ultralytics: the decoded predictions)
    anchor_outputs: Callable[[Any], Any] = lambda out: out

    @property
    def id(self) -> str:
        return f"{self.library}:{self.name}"


# --------------------------------------------------------------------------- timm

# the smallest registered model of every timm family with reparameterize() / fuse() / switch_to_deploy()
TIMM_MODELS: dict[str, dict] = {
    "repvgg_a0": {}, "mobileone_s0": {}, "fastvit_t8": {}, "repvit_m0_9": {}, "repghostnet_050": {},
    "efficientvit_m0": {}, "levit_128s": {"img_size": 64}, "levit_conv_128s": {"img_size": 64},
    "tiny_vit_5m_224": {}, "ghostnetv3_050": {}, "lcnetv2_small": {}, "shvit_s1": {}, "efficientvim_m1": {},
    "iformer_t": {},
}


def _timm_build(name: str, kwargs: dict) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _timm_anchor(model: nn.Module) -> nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(model)


def timm_cases() -> list[Case]:
    return [Case(n, "timm", _timm_build(n, kw), (1, 3, 64, 64), _timm_anchor, "timm.utils.reparameterize_model")
            for n, kw in TIMM_MODELS.items()]


# --------------------------------------------------------------------------- ultralytics

ULTRALYTICS_MODELS = ("yolov8n.yaml", "yolov8n-seg.yaml", "yolo11n.yaml", "yolo11n-obb.yaml", "yolo12n.yaml",
                      "yolov10n.yaml", "yolov9t.yaml", "yolo26n.yaml", "rtdetr-l.yaml")


def _yolo_build(cfg: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ultralytics import RTDETR, YOLO

        cls = RTDETR if cfg.startswith("rtdetr") else YOLO
        return cls(cfg).model

    return build


def _yolo_anchor(model: nn.Module) -> nn.Module:
    return model.fuse(verbose=False)


def ultralytics_cases() -> list[Case]:
    return [Case(c.removesuffix(".yaml"), "ultralytics", _yolo_build(c), (1, 3, 64, 64), _yolo_anchor,
                 "BaseModel.fuse()", torch.float64 if c.startswith("rtdetr") else torch.float32, _predictions)
            for c in ULTRALYTICS_MODELS]


def _predictions(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


# --------------------------------------------------------------------------- torchvision

TORCHVISION_MODELS: dict[str, dict] = {
    "resnet18": {}, "mobilenet_v2": {}, "mobilenet_v3_small": {}, "efficientnet_b0": {}, "regnet_x_400mf": {},
    "densenet121": {}, "shufflenet_v2_x0_5": {}, "squeezenet1_1": {}, "mnasnet0_5": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "convnext_tiny": {}, "vgg11_bn": {},
}
_TORCHVISION_SIZE = {"inception_v3": 75}


def _tv_build(name: str, kwargs: dict) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _fx_anchor(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval(), inplace=True)


def torchvision_cases() -> list[Case]:
    return [Case(n, "torchvision", _tv_build(n, kw), (1, 3, _TORCHVISION_SIZE.get(n, 64), _TORCHVISION_SIZE.get(n, 64)),
                 _fx_anchor, "torch.fx.experimental.optimization.fuse") for n, kw in TORCHVISION_MODELS.items()]


# --------------------------------------------------------------------------- TorchScript

def torchscript_cases() -> list[Case]:
    """``torch.jit.trace`` / ``torch.jit.script`` of plain CNNs; anchored by fx's fuse of the eager model
    (what a user would get before scripting)."""
    cases = []
    for n in ("resnet18", "mobilenet_v2"):
        for how in ("trace", "script"):
            cases.append(Case(f"{n}-{how}", "torchscript", _tv_build(n, {}), (1, 3, 64, 64), _fx_anchor,
                              "torch.fx.experimental.optimization.fuse (eager)"))
    return cases


def to_torchscript(model: nn.Module, how: str, example: torch.Tensor) -> torch.jit.ScriptModule:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return torch.jit.trace(model, example) if how == "trace" else torch.jit.script(model)


def library_cases() -> list[Case]:
    return timm_cases() + ultralytics_cases() + torchvision_cases()


def all_cases() -> list[Case]:
    """The library cases and TorchScript files of some (the benchmark's rows; the tests run the
    TorchScript ones through the ``repconv fuse`` CLI: ``test_capture_real.py``)."""
    return library_cases() + torchscript_cases()
