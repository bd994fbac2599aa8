"""ConvNeXt T/S/B/L/XL in torchvision's layout.

Liu et al. 2022, "A ConvNet for the 2020s" (arXiv:2201.03545). Sec. 2 builds the block from a
ResNet-50: a "patchify" stem (4x4/4 conv + LayerNorm), stages of blocks in the ratio 1:1:3:1, each
block a 7x7 depthwise conv, one LayerNorm, an inverted bottleneck (1x1 to 4C, GELU, 1x1 back to
C) and a residual; separate downsampling layers (LayerNorm + 2x2/2 conv) between stages; a
final LayerNorm before the linear classifier. Sec. 3 gives the variants, channels C and blocks B
per stage:

=======  =========================  ===========
T        (96, 192, 384, 768)        (3, 3, 9, 3)
S        (96, 192, 384, 768)        (3, 3, 27, 3)
B        (128, 256, 512, 1024)      (3, 3, 27, 3)
L        (192, 384, 768, 1536)      (3, 3, 27, 3)
XL       (256, 512, 1024, 2048)     (3, 3, 27, 3)
=======  =========================  ===========

Layer scale (Touvron et al. 2021) starts at 1e-6 and stochastic depth grows linearly over the
blocks (Appendix A.1, Table 5); the builders' rates are torchvision's (the paper's ImageNet-1K
recipe): 0.1 / 0.4 / 0.5 / 0.5 for T / S / B / L. XL, which the paper trains only with
ImageNet-22K pre-training, has the ``ConvNeXt`` class default, 0.

State-dict names are torchvision's: ``features.0.{0: conv, 1: LayerNorm2d}`` (stem),
``features.{1,3,5,7}.{j}`` blocks (``layer_scale [C, 1, 1]``, ``block.0`` depthwise conv,
``block.2`` LayerNorm, ``block.3``/``block.5`` the linears), ``features.{2,4,6}.{0: LayerNorm2d,
1: conv}`` (downsampling), ``classifier.{0: LayerNorm2d, 2: Linear}``. torchvision has builders
for T/S/B/L; ``convnext_xlarge`` is its ``ConvNeXt`` class with the XL table.

timm checkpoints (``stem``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}.conv_dw`` /
``norm`` / ``mlp.fc1`` / ``mlp.fc2`` / ``gamma [C]``, ``head.norm``, ``head.fc``; e.g. timm's
``convnext_xlarge.fb_in22k_ft_in1k``, and the ``conv_mlp`` ones such as ``convnext_atto`` with a
matching ``block_setting``) load too: :func:`remap` renames them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Liu et al. 2022, A ConvNet for the 2020s, arXiv:2201.03545"


def _table(widths: Sequence[int], depths: Sequence[int]) -> tuple:
    """Sec. 3's (C, B) as torchvision's ``block_setting``: ``(input_channels, out_channels,
    num_layers)`` per stage, ``out_channels`` None for the last (no downsampling after it)."""
    outs = tuple(widths[1:]) + (None,)
    return tuple(zip(widths, outs, depths))


SETTINGS = {
    "tiny": _table((96, 192, 384, 768), (3, 3, 9, 3)),
    "small": _table((96, 192, 384, 768), (3, 3, 27, 3)),
    "base": _table((128, 256, 512, 1024), (3, 3, 27, 3)),
    "large": _table((192, 384, 768, 1536), (3, 3, 27, 3)),
    "xlarge": _table((256, 512, 1024, 2048), (3, 3, 27, 3)),
}


def _stage(s: Any) -> tuple:
    """One stage as ``(input_channels, out_channels, num_layers)``, from a triple or an object
    with those attributes (torchvision's ``CNBlockConfig``)."""
    if hasattr(s, "input_channels"):
        s = (s.input_channels, s.out_channels, s.num_layers)
    try:
        cin, cout, n = s
    except (TypeError, ValueError):
        raise TypeError(f"a block_setting stage is (input_channels, out_channels, num_layers), got {s!r}") from None
    return cin, cout, n


@dataclass(frozen=True)
class ConvNeXtConfig:
    """torchvision ``ConvNeXt`` keywords (``block`` and ``norm_layer`` aside).

    ``block_setting``: per stage ``(input_channels, out_channels, num_layers)`` (torchvision's
    ``CNBlockConfig`` fields, which are accepted too); a stage with ``out_channels`` not None is
    followed by a downsampling layer. ``stochastic_depth_prob``: the rate of the last block, block
    ``b`` of ``B`` drops its residual branch with ``stochastic_depth_prob * b / (B - 1)`` (train
    mode only, needs ``rng``). ``layer_scale``: the initial value of every block's layer scale.
    """

    block_setting: tuple = SETTINGS["tiny"]
    stochastic_depth_prob: float = 0.0
    layer_scale: float = 1e-6
    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        try:
            stages = tuple(_stage(s) for s in self.block_setting)
        except TypeError as e:
            raise TypeError(f"block_setting must be a sequence of stages: {e}") from None
        if not stages:
            raise ValueError("block_setting must not be empty")
        for i, (cin, cout, n) in enumerate(stages):
            for what, v in (("input_channels", cin), ("num_layers", n)) + (
                (("out_channels", cout),) if cout is not None else ()
            ):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"block_setting[{i}].{what} must be a positive int, got {v!r}")
            if i + 1 < len(stages) and (cin if cout is None else cout) != stages[i + 1][0]:
                raise ValueError(
                    f"block_setting[{i}] ends with {cin if cout is None else cout} channels but "
                    f"block_setting[{i + 1}] starts with {stages[i + 1][0]}"
                )
        object.__setattr__(self, "block_setting", stages)
        if isinstance(self.layer_scale, bool) or not isinstance(self.layer_scale, (int, float)):
            raise TypeError(f"layer_scale must be a number, got {self.layer_scale!r}")
        object.__setattr__(self, "layer_scale", float(self.layer_scale))
        check_config(self, rates=("stochastic_depth_prob",))
        object.__setattr__(self, "stochastic_depth_prob", float(self.stochastic_depth_prob))


