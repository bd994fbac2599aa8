"""torchvision's semantic segmentation models: FCN, DeepLabV3 and LR-ASPP on the ResNet and
MobileNetV3 families of this package.

* **FCN** (Long, Shelhamer & Darrell 2015, arXiv:1411.4038) as torchvision builds it: a ResNet
  whose last two stages trade their stride for dilation (output stride 8:
  ``replace_stride_with_dilation=(False, True, True)``), then ``FCNHead``: a 3x3 conv to a quarter
  of the channels, BatchNorm, ReLU, dropout 0.1, a 1x1 conv to the classes.
* **DeepLabV3** (Chen et al. 2017, arXiv:1706.05587, Sec. 3.3): the same dilated ResNet, or
  MobileNetV3-Large with a dilated last stage (output stride 16), then atrous spatial pyramid
  pooling -- a 1x1 branch, three 3x3 branches at dilation 12, 24, 36 and an image-pooling branch
  (global mean, 1x1 conv, BatchNorm, ReLU, up-sampled back), 256 channels each, concatenated and
  projected to 256 (BatchNorm, ReLU, dropout 0.5) -- a 3x3 conv, BatchNorm, ReLU and a 1x1 conv
  to the classes.
* **LR-ASPP** (Howard et al. 2019, "Searching for MobileNetV3", arXiv:1905.02244, Sec. 6.4):
  the dilated MobileNetV3-Large; the last features through a 1x1 conv (BatchNorm, ReLU) gated by a
  sigmoid of their global mean (1x1 conv), up-sampled to the output-stride-8 features; the class
  scores of both, summed.

The logits ``out`` are bilinearly up-sampled (``align_corners=False``) to the input's size; with
``aux_loss=True`` an ``FCNHead`` on the stage before the last gives ``aux`` (FCN, DeepLabV3).
``apply`` returns torchvision's dict, ``{"out": [N, classes, H, W]}`` (and ``"aux"``).

**Names** are torchvision's: ``backbone.*`` (the backbone's module paths without its head:
``backbone.layer4.2.conv3.weight``; ``backbone.16.0.weight`` for MobileNetV3's ``features.16``),
``classifier.*`` and ``aux_classifier.*``. The backbone is the backbone family's declaration with
its dilation options, so its feature names are too (``backbone.layer4``, ``backbone.4``).

**Init.** The backbone's (``kaiming_fan_out``, BatchNorm 1/0; MobileNetV3's BatchNorm eps 1e-3 and
momentum 0.01); the heads' layers keep torch's defaults, as torchvision's do (``Conv2d``'s
``kaiming_uniform(a=sqrt(5))`` with its bias, BatchNorm eps 1e-5, momentum 0.1).

Random slots (train mode): ``m.key(0)`` the classifier's dropout, ``m.key(1)`` the auxiliary
head's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, get_entry, register

from . import mobilenet, resnet

PAPERS = {
    "fcn": "Long, Shelhamer & Darrell 2015, Fully Convolutional Networks for Semantic Segmentation, arXiv:1411.4038",
    "deeplabv3": "Chen et al. 2017, Rethinking Atrous Convolution for Semantic Image Segmentation, arXiv:1706.05587",
    "lraspp": "Howard et al. 2019, Searching for MobileNetV3, arXiv:1905.02244 (Sec. 6.4, LR-ASPP)",
}
HEADS = tuple(PAPERS)
BACKBONES = ("resnet50", "resnet101", "mobilenet_v3_large")
#: torchvision's head layers keep torch's defaults (the backbone families set their own)
_TORCH = dict(init="kaiming_fan_in_uniform", eps=1e-5, momentum=0.1)


@dataclass(frozen=True)
class SegmentationConfig:
    """torchvision's segmentation builder keywords ``num_classes`` and ``aux_loss`` (``None`` there
    means ``False`` without weights), the head (``"fcn"``, ``"deeplabv3"``, ``"lraspp"``) and the
    backbone (``"resnet50"``, ``"resnet101"``, ``"mobilenet_v3_large"``), plus ``in_channels``."""

    head: str = "deeplabv3"
    backbone: str = "resnet50"
    num_classes: int = 21
    aux_loss: bool = False
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.head == "fcn" and not self.backbone.startswith("resnet"):
            raise ValueError(f"torchvision builds FCN on a ResNet only, got backbone {self.backbone!r}")
        if self.head == "lraspp" and self.backbone != "mobilenet_v3_large":
            raise ValueError(f"torchvision builds LR-ASPP on mobilenet_v3_large only, got {self.backbone!r}")
        if self.head == "lraspp" and self.aux_loss:
            raise ValueError("LR-ASPP has no auxiliary head: aux_loss must be False")
        check_config(self, bools=("aux_loss",))


#: config -> (backbone config, backbone family); built once per distinct config
_BACKBONES: dict = {}


def backbone_of(cfg: SegmentationConfig):
    """The dilated backbone of ``cfg``: ``(its config, its family)``."""
    got = _BACKBONES.get(cfg)
    if got is None:
        if cfg.backbone.startswith("resnet"):
            over = dict(replace_stride_with_dilation=(False, True, True))
        else:  # torchvision's mobilenet_v3_large(dilated=True): output stride 16
            over = dict(dilated=True)
        entry = get_entry(cfg.backbone)
        bcfg = entry.family.config(**{**dict(entry.defaults), **over, "in_channels": cfg.in_channels})
        got = _BACKBONES[cfg] = (bcfg, entry.family)
    return got


def fcn_head(m: Scope, x: Tensor, num_classes: int) -> Tensor:
    """torchvision's ``FCNHead``: 3x3 conv to ``C / 4`` (BatchNorm, ReLU), dropout 0.1 (keyed by the
    scope's key), 1x1 conv to the classes."""
    y = m.conv_norm_act(x, x.shape[1] // 4, 3, act="relu", **_TORCH)
    y = m.dropout(y, 0.1, m.rng, name="3")
    return m.conv("4", y, num_classes, 1, bias=True, init=_TORCH["init"])


def image_pool(m: Scope, x: Tensor, cout: int) -> Tensor:
    """ASPP's image-level branch: global mean, 1x1 conv (BatchNorm, ReLU), up-sampled to ``x``'s size."""
    y = m.op("0", L.adaptive_avg_pool2d, x, 1, tap=False)
    y = m.conv_norm_act(y, cout, 1, conv="1", norm="2", act="relu", act_name="3", **_TORCH)
    return L.resize_bilinear(y, x.shape[-2:])


def project(m: Scope, x: Tensor, cout: int) -> Tensor:
    y = m.conv_norm_act(x, cout, 1, act="relu", **_TORCH)
    return m.dropout(y, 0.5, m.rng, name="3")


def aspp(m: Scope, x: Tensor, rates: tuple[int, ...], cout: int = 256) -> Tensor:
    """Atrous spatial pyramid pooling (DeepLabV3 Sec. 3.3): ``convs.0`` a 1x1 branch, ``convs.1..``
    3x3 branches at the dilation ``rates``, the image-pooling branch last; concatenated and
    projected (``project``: 1x1 conv, BatchNorm, ReLU, dropout 0.5)."""
    c = m.child("convs")
    ys = [c.block("0", Scope.conv_norm_act, x, cout, 1, act="relu", tap=False, **_TORCH)]
    for i, r in enumerate(rates, 1):
        ys.append(c.block(str(i), Scope.conv_norm_act, x, cout, 3, dilation=r, act="relu", tap=False, **_TORCH))
    # torchvision's ASPPPooling: an nn.Sequential whose forward up-samples after its chain
    ys.append(c.block(str(len(rates) + 1), image_pool, x, cout, tap=False, sequential=True))
    return m.block("project", project, torch.cat(ys, 1), cout, tap=False, rng=m.rng)


def deeplab_head(m: Scope, x: Tensor, num_classes: int, rates: tuple[int, ...] = (12, 24, 36)) -> Tensor:
    """torchvision's ``DeepLabHead``: ASPP at ``0``, 3x3 conv (BatchNorm, ReLU) at ``1..3``, 1x1 conv
    to the classes at ``4``."""
    y = m.block("0", aspp, x, rates, tap=False, rng=m.rng)
    y = m.conv_norm_act(y, 256, 3, conv="1", norm="2", act="relu", act_name="3", **_TORCH)
    return m.conv("4", y, num_classes, 1, bias=True, init=_TORCH["init"])


def scale_gate(m: Scope, x: Tensor, cout: int) -> Tensor:
    y = m.op("0", L.adaptive_avg_pool2d, x, 1, tap=False)
    return m.op("2", torch.sigmoid, m.conv("1", y, cout, 1, init=_TORCH["init"]), tap=False)


def lraspp_head(m: Scope, x: Tensor, low: Tensor, num_classes: int, inter: int = 128) -> Tensor:
    """torchvision's ``LRASPPHead``: ``cbr`` (1x1 conv, BatchNorm, ReLU) of the high-level features
    times ``scale`` (global mean, 1x1 conv, sigmoid), up-sampled to the low-level features; the
    1x1 ``high_classifier`` of that plus the 1x1 ``low_classifier`` of ``low``."""
    y = m.block("cbr", Scope.conv_norm_act, x, inter, 1, act="relu", tap=False, **_TORCH)
    y = L.resize_bilinear(y * m.block("scale", scale_gate, x, inter, tap=False), low.shape[-2:])
    init = _TORCH["init"]
    return m.conv("low_classifier", low, num_classes, 1, bias=True, init=init) + m.conv(
        "high_classifier", y, num_classes, 1, bias=True, init=init
    )


def backbone(m: Scope, x: Tensor, cfg: SegmentationConfig) -> dict[str, Tensor]:
    """What torchvision's ``IntermediateLayerGetter`` returns: ``{"out": last features}`` and, with
    ``aux_loss``, ``"aux"``: the stage before (ResNet's ``layer4`` and ``layer3``; MobileNetV3's last
    conv and its output-stride-8 block); LR-ASPP's ``{"low", "high"}`` (those two)."""
    bcfg, _ = backbone_of(cfg)
    if cfg.backbone.startswith("resnet"):
        low, y = resnet.body(m, bcfg, x, keep=2)
    else:
        stem, blocks, head, _ = mobilenet.plan_v3(bcfg)
        # torchvision's stage starts: the stem, every block with stride 2 (dilated or not), the last
        # conv; its low-level features are the fourth from the end (output stride 8)
        starts = [0, *(i + 1 for i, b in enumerate(blocks) if b.stride > 1), len(blocks) + 1]
        y, low = mobilenet.features(m, x, stem, blocks, head, mobilenet.block_v3, "hardswish", keep=starts[-4])
    if cfg.head == "lraspp":
        return {"low": low, "high": y}
    return {"out": y, "aux": low} if cfg.aux_loss else {"out": y}


def forward(m: Scope, cfg: SegmentationConfig, x: Tensor) -> dict[str, Tensor]:
    """``x [N, C, H, W] -> {"out": [N, num_classes, H, W]}`` (and ``"aux"`` with ``aux_loss``).

    Feature names: the backbone's under ``backbone.`` (``backbone.layer4``), then ``classifier``
    and ``aux_classifier``.
    """
    size = x.shape[-2:]
    f = m.block("backbone", backbone, x, cfg, tap=False)
    if cfg.head == "lraspp":
        logits = m.block("classifier", lraspp_head, f["high"], f["low"], cfg.num_classes, rng=m.key(0))
    else:
        head = fcn_head if cfg.head == "fcn" else deeplab_head
        logits = m.block("classifier", head, f["out"], cfg.num_classes, rng=m.key(0))
    out = {"out": L.resize_bilinear(logits, size)}
    if cfg.aux_loss:
        aux = m.block("aux_classifier", fcn_head, f["aux"], cfg.num_classes, rng=m.key(1))
        out["aux"] = L.resize_bilinear(aux, size)
    return out


FAMILY = family(
    "segmentation",
    SegmentationConfig,
    forward,
    paper=PAPERS["deeplabv3"],
    defaults=lambda cfg: backbone_of(cfg)[1].declaration.defaults(backbone_of(cfg)[0]),
)

#: (name, parameters without / with the auxiliary head), counted on torchvision's builders
_MODELS = [
    ("fcn_resnet50", 32_957_013, 35_322_218),
    ("fcn_resnet101", 51_949_141, 54_314_346),
    ("deeplabv3_resnet50", 39_638_869, 42_004_074),
    ("deeplabv3_resnet101", 58_630_997, 60_996_202),
    ("deeplabv3_mobilenet_v3_large", 11_025_477, 11_029_328),
    ("lraspp_mobilenet_v3_large", 3_221_538, None),
]
for _name, _n, _n_aux in _MODELS:
    _head, _, _bb = _name.partition("_")
    register(
        _name,
        FAMILY,
        params=_n,
        reference=Reference("torchvision", _name, (("weights_backbone", None),)),
        paper=PAPERS[_head],
        notes="torchvision.models.segmentation"
        + (f"; aux_loss=True adds the auxiliary FCNHead ({_n_aux:,} parameters)" if _n_aux else ""),
        task="segmentation",
        head=_head,
        backbone=_bb,
    )
