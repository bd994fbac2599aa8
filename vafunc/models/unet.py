"""U-Net, the paper's network (unpadded) and the popular padded BatchNorm variant.

Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (arXiv:1505.04597), Fig. 1 and Sec. 2: a contracting path of two unpadded 3x3
convolutions (with bias) and ReLU per level, 2x2 max pooling with stride 2 between levels, widths
64-128-256-512-1024; an expansive path of 2x2 up-convolutions (a transposed convolution with
stride 2) that halve the channels, the skip feature map of the same level centre-cropped to the
up-sampled map and concatenated **[skip, up]** (skip channels first), two 3x3 convolutions and
ReLU; a final 1x1 convolution to the classes. The output is a map of class scores
``[N, num_classes, H', W']`` (no softmax). ``in_channels=1, num_classes=2``: 31,030,658 parameters;
a 572x572 tile gives a 388x388 map.

``padding="same", norm="batch"`` is the popular variant (milesial/Pytorch-UNet's ``UNet`` with
``bilinear=False``): padded bias-free 3x3 convolutions each followed by BatchNorm and ReLU; where
a level's map has an odd side, the up-sampled map is one pixel short of its skip and is
zero-padded (``F.pad``, the extra pixel at the bottom/right, as that repository does) to the skip's
size, so any input of at least 16x16 works and the output has the input's size.
``in_channels=3, num_classes=1``: 31,037,633 parameters.

**Input sizes.** The unpadded network follows the paper's tiling only when every 2x2 max pooling
sees an even map: sides ``s = 16 b + 124`` (``b >= 4``: 188, 204, ..., 572, ...), which give an output
of ``16 b - 60`` (:func:`output_size`, :func:`valid_size`). The kit's size rules are a minimum, a
multiple and a maximum (``vafunc/core/sizes.py``), which cannot express ``s = 12 (mod 16)``, so
other sizes are *not* rejected: pooling floors, crops are centred (the extra pixel on the
bottom/right side dropped), and the output is smaller than the paper's formula gives for the
next valid size. ``model.min_size`` is the probed smallest side every op accepts (188).

**Names** (no package oracle; a plain ``torch.nn`` U-Net, written out in ``tests/test_unet.py``):
``enc{i}`` (an ``nn.Sequential`` of ``Conv2d``/``ReLU`` -- or ``Conv2d``/``BatchNorm2d``/``ReLU`` --
twice: ``enc1.0.weight``, ``enc1.2.weight``; BatchNorm variant ``enc1.0``, ``enc1.1``, ``enc1.3``,
``enc1.4``), ``pool{i}`` (``nn.MaxPool2d(2, 2)``), ``enc5`` the bottom level, then per level from the
bottom up ``up{i}`` (``nn.ConvTranspose2d(c, c / 2, 2, stride=2)``) and ``dec{i}`` (the double conv
after the concatenation), ``i = 4..1``, and ``head`` (the 1x1 ``Conv2d``). Feature names: ``enc{i}``,
``pool{i}``, ``dec{i}``.

**Init** (paper Sec. 3): every convolution normal with ``std = sqrt(2 / N)``, ``N`` the incoming
nodes of one output (``9 cin`` for a 3x3 conv, ``cin`` for the 2x2 stride-2 up-convolution, whose
outputs each see one kernel tap), biases 0; BatchNorm 1/0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core import layers as L
from vafunc.core.blocks import up_conv
from vafunc.core.kit import Scope, family
from vafunc.core.registry import check_config, register

PAPER = "Ronneberger et al. 2015, U-Net: Convolutional Networks for Biomedical Image Segmentation, arXiv:1505.04597"

PADDINGS = ("valid", "same")
NORMS = (None, "batch")


@dataclass(frozen=True)
class UNetConfig:
    """``widths``: the channels of each level, top to bottom (the paper's 64..1024; each up-conv
    halves to the next level's width); ``padding``: ``"valid"`` (the paper's unpadded 3x3
    convolutions) or ``"same"``; ``norm``: ``None`` (convs with bias, ReLU) or ``"batch"``
    (bias-free convs, BatchNorm, ReLU)."""

    in_channels: int = 1
    num_classes: int = 2
    widths: tuple = (64, 128, 256, 512, 1024)
    padding: str = "valid"
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        w = self.widths
        if (
            not isinstance(w, tuple)
            or len(w) < 2
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in w)
        ):
            raise ValueError(f"widths must be a tuple of at least two positive ints, got {w!r}")
        check_config(self)


def valid_size(b: int) -> int:
    """The ``b``-th input side of the paper's tiling for the default five levels (``b`` = the side of
    the bottom level after its convolutions, ``b >= 4``): ``16 b + 124`` (``b = 28``: 572)."""
    return 16 * b + 124


def output_size(s: int, levels: int = 5) -> int:
    """The output side of the unpadded network for an input side ``s`` (pooling floors, crops
    centred): ``388`` for ``572``; ``<= 0`` where the input is too small."""
    for _ in range(levels - 1):
        s = (s - 4) // 2
    s -= 4
    for _ in range(levels - 1):
        s = 2 * s - 4
    return s


def double_conv(m: Scope, x: Tensor, cout: int, cfg: UNetConfig) -> Tensor:
    """Two 3x3 convolutions, each followed by ReLU (paper) or BatchNorm and ReLU (``norm="batch"``):
    ``[N, C, H, W] -> [N, cout, H - 4, W - 4]`` unpadded, ``[N, cout, H, W]`` with ``padding="same"``."""
    pad = 0 if cfg.padding == "valid" else 1
    i = 0
    for _ in range(2):
        if cfg.norm == "batch":
            x = m.conv_norm_act(x, cout, 3, conv=str(i), norm=str(i + 1), act="relu", act_name=str(i + 2), padding=pad)
            i += 3
        else:
            x = m.op(str(i + 1), L.relu_, m.conv(str(i), x, cout, 3, padding=pad, bias=True), tap=False)
            i += 2
    return x


def forward(m: Scope, cfg: UNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> class scores [N, num_classes, H', W']`` (``H' = H`` with
    ``padding="same"``; :func:`output_size` unpadded)."""
    n = len(cfg.widths)
    skips = []
    for i, width in enumerate(cfg.widths[:-1], 1):
        x = m.block(f"enc{i}", double_conv, x, width, cfg)
        skips.append(x)
        x = m.op(f"pool{i}", L.max_pool2d, x, 2, 2)
    x = m.block(f"enc{n}", double_conv, x, cfg.widths[-1], cfg)
    fit = "crop" if cfg.padding == "valid" else "zeros"
    for i in range(n - 1, 0, -1):
        width = cfg.widths[i - 1]
        up = up_conv(m, f"up{i}", x, width, ("normal", math.sqrt(2.0 / x.shape[1])))  # std sqrt(2 / N), N = cin
        x = m.block(f"dec{i}", double_conv, B.skip_cat(skips[i - 1], up, fit), width, cfg)
    return m.conv("head", x, cfg.num_classes, 1, bias=True)


FAMILY = family("unet", UNetConfig, forward, paper=PAPER, defaults={"conv": "kaiming_normal"})

register(
    "unet",
    FAMILY,
    params=31_030_658,
    reference=None,
    task="segmentation",
    paper=PAPER,
    notes="Fig. 1: unpadded convs, 572x572 -> 388x388; padding='same', norm='batch': the padded BatchNorm variant",
)