class BlockSpec(NamedTuple):
    layer_scale: float
    drop_path: float
    channels: int


def plan(cfg: ConvNeXtConfig) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per stage, the specs of its blocks: block ``b`` of ``B`` (counted over all stages) has
    stochastic depth ``stochastic_depth_prob * b / (B - 1)`` (torchvision's schedule)."""
    total = sum(n for _, _, n in cfg.block_setting)
    last = max(total - 1.0, 1.0)  # one block in all: rate 0 (torchvision divides by zero)
    stages, b = [], 0
    for c, _, n in cfg.block_setting:
        stages.append(
            tuple(BlockSpec(cfg.layer_scale, cfg.stochastic_depth_prob * (b + j) / last, c) for j in range(n))
        )
        b += n
    return tuple(stages)


# --------------------------------------------------------------------------- the network


def to_channels_last(x: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N, H, W, C]``, a view (torchvision's ``Permute([0, 2, 3, 1])``)."""
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: Tensor) -> Tensor:
    """``[N, H, W, C] -> [N, C, H, W]``, a view (torchvision's ``Permute([0, 3, 1, 2])``)."""
    return x.permute(0, 3, 1, 2)


def cn_branch(m: Scope, x: Tensor, c: int) -> Tensor:
    """The residual branch of the block, torchvision's ``CNBlock.block``: 7x7 depthwise conv
    ``0``, to channels-last ``1``, LayerNorm ``2``, linears ``3`` (to 4C) and ``5`` (back to C)
    around GELU ``4``, back to channels-first ``6``. ``[N, C, H, W] -> same``."""
    # one step per line: each rebinding frees the step's input, as nn.Sequential does
    y = m.conv("0", x, c, 7, padding=3, groups=c, bias=True)
    y = m.op("1", to_channels_last, y, tap=False)
    y = m.layer_norm("2", y, eps=1e-6)
    y = m.linear("3", y, 4 * c)
    y = m.op("4", F.gelu, y, tap=False)
    y = m.linear("5", y, c)
    return m.op("6", to_channels_first, y, tap=False)


def cn_block(m: Scope, x: Tensor, b: BlockSpec) -> Tensor:
    """The ConvNeXt block (Sec. 2.6, Fig. 4), torchvision's ``CNBlock``: ``[N, C, H, W] -> same``.

    ``x + stochastic_depth(layer_scale * block(x))``, ``block`` the branch of :func:`cn_branch`
    (the LayerNorm and the linears channels-last); stochastic depth keyed by the scope's key.
    """
    gamma = m.layer_scale("layer_scale", b.channels, b.layer_scale)  # registered before `block` in the state_dict
    y = m.block("block", cn_branch, x, b.channels, tap=False)
    y = m.drop_path(gamma * y, b.drop_path, m.rng, name="stochastic_depth")
    return y.add_(x)  # a fresh tensor: the product (or the drop-path output)


def stem(m: Scope, x: Tensor, cout: int) -> Tensor:
    """ "Patchify" stem (Sec. 2.3): 4x4/4 conv with bias, LayerNorm2d. ``[N, 3, H, W] -> [N, C, H/4, W/4]``."""
    return m.layer_norm2d("1", m.conv("0", x, cout, 4, stride=4, padding=0, bias=True))


def downsample(m: Scope, x: Tensor, cout: int) -> Tensor:
    """Downsampling layer (Sec. 2.6): LayerNorm2d, 2x2/2 conv. ``[N, C, H, W] -> [N, cout, H/2, W/2]``."""
    return m.conv("1", m.layer_norm2d("0", x), cout, 2, stride=2, padding=0, bias=True)


def features(m: Scope, x: Tensor, cfg: ConvNeXtConfig) -> Tensor:
    """torchvision's ``features``: the stem ``0``, stage ``i`` at ``2i + 1`` and the downsampling
    layer after it at ``2i + 2``. Block ``b`` (counted over all stages) gets the key
    ``fold_in(m.rng, b)``."""
    y = m.block("0", stem, x, cfg.block_setting[0][0])
    b = 0
    for i, ((_, cout, _), specs) in enumerate(zip(cfg.block_setting, plan(cfg))):
        y = m.block(str(2 * i + 1), B.sequence, y, specs, cn_block, rng=m.rng, index=b)
        b += len(specs)
        if cout is not None:
            y = m.block(str(2 * i + 2), downsample, y, cout)
    return y


def classifier(m: Scope, x: Tensor, num_classes: int) -> Tensor:
    """torchvision's ``classifier``: LayerNorm2d ``0``, flatten ``1``, linear ``2``.
    ``[N, C, 1, 1] -> [N, num_classes]``."""
    return m.linear("2", m.op("1", torch.flatten, m.layer_norm2d("0", x), 1, tap=False), num_classes)


def forward(m: Scope, cfg: ConvNeXtConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (torchvision's module paths): ``features.0`` (stem, stride 4), every block
    ``features.{2i+1}.{j}``, every stage ``features.{2i+1}`` (strides 4, 8, 16, 32) and every
    downsampling layer ``features.{2i+2}``. Stochastic-depth keys: block ``b`` (counted over all
    stages) uses ``fold_in(rng, b)``.
    """
    y = m.block("features", features, x, cfg, tap=False, rng=m.rng)
    y = m.op("avgpool", F.adaptive_avg_pool2d, y, 1, tap=False)
    return m.block("classifier", classifier, y, cfg.num_classes, tap=False)


# --------------------------------------------------------------------------- timm checkpoints

#: timm's names -> torchvision's: (pattern, replacement) on the dotted key, in order.
_TIMM = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^stem\.([01])\.", r"features.0.\1."),
        (r"^stages\.(\d+)\.downsample\.([01])\.", lambda mt: f"features.{2 * int(mt[1])}.{mt[2]}."),
        (
            r"^stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2)\.",
            lambda mt: f"features.{2 * int(mt[1]) + 1}.{mt[2]}.block.{_TIMM_BLOCK[mt[3]]}.",
        ),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", lambda mt: f"features.{2 * int(mt[1]) + 1}.{mt[2]}.layer_scale"),
        (r"^head\.norm\.", "classifier.0."),
        (r"^head\.fc\.", "classifier.2."),
    )
)
_TIMM_BLOCK = {"conv_dw": "0", "norm": "2", "mlp.fc1": "3", "mlp.fc2": "5"}
_TIMM_CONV_MLP = re.compile(r"\.mlp\.fc[12]\.weight$")


def remap(cfg: ConvNeXtConfig, flat: dict) -> tuple[dict, list[str]]:
    """Translate a timm ConvNeXt checkpoint (recognised by its ``stem.0.weight``) to
    torchvision's names: ``stem.{0,1}`` -> ``features.0.{0,1}``, ``stages.{i}.downsample.{0,1}``
    -> ``features.{2i}.{0,1}``, ``stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1, mlp.fc2}`` ->
    ``features.{2i+1}.{j}.block.{0, 2, 3, 5}``, ``...gamma [C]`` -> ``...layer_scale [C, 1, 1]``,
    ``head.{norm, fc}`` -> ``classifier.{0, 2}``. timm's ``conv_mlp=True`` models (the small
    ``convnext_atto`` .. ``convnext_nano``) keep the MLP as 1x1 convs ``[O, I, 1, 1]`` and the
    block norm as a LayerNorm2d: the same maps as torchvision's linears ``[O, I]`` and channels-last
    LayerNorm, so the weights are flattened. Returns ``(flat, notes)``; torchvision-named
    checkpoints pass through unchanged, with no notes. Keys that match no rule are kept, so the
    strict load lists them (a ``head.pre_logits``, say); timm variants of another shape fail there too."""
    if "stem.0.weight" not in flat:
        return flat, []
    out, renamed = {}, 0
    for k, v in flat.items():
        for pat, rep in _TIMM:
            new = pat.sub(rep, k, count=1)
            if new != k:
                if k.endswith(".gamma") and v.dim() == 1:
                    v = v.reshape(-1, 1, 1)
                elif _TIMM_CONV_MLP.search(k) and v.dim() == 4 and v.shape[2:] == (1, 1):
                    v = v.flatten(1)  # conv_mlp=True: a 1x1 conv is the same map as the linear
                k, renamed = new, renamed + 1
                break
        out[k] = v
    return out, [
        f"renamed {renamed} timm ConvNeXt keys to torchvision's ('stages.N.blocks.M' -> "
        "'features.2N+1.M', 'gamma [C]' -> 'layer_scale [C, 1, 1]', ...)"
    ]


#: torchvision's init: trunc_normal(std=0.02) conv and linear weights, zero biases.
FAMILY = family(
    "convnext",
    ConvNeXtConfig,
    forward,
    paper=PAPER,
    remap=remap,
    defaults={"conv": ("trunc_normal", 0.02), "linear": ("trunc_normal", 0.02)},
)

for _v, _sd, _n in [
    ("tiny", 0.1, 28589128),
    ("small", 0.4, 50223688),
    ("base", 0.5, 88591464),
    ("large", 0.5, 197767336),
]:
    register(
        f"convnext_{_v}",
        FAMILY,
        params=_n,
        reference=Reference("torchvision", f"convnext_{_v}"),
        block_setting=SETTINGS[_v],
        stochastic_depth_prob=_sd,
    )

register(
    "convnext_xlarge",
    FAMILY,
    params=350196968,
    reference=Reference("torchvision", "ConvNeXt", kwargs=(("block_setting", SETTINGS["xlarge"]),)),
    notes="Sec. 3 of the paper (C = 256/512/1024/2048, B = 3/3/27/3); torchvision has the class but no "
    "builder or weights; timm's convnext_xlarge is the same network (its checkpoints load through the "
    "family's remap).",
    block_setting=SETTINGS["xlarge"],
)
