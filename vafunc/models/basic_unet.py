"""MONAI's ``BasicUNet``, the U-Net that medical imaging uses, in 2-D.

Reference: MONAI 1.6.1 ``monai.networks.nets.BasicUNet`` (Apache-2.0), after Falk et al. 2019,
"U-Net: deep learning for cell counting, detection, and morphometry" (Nature Methods 16, 67-70),
itself Ronneberger et al.'s U-Net (2015) with padded convolutions. Five levels of ``features``
``(32, 32, 64, 128, 256)`` and a last up-sampled width of 32 (``features[5]``):

* every convolution block is MONAI's ``TwoConv``: twice a ``Convolution`` = a padded 3x3 conv
  with bias, then ``ADN`` in the order norm, dropout, activation: ``InstanceNorm2d(C,
  affine=True)`` (no running statistics: every sample normalised by its own), ``nn.Dropout``
  (element-wise, rate ``dropout``, 0 by default) and ``LeakyReLU(0.1, inplace=True)``;
* ``conv_0`` is the first level's block; ``down_{1..4}``: ``MaxPool2d(2)`` then a block;
* ``upcat_{4..1}``: a 2x2 up-convolution (``upsample="deconv"``, ``nn.ConvTranspose2d(c, c/2, 2,
  stride=2)``; ``upcat_1`` keeps its width, ``halves=False``), the up-sampled map padded to its skip
  by replicating its last row / column where a pooling floored an odd side, ``[skip, up]``
  concatenated, then a block (:func:`vafunc.core.blocks.up_conv`, :func:`~vafunc.core.blocks.skip_cat`,
  shared with :mod:`vafunc.models.unet`);
* ``final_conv``: a 1x1 conv to ``out_channels`` per-pixel scores ``[N, out_channels, H, W]``
  (no softmax), at the input's size.

``in_channels=3, out_channels=2``: 1,979,042 parameters. Any side of at least 32 works: the
instance norms of the bottom level need more than one pixel (16..31 leave it 1x1, where MONAI's
``InstanceNorm2d`` raises too).

**Names** are MONAI's state_dict names: ``conv_0.conv_{0,1}.conv.{weight,bias}`` and
``.adn.N.{weight,bias}``, ``down_{i}.convs.conv_{j}...``, ``upcat_{i}.upsample.deconv.{weight,bias}``
and ``upcat_{i}.convs...``, ``final_conv``. Features: every ``Convolution`` and ``TwoConv``,
``down_{i}.max_pooling``, ``upcat_{i}.upsample``, and each level's output (``conv_0``, ``down_i``,
``upcat_i``).

**Init** is torch's default (MONAI sets none): convolutions uniform in ``+-1/sqrt(fan_in)``,
weight and bias; a transposed convolution's fan-in is ``cout * 4`` (torch reads it off the weight's
second axis); instance norms weight 1, bias 0.

Not configurable here: ``spatial_dims`` (2 only; vafunc's images are ``[N, C, H, W]``), ``act``,
``norm`` and ``upsample`` (MONAI's defaults only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core import layers as L
from vafunc.core.blocks import up_conv
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = (
    "Falk et al. 2019, U-Net: deep learning for cell counting, detection, and morphometry, "
    "Nature Methods 16, 67-70 (MONAI's BasicUNet)"
)
#: MONAI's ADN activation: LeakyReLU with this negative slope
NEGATIVE_SLOPE = 0.1


@dataclass(frozen=True)
class BasicUNetConfig:
    """MONAI's keywords: ``features``, six widths (the five levels, then the width after the last
    up-sampling); ``bias``: the 3x3 convolutions' bias; ``dropout``: the rate of every
    ``Convolution``'s element-wise dropout (train mode only; a key per layer)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    features: tuple = (32, 32, 64, 128, 256, 32)
    bias: bool = True
    dropout: float = 0.0
    upsample: str = "deconv"

    def __post_init__(self) -> None:
        if self.spatial_dims != 2:
            raise ValueError(f"spatial_dims must be 2 (images [N, C, H, W]), got {self.spatial_dims!r}")
        if self.upsample != "deconv":
            raise ValueError(f"upsample must be 'deconv' (the 2x2 up-convolution), got {self.upsample!r}")
        f = self.features
        if (
            not isinstance(f, tuple)
            or len(f) != 6
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in f)
        ):
            raise ValueError(f"features must be a tuple of six positive ints, got {f!r}")
        check_config(self, positive_ints=("in_channels", "out_channels"), rates=("dropout",), bools=("bias",))


