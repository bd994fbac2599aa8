"""Xception (Chollet 2017), the original ImageNet model, in timm's ``legacy_xception`` layout.

Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions" (arXiv:1610.02357),
Fig. 5: an entry flow (two plain 3x3 convs, then three strided residual blocks of separable
convs), a middle flow of eight identical 728-channel blocks, and an exit flow (one strided block,
two separable convs, global average pooling, linear classifier). A separable conv is a depthwise
3x3 conv followed by a pointwise 1x1 conv, with no BatchNorm or non-linearity in between (Sec. 4).

State-dict names are timm's (the Keras weights ported by Cadene and timm, ``legacy_xception``):
``conv1``, ``bn1``, ``conv2``, ``bn2``, ``block{1..12}.skip``, ``block{i}.skipbn``,
``block{i}.rep.{j}.conv1`` (depthwise), ``block{i}.rep.{j}.pointwise``, ``block{i}.rep.{j}``
(BatchNorm), ``conv3``/``conv4`` (separable: ``.conv1``, ``.pointwise``), ``bn3``, ``bn4``, ``fc``.
``rep.{j}`` indexes timm's ``nn.Sequential`` of [ReLU, SeparableConv, BN] triples (block 1, which
starts without a ReLU, is shifted by one), ended by the 3x3 max pool in the strided blocks.

Config keywords: ``num_classes``, ``in_channels`` (timm's ``in_chans``) and ``drop_rate`` (timm's
name, as torchvision has no Xception: dropout on the pooled features before ``fc``).
Published weights expect 299x299 RGB inputs normalised with mean 0.5 / std 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Chollet 2017, Xception: Deep Learning with Depthwise Separable Convolutions, arXiv:1610.02357"


class BlockRow(NamedTuple):
    """One residual block of Fig. 5."""

    in_ch: int
    out_ch: int
    reps: int  # separable convs in the block
    stride: int  # 2: the block ends with a 3x3/2 max pool and has a strided 1x1 projection
    start_with_relu: bool  # False only for the first block (it follows the stem's ReLU)
    grow_first: bool  # widen at the first separable conv (True) or at the last (False)


#: Fig. 5 as data: entry flow (blocks 1-3), middle flow (4-11), exit flow (12).
BLOCKS = (
    BlockRow(64, 128, 2, 2, False, True),
    BlockRow(128, 256, 2, 2, True, True),
    BlockRow(256, 728, 2, 2, True, True),
    *(BlockRow(728, 728, 3, 1, True, True),) * 8,
    BlockRow(728, 1024, 2, 2, True, False),
)
EXIT_CONVS = (1536, 2048)  # conv3, conv4: the widths of the separable convs after block 12


@dataclass(frozen=True)
class XceptionConfig:
    """timm ``Xception`` keywords (``in_chans`` is called ``in_channels`` here)."""

    num_classes: int = 1000
    in_channels: int = 3
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        check_config(self, rates=("drop_rate",))
        object.__setattr__(self, "drop_rate", float(self.drop_rate))


class SepSpec(NamedTuple):
    relu: str | None  # position of the ReLU before it in timm's ``rep`` Sequential (None: none)
    index: str  # position of the separable conv (relu + 1)
    bn: str  # position of its BatchNorm (index + 1)
    cout: int


def block_plan(b: BlockRow) -> tuple[SepSpec, ...]:
    """The separable convs of a block with their ``rep`` indices and output widths."""
    out = []
    for i in range(b.reps):
        cout = b.out_ch if b.grow_first or i == b.reps - 1 else b.in_ch
        # each rep is [ReLU, SepConv, BN]; without the leading ReLU everything shifts down by one
        idx = 3 * i + 1 - (0 if b.start_with_relu else 1)
        out.append(SepSpec(str(idx - 1) if b.start_with_relu or i else None, str(idx), str(idx + 1), cout))
    return tuple(out)


#: Every block's separable convs, computed once (Python data: nothing for dynamo to trace).
PLANS = tuple(block_plan(b) for b in BLOCKS)


# --------------------------------------------------------------------------- the network


def separable_conv(m: Scope, x: Tensor, cout: int) -> Tensor:
    """Depthwise 3x3 conv (``conv1``) then pointwise 1x1 conv (``pointwise``), no bias, nothing
    in between (Sec. 4). ``[N, C_in, H, W] -> [N, cout, H, W]``."""
    c = x.shape[1]
    return m.conv("pointwise", m.conv("conv1", x, c, 3, groups=c), cout, 1)


def rep(m: Scope, x: Tensor, b: BlockRow, seps: tuple[SepSpec, ...]) -> Tensor:
    """timm's ``rep`` Sequential: ``reps`` x (ReLU, separable conv, BN), then a 3x3/stride max
    pool when strided. ``[N, in_ch, H, W] -> [N, out_ch, ceil(H / stride), ceil(W / stride)]``."""
    y = x
    for i, sep in enumerate(seps):
        if sep.relu is not None:  # the first ReLU keeps x intact for the shortcut; later ones act on fresh BN outputs
            y = m.op(sep.relu, L.relu if i == 0 else L.relu_, y, tap=False)
        y = m.batch_norm(sep.bn, m.block(sep.index, separable_conv, y, sep.cout, tap=False))
    if b.stride != 1:
        y = m.op(str(int(seps[-1].bn) + 1), L.max_pool2d, y, 3, b.stride, 1, tap=False)
    return y


def block(m: Scope, x: Tensor, b: BlockRow, seps: tuple[SepSpec, ...]) -> Tensor:
    """A residual block of Fig. 5: :func:`rep` plus the shortcut (identity, or 1x1/stride conv +
    BN when the shape changes).

    ``x [N, in_ch, H, W] -> [N, out_ch, ceil(H / stride), ceil(W / stride)]``. The shortcut takes
    the block input before the leading ReLU; it is computed first, as its tensors come first in
    timm's state_dict. ``seps`` is the block's entry of :data:`PLANS`.
    """
    if b.out_ch != b.in_ch or b.stride != 1:
        shortcut = m.conv_norm_act(x, b.out_ch, 1, conv="skip", norm="skipbn", stride=b.stride)
    else:
        shortcut = x
    y = m.block("rep", rep, x, b, seps, tap=False)
    return y.add_(shortcut)  # y is a fresh BN / pool output: in place, as timm's ``x += skip``


def forward(m: Scope, cfg: XceptionConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (timm's module paths): ``act1`` (stride 2), ``act2`` (stem output),
    ``block1`` .. ``block12`` (strides 4, 8, 16 for blocks 1-3, 16 for 4-11, 32 for 12; block
    outputs before the next block's leading ReLU), ``conv3``, ``act3``, ``conv4`` and ``act4``
    (the 2048-channel features that are pooled).
    """
    # conv1 (3x3/2) and conv2 (3x3) are unpadded: the network needs 7x7 inputs
    y = m.tap(
        "act1", m.conv_norm_act(x, 32, 3, conv="conv1", norm="bn1", act="relu", act_name="act1", stride=2, padding=0)
    )
    y = m.tap("act2", m.conv_norm_act(y, 64, 3, conv="conv2", norm="bn2", act="relu", act_name="act2", padding=0))
    for i, b in enumerate(BLOCKS):
        y = m.block(f"block{i + 1}", block, y, b, PLANS[i])
    for j, cout in enumerate(EXIT_CONVS, 3):
        y = m.block(f"conv{j}", separable_conv, y, cout)
        y = m.op(f"act{j}", L.relu_, m.batch_norm(f"bn{j}", y))  # a fresh BN output
    y = m.op("global_pool", L.global_avg_pool, y, tap=False)  # timm's SelectAdaptivePool2d (with the flatten)
    if cfg.drop_rate:
        y = m.dropout(y, cfg.drop_rate, m.rng)
    return m.linear("fc", y, cfg.num_classes)


FAMILY = family("xception", XceptionConfig, forward, paper=PAPER)

register(
    "xception",
    FAMILY,
    params=22855952,
    reference=Reference("timm", "legacy_xception"),
    notes="timm legacy_xception (= Cadene pretrainedmodels.xception): the Keras ImageNet weights; "
    "timm's xception41/65/71 are the later DeepLab 'aligned' variants, a different network.",
    extra={"input_size": 299, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
)
