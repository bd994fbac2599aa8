"""ShuffleNet V2 in torchvision's layout.

Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
(arXiv:1807.11164), Table 5 (the 0.5x, 1x, 1.5x and 2x networks) and Fig. 3 (c, d: the basic and
the down-sampling unit). A basic unit splits the channels in two halves (*channel split*), keeps
one as it is and sends the other through 1x1 -> depthwise 3x3 -> 1x1; a down-sampling unit sends
the whole input through two branches with stride 2. The halves are concatenated and *shuffled*
(Zhang et al. 2018, ShuffleNet, Sec. 3.1), so that information crosses between them.

State-dict names are torchvision's: ``conv1.{0,1}`` (3x3/2 conv-BN, then ReLU), ``stage{2,3,4}.{i}``
(``InvertedResidual``: ``branch1.{0,1,2,3}`` = depthwise 3x3/2 conv, BN, 1x1 conv, BN (+ ReLU) in
the down-sampling unit; ``branch2.{0,1,3,4,5,6}`` = 1x1 conv, BN, ReLU, depthwise 3x3 conv, BN,
1x1 conv, BN, ReLU), ``conv5.{0,1}`` (1x1 conv-BN-ReLU) and ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Ma et al. 2018, ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design, arXiv:1807.11164"

#: Table 5 of the paper: output channels of conv1, stage2..4 and conv5 per width multiplier (the
#: repeats are (4, 8, 4) for all), as in torchvision's builders.
WIDTHS = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
    "x1_5": (24, 176, 352, 704, 1024),
    "x2_0": (24, 244, 488, 976, 2048),
}
REPEATS = (4, 8, 4)


@dataclass(frozen=True)
class ShuffleNetV2Config:
    """torchvision ``ShuffleNetV2`` keywords: ``stages_repeats`` (units of stage2..4),
    ``stages_out_channels`` (conv1, stage2..4, conv5) and ``num_classes``; ``in_channels`` (3 in
    torchvision) is the library's usual extra."""

    stages_repeats: tuple = REPEATS
    stages_out_channels: tuple = WIDTHS["x1_0"]
    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages_repeats", tuple(self.stages_repeats))
        object.__setattr__(self, "stages_out_channels", tuple(self.stages_out_channels))
        reps, outs = self.stages_repeats, self.stages_out_channels

        def pos(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if len(reps) != 3 or not all(map(pos, reps)):
            raise ValueError(f"expected stages_repeats as 3 positive ints, got {reps}")
        if len(outs) != 5 or not all(map(pos, outs)):
            raise ValueError(f"expected stages_out_channels as 5 positive ints, got {outs}")
        if any(c % 2 for c in outs[1:4]):  # a unit's two branches have c // 2 channels each
            raise ValueError(f"stage output channels (stage2..4) must be even, got {outs}")
        check_config(self)


def branch1(m: Scope, x: Tensor, cin: int, c: int, stride: int) -> Tensor:
    """Depthwise 3x3 conv-BN (stride) -> 1x1 conv-BN-ReLU: ``[N, cin, H, W] -> [N, c, ...]``."""
    y = m.conv_norm_act(x, cin, 3, conv="0", norm="1", stride=stride, groups=cin)
    return m.conv_norm_act(y, c, 1, conv="2", norm="3", act="relu", act_name="4")


def branch2(m: Scope, x: Tensor, c: int, stride: int) -> Tensor:
    """1x1 conv-BN-ReLU -> depthwise 3x3 conv-BN (stride) -> 1x1 conv-BN-ReLU: ``-> [N, c, ...]``."""
    y = m.conv_norm_act(x, c, 1, conv="0", norm="1", act="relu")
    y = m.conv_norm_act(y, c, 3, conv="3", norm="4", stride=stride, groups=c)
    return m.conv_norm_act(y, c, 1, conv="5", norm="6", act="relu", act_name="7")


def inverted_residual(m: Scope, x: Tensor, cin: int, cout: int, stride: int) -> Tensor:
    """``InvertedResidual`` (paper Fig. 3c/d): ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``.

    Basic unit (stride 1): channel split, ``branch2`` on the second half. Down-sampling unit:
    ``branch1`` (depthwise 3x3/2 conv-BN, 1x1 conv-BN-ReLU) and ``branch2`` on the whole input.
    Then concatenation and a channel shuffle with 2 groups (one interleaving copy).
    """
    c = cout // 2
    if stride == 1:
        m.declare("branch1", ("Sequential", ()))  # torchvision keeps an empty one
        x1, x2 = x.chunk(2, dim=1)
        halves = (x1, m.block("branch2", branch2, x2, c, 1, tap=False))
    else:
        halves = (
            m.block("branch1", branch1, x, cin, c, stride, tap=False),
            m.block("branch2", branch2, x, c, stride, tap=False),
        )
    return L.channel_shuffle(halves)  # = channel_shuffle(torch.cat(halves, 1), 2), in one copy


def stage(m: Scope, x: Tensor, repeats: int, cin: int, cout: int) -> Tensor:
    """One stage: a down-sampling unit from ``cin`` channels, then ``repeats - 1`` basic units
    (``stage{s}.{i}``)."""
    for i in range(repeats):
        x = m.block(str(i), inverted_residual, x, cin if i == 0 else cout, cout, 2 if i == 0 else 1)
    return x


def conv_bn_relu(m: Scope, x: Tensor, cout: int, kernel: int, stride: int = 1) -> Tensor:
    """``conv1`` / ``conv5``: conv-BN-ReLU at ``0``/``1`` (padding ``kernel // 2``)."""
    return m.conv_norm_act(x, cout, kernel, act="relu", stride=stride)


def forward(m: Scope, cfg: ShuffleNetV2Config, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names: ``conv1`` (stride 2), ``maxpool`` (4), every unit ``stage{s}.{i}`` and every
    stage ``stage2`` .. ``stage4`` (strides 8, 16, 32), ``conv5``. No randomness.
    """
    outs = cfg.stages_out_channels
    y = m.block("conv1", conv_bn_relu, x, outs[0], 3, 2)
    y = m.op("maxpool", L.max_pool2d, y, 3, 2, 1)
    for s, (repeats, cin, cout) in enumerate(zip(cfg.stages_repeats, outs[0:3], outs[1:4]), 2):
        y = m.block(f"stage{s}", stage, y, repeats, cin, cout)
    y = m.block("conv5", conv_bn_relu, y, outs[4], 1)
    return m.linear("fc", y.mean([2, 3]), cfg.num_classes)  # torchvision's global pool: a mean


FAMILY = family(
    "shufflenetv2",
    ShuffleNetV2Config,
    forward,
    paper=PAPER,
    defaults={"conv": "kaiming_fan_in_uniform", "linear": "torch_default"},
)

for _w, _n in [("x0_5", 1366792), ("x1_0", 2278604), ("x1_5", 3503624), ("x2_0", 7393996)]:
    register(
        f"shufflenet_v2_{_w}",
        FAMILY,
        params=_n,
        reference=Reference("torchvision", f"shufflenet_v2_{_w}"),
        stages_repeats=REPEATS,
        stages_out_channels=WIDTHS[_w],
    )