def adn(m: Scope, x: Tensor, rate: float) -> Tensor:
    """MONAI's ``ADN`` in its order ``"NDA"``: instance norm ``N``, dropout ``D``, LeakyReLU ``A``
    (in place on the fresh norm output, as MONAI's ``inplace=True``)."""
    x = m.dropout(m.instance_norm("N", x), rate, m.key(0), name="D")
    return m.op("A", L.leaky_relu_, x, NEGATIVE_SLOPE, tap=False)


def convolution(m: Scope, x: Tensor, cout: int, cfg: BasicUNetConfig) -> Tensor:
    """MONAI's ``Convolution``: a padded 3x3 conv ``conv``, then ``adn``: ``[N, C, H, W] -> [N, cout, H, W]``."""
    x = m.conv("conv", x, cout, 3, padding=1, bias=cfg.bias)
    return m.block("adn", adn, x, cfg.dropout, tap=False, rng=m.rng, sequential=True)


def two_conv(m: Scope, x: Tensor, cout: int, cfg: BasicUNetConfig) -> Tensor:
    """MONAI's ``TwoConv``: ``conv_0`` and ``conv_1``, each a :func:`convolution` with its own key."""
    for j in range(2):
        x = m.block(f"conv_{j}", convolution, x, cout, cfg, rng=m.key(j), sequential=True)
    return x


def down(m: Scope, x: Tensor, cout: int, cfg: BasicUNetConfig) -> Tensor:
    """MONAI's ``Down``: ``max_pooling`` (2x2, stride 2) then ``convs`` (:func:`two_conv`)."""
    x = m.op("max_pooling", L.max_pool2d, x, 2, 2)
    return m.block("convs", two_conv, x, cout, cfg, rng=m.rng, sequential=True)


def _upsample(m: Scope, x: Tensor, cout: int) -> Tensor:
    # torch's default ConvTranspose2d init: fan_in = weight.size(1) * 2 * 2 = cout * 4
    bound = 1.0 / math.sqrt(cout * 4)
    return up_conv(m, "deconv", x, cout, ("uniform", -bound, bound), ("uniform", -bound, bound))


def upcat(m: Scope, x: Tensor, skip: Tensor, up: int, cout: int, cfg: BasicUNetConfig) -> Tensor:
    """MONAI's ``UpCat``: ``upsample`` (a 2x2 up-convolution to ``up`` channels: half the input's, all
    of them for ``upcat_1``, MONAI's ``halves=False``), the skip concatenation (edge-replicating pad),
    then ``convs`` (:func:`two_conv`). Channel counts come from the config, not from traced shapes."""
    up = m.block("upsample", _upsample, x, up, sequential=True)
    return m.block("convs", two_conv, B.skip_cat(skip, up, "replicate"), cout, cfg, rng=m.rng, sequential=True)


def forward(m: Scope, cfg: BasicUNetConfig, x: Tensor) -> Tensor:
    """``x [N, in_channels, H, W] -> per-pixel scores [N, out_channels, H, W]``."""
    f = cfg.features
    skips = [m.block("conv_0", two_conv, x, f[0], cfg, rng=m.key(0), sequential=True)]
    for i in range(1, 5):
        skips.append(m.block(f"down_{i}", down, skips[-1], f[i], cfg, rng=m.key(i), sequential=True))
    x = skips.pop()
    for i in range(4, 0, -1):
        cout = f[5] if i == 1 else f[i - 1]
        up = f[i] // 2 if i > 1 else f[i]
        x = m.block(f"upcat_{i}", upcat, x, skips[i - 1], up, cout, cfg, rng=m.key(9 - i))
    return m.conv("final_conv", x, cfg.out_channels, 1, bias=True)


FAMILY = family("basic_unet", BasicUNetConfig, forward, paper=PAPER, defaults={"conv": "kaiming_fan_in_uniform"})

register(
    "basic_unet",
    FAMILY,
    params=1_979_042,
    reference=Reference("monai", "BasicUNet", kwargs=(("spatial_dims", 2), ("in_channels", 3), ("out_channels", 2))),
    task="segmentation",
    notes="MONAI 1.6.1 BasicUNet, 2-D, default features (32, 32, 64, 128, 256, 32)",
    in_channels=3,
)
