"""BN-Inception ("Inception-v2") in the layout of Cadene's ``pretrainedmodels.bninception``.

Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift" (arXiv:1502.03167), Sec. 4.2.1 and Appendix Fig. 5: GoogLeNet with
BatchNorm after every convolution, the 5x5 branches replaced by two stacked 3x3 convs, and
"reduction" modules (3c, 4e) that stride their 3x3 branches and max-pool without a projection.

The reference is Cadene's PyTorch port of the Caffe model (Xiong et al.'s BN-Inception, the weights
published as ``bn_inception-52deb4733.pth``); its module names are the Caffe layer names and are
the state-dict names here: ``conv1_7x7_s2`` (+ ``_bn``), ``conv2_3x3_reduce``, ``conv2_3x3``,
``inception_{3a..5b}_{1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3_1, double_3x3_2,
pool_proj}`` (each conv with a bias and a ``<name>_bn`` BatchNorm), ``last_linear``. The Caffe port
differs from the paper's table in a few widths; the port is what the weights fit, so it is followed.

Two deliberate extensions, both exact where the reference runs:

* Cadene's head is a fixed 7x7 average pool followed by a flatten, so the reference only runs on
  inputs from 223 to 230 pixels. Here the head is a global average pool (identical on a 7x7 map), so
  any input of at least :func:`min_size` works.
* The reduction modules (3c, 4e) concatenate a 3x3/2 conv (padding 1: ``ceil(H / 2)`` outputs)
  with a Caffe ceil-mode 3x3/2 max pool (no padding: ``floor(H / 2)`` outputs); on odd-sized maps
  the two disagree and the reference (like the Caffe original) fails in the concatenation. Here
  the pool input is first padded with one row/column of ``-inf`` at the bottom/right when odd,
  so the pool also gives ``ceil(H / 2)``; on even maps nothing changes.

Published weights expect **BGR** images in the **0-255** range minus the per-channel mean
(104, 117, 128) (B, G, R), std 1, at 224x224 (recorded in the registry ``extra``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = (
    "Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by Reducing "
    "Internal Covariate Shift, arXiv:1502.03167"
)


class ModuleRow(NamedTuple):
    """One Inception module (a row of Appendix Fig. 5, with the Caffe port's widths)."""

    name: str  # "3a" ...
    c1x1: int  # 1x1 branch (0: none, in reduction modules)
    c3x3_reduce: int
    c3x3: int
    cd3x3_reduce: int  # double-3x3 branch
    cd3x3: int
    pool: str  # "avg" | "max" (3x3/1, padded) or "reduce" (3x3/2 max, no projection)
    pool_proj: int  # 0 in reduction modules
    stride: int  # 2 in reduction modules (on the 3x3 and the second double-3x3 conv)


MODULES = (
    ModuleRow("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ModuleRow("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ModuleRow("3c", 0, 128, 160, 64, 96, "reduce", 0, 2),
    ModuleRow("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ModuleRow("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ModuleRow("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
    ModuleRow("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
    ModuleRow("4e", 0, 128, 192, 192, 256, "reduce", 0, 2),
    ModuleRow("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ModuleRow("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)


@dataclass(frozen=True)
class BNInceptionConfig:
    """``pretrainedmodels.bninception`` keywords (``num_classes``), plus ``in_channels``."""

    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_config(self)


# --------------------------------------------------------------------------- blocks


def conv_bn_relu(
    m: Scope, pre: str, layer: str, x: Tensor, cout: int, kernel: int, stride: int = 1, relu: str | None = None
) -> Tensor:
    """Caffe's conv (with bias, "same" padding) -> BatchNorm -> ReLU (in place), modules
    ``pre + layer``, ``pre + layer + "_bn"`` and ``relu`` (default ``pre + "relu_" + layer``)."""
    return m.conv_norm_act(
        x,
        cout,
        kernel,
        conv=pre + layer,
        norm=pre + layer + "_bn",
        act="relu",
        act_name=relu or pre + "relu_" + layer,
        stride=stride,
        bias=True,
    )


def pad_odd(x: torch.Tensor) -> torch.Tensor:
    """One ``-inf`` row/column at the bottom/right of an odd-sized map, so that the reduction
    modules' ceil-mode 3x3/2 max pool gives ``ceil(H / 2) x ceil(W / 2)`` and matches the strided
    conv branches it is concatenated with (see the module docstring); even maps pass unchanged.
    A leaf function of FX graphs (``torch.fx.wrap``): it branches on the map's size."""
    h, w = x.shape[-2], x.shape[-1]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    return x


torch.fx.wrap("pad_odd")


def inception_module(m: Scope, x: Tensor, r: ModuleRow) -> Tensor:
    """One BN-Inception module (Sec. 4.2.1): branches 1x1 / 1x1-3x3 / 1x1-3x3-3x3 / pool(-proj),
    concatenated on channels. ``[N, C, H, W] -> [N, c1x1 + c3x3 + cd3x3 + (pool_proj or C), H', W']``
    with ``H' = H`` or ``ceil(H / 2)`` in the reduction modules.
    """
    pre = f"inception_{r.name}_"
    branches = []
    if r.c1x1:
        branches.append(conv_bn_relu(m, pre, "1x1", x, r.c1x1, 1))
    y = conv_bn_relu(m, pre, "3x3_reduce", x, r.c3x3_reduce, 1)
    branches.append(conv_bn_relu(m, pre, "3x3", y, r.c3x3, 3, stride=r.stride))
    y = conv_bn_relu(m, pre, "double_3x3_reduce", x, r.cd3x3_reduce, 1)
    y = conv_bn_relu(m, pre, "double_3x3_1", y, r.cd3x3, 3)
    branches.append(conv_bn_relu(m, pre, "double_3x3_2", y, r.cd3x3, 3, stride=r.stride))
    if r.pool == "reduce":  # Caffe's ceil-mode 3x3/2 max pool, no projection
        branches.append(m.op(pre + "pool", L.max_pool2d, pad_odd(x), 3, 2, ceil_mode=True, tap=False))
    else:
        if r.pool == "avg":  # 3x3/1, zero padding counted in the average (Caffe's AVE pooling)
            y = m.op(pre + "pool", L.avg_pool2d, x, 3, 1, 1, ceil_mode=True, count_include_pad=True, tap=False)
        else:
            y = m.op(pre + "pool", L.max_pool2d, x, 3, 1, 1, ceil_mode=True, tap=False)
        branches.append(conv_bn_relu(m, pre, "pool_proj", y, r.pool_proj, 1))
    return torch.cat(branches, 1)


# --------------------------------------------------------------------------- the network


def forward(m: Scope, cfg: BNInceptionConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``; any size >= 7 (the two ceil-mode 3x3/2 stem
    pools need 4 pixels after the 7x7/2 conv; everything after them is padded or takes 1x1 maps).

    Feature names (Cadene's module names / Caffe's blob names): ``conv1_relu_7x7`` (stride 2),
    ``pool1_3x3_s2`` (4), ``conv2_relu_3x3`` (4), ``pool2_3x3_s2`` (8) and every module's
    concatenated output ``inception_{3a,3b}_output`` (8), ``inception_3c_output`` and
    ``inception_4{a..d}_output`` (16), ``inception_4e_output``, ``inception_5{a,b}_output`` (32).
    """
    y = m.tap("conv1_relu_7x7", conv_bn_relu(m, "conv1_", "7x7_s2", x, 64, 7, stride=2, relu="conv1_relu_7x7"))
    y = m.op("pool1_3x3_s2", L.max_pool2d, y, 3, 2, ceil_mode=True)
    y = conv_bn_relu(m, "conv2_", "3x3_reduce", y, 64, 1)
    y = m.tap("conv2_relu_3x3", conv_bn_relu(m, "conv2_", "3x3", y, 192, 3))
    y = m.op("pool2_3x3_s2", L.max_pool2d, y, 3, 2, ceil_mode=True)
    for r in MODULES:
        y = m.tap(f"inception_{r.name}_output", inception_module(m, y, r))
    # Cadene: AvgPool2d(7) + flatten, i.e. the same thing on the 7x7 map of a 224 input
    y = m.op("global_pool", L.adaptive_avg_pool2d, y, 1, tap=False).flatten(1)
    return m.linear("last_linear", y, cfg.num_classes)


#: Cadene's module keeps torch's defaults: convs and the classifier ``kaiming_uniform(a=sqrt(5))``
#: (uniform in +-1/sqrt(fan_in), bias too), BatchNorm 1/0.
FAMILY = family(
    "bninception",
    BNInceptionConfig,
    forward,
    paper=PAPER,
    defaults={"conv": "kaiming_fan_in_uniform", "linear": "torch_default"},
)

register(
    "inception_v2",
    FAMILY,
    params=11295240,
    reference=Reference("pretrainedmodels", "bninception"),
    notes="BN-Inception as ported from Caffe by Cadene (pretrainedmodels.bninception); neither torchvision "
    "nor timm has it. Global average pool instead of the reference's fixed 7x7 pool (identical at "
    "223-230 px, where the reference runs); reduction pools padded on odd maps (see the module docstring).",
    extra={
        "input_convention": "BGR channel order, 0-255 range, subtract mean (104, 117, 128) per B, G, R "
        "channel, std 1, 224x224 (Cadene pretrained_settings 'imagenet')",
        "input_space": "BGR",
        "input_range": (0, 255),
        "mean": (104.0, 117.0, 128.0),
        "std": (1.0, 1.0, 1.0),
        "input_size": 224,
    },
)
