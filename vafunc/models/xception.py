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
``rep.{j}`` indexes timm's ``nn.Sequential`` of [ReLU, SeparableConv, BN] triples, so the indices
skip the ReLUs (and block 1, which starts without a ReLU, is shifted by one).

Config keywords: ``num_classes``, ``in_channels`` (timm's ``in_chans``) and ``drop_rate`` (timm's
name, as torchvision has no Xception: dropout on the pooled features before ``fc``).
Published weights expect 299x299 RGB inputs normalised with mean 0.5 / std 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .. import layers as L
from ..registry import Family, Reference, check_config, register

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
EXIT_CONVS = ((1024, 1536), (1536, 2048))  # conv3, conv4: separable convs after block 12
NUM_FEATURES = 2048


@dataclass(frozen=True)
class XceptionConfig:
    """timm ``Xception`` keywords (``in_chans`` is called ``in_channels`` here)."""

    num_classes: int = 1000
    in_channels: int = 3
    drop_rate: float = 0.0

    def __post_init__(self):
        check_config(self, rates=("drop_rate",))
        object.__setattr__(self, "drop_rate", float(self.drop_rate))


class SepSpec(NamedTuple):
    index: str  # position in timm's ``rep`` Sequential (the BatchNorm is at index + 1)
    cin: int
    cout: int
    relu_before: bool


def block_plan(b: BlockRow) -> tuple[SepSpec, ...]:
    """The separable convs of a block with their ``rep`` indices and channel counts."""
    out = []
    for i in range(b.reps):
        if b.grow_first:
            cin, cout = (b.in_ch if i == 0 else b.out_ch), b.out_ch
        else:
            cin, cout = b.in_ch, (b.in_ch if i < b.reps - 1 else b.out_ch)
        relu = b.start_with_relu or i > 0
        # each rep is [ReLU, SepConv, BN]; without the leading ReLU everything shifts down by one
        idx = 3 * i + 1 - (0 if b.start_with_relu else 1)
        out.append(SepSpec(str(idx), cin, cout, relu))
    return tuple(out)


#: Every block's separable convs, computed once (Python data: nothing for dynamo to trace).
PLANS = tuple(block_plan(b) for b in BLOCKS)


# --------------------------------------------------------------------------- blocks


def separable_conv(p, x, *, padding: int = 1):
    """Depthwise 3x3 conv then pointwise 1x1 conv (Sec. 4), no bias, nothing in between.

    ``[N, C_in, H, W] -> [N, C_out, H, W]``; ``p = {conv1 (depthwise), pointwise}``.
    """
    y = L.conv2d(p["conv1"], x, padding=padding, groups=p["conv1"]["weight"].shape[0])
    return L.conv2d(p["pointwise"], y)


def block(p, s, x, b: BlockRow, seps: tuple[SepSpec, ...], *, train: bool):
    """A residual block of Fig. 5: ``reps`` x (ReLU, separable conv, BN), a 3x3/2 max pool when
    strided, plus the shortcut (identity, or 1x1/stride conv + BN when the shape changes).

    ``x [N, in_ch, H, W] -> [N, out_ch, ceil(H / stride), ceil(W / stride)]``. The shortcut takes
    the block input before the leading ReLU. ``seps`` is the block's entry of :data:`PLANS`.
    """
    s = dict(s)
    rep_s = dict(s["rep"])
    y = x
    for i, sep in enumerate(seps):
        if sep.relu_before:  # the first ReLU keeps x intact for the shortcut; later ones act on fresh BN outputs
            y = L.relu(y) if i == 0 else L.relu_(y)
        bn = str(int(sep.index) + 1)
        y = separable_conv(p["rep"][sep.index], y)
        y, rep_s[bn] = L.batch_norm(p["rep"][bn], rep_s[bn], y, train=train)
    if b.stride != 1:
        y = L.max_pool2d(y, 3, b.stride, 1)
    s["rep"] = rep_s
    if "skip" in p:
        shortcut, s["skipbn"] = L.conv_bn(p["skip"], p["skipbn"], s["skipbn"], x, train=train, stride=b.stride)
    else:
        shortcut = x
    return y.add_(shortcut), s  # y is a fresh BN / pool output: in place, as timm's ``x += skip``


# --------------------------------------------------------------------------- init / apply


def init(cfg: XceptionConfig, ini) -> dict:
    """timm's scheme: every conv (depthwise included) kaiming normal, fan_out; BN 1/0; ``fc``
    torch's default Linear init."""
    t = {
        "conv1": ini.conv(cfg.in_channels, 32, 3),
        "bn1": ini.batch_norm(32),
        "conv2": ini.conv(32, 64, 3),
        "bn2": ini.batch_norm(64),
    }
    for i, b in enumerate(BLOCKS):
        blk = {}
        if b.out_ch != b.in_ch or b.stride != 1:
            blk["skip"] = ini.conv(b.in_ch, b.out_ch, 1)
            blk["skipbn"] = ini.batch_norm(b.out_ch)
        rep = {}
        for sep in PLANS[i]:
            rep[sep.index] = _sep_init(ini, sep.cin, sep.cout)
            rep[str(int(sep.index) + 1)] = ini.batch_norm(sep.cout)
        blk["rep"] = rep
        t[f"block{i + 1}"] = blk
    for j, (cin, cout) in enumerate(EXIT_CONVS):
        t[f"conv{j + 3}"] = _sep_init(ini, cin, cout)
        t[f"bn{j + 3}"] = ini.batch_norm(cout)
    t["fc"] = ini.linear(NUM_FEATURES, cfg.num_classes)
    return t


def _sep_init(ini, cin: int, cout: int) -> dict:
    return {"conv1": ini.conv(cin, cin, 3, groups=cin), "pointwise": ini.conv(cin, cout, 1)}


def apply(cfg: XceptionConfig, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names (``taps``, timm's module paths): ``act1`` (stride 2), ``act2`` (stem output),
    ``block1`` .. ``block12`` (strides 4, 8, 16 for blocks 1-3, 16 for 4-11, 32 for 12; block
    outputs before the next block's leading ReLU), ``conv3``, ``act3``, ``conv4`` and ``act4``
    (the 2048-channel features that are pooled).
    """
    p, s = params, dict(state)
    y, s["bn1"] = L.conv_bn(p["conv1"], p["bn1"], s["bn1"], x, train=train, act=L.relu, stride=2)
    y = L.tap(taps, "act1", y)
    y, s["bn2"] = L.conv_bn(p["conv2"], p["bn2"], s["bn2"], y, train=train, act=L.relu)
    y = L.tap(taps, "act2", y)
    for i, b in enumerate(BLOCKS):
        name = f"block{i + 1}"
        y, s[name] = block(p[name], s[name], y, b, PLANS[i], train=train)
        y = L.tap(taps, name, y)
        if L.taps_complete(taps):
            return None, (s if train else state)
    for j in (3, 4):
        y = L.tap(taps, f"conv{j}", separable_conv(p[f"conv{j}"], y))
        y, s[f"bn{j}"] = L.batch_norm(p[f"bn{j}"], s[f"bn{j}"], y, train=train)
        y = L.tap(taps, f"act{j}", L.relu_(y))  # a fresh BN output
        if L.taps_complete(taps):
            return None, (s if train else state)
    y = L.dropout(L.global_avg_pool(y), cfg.drop_rate, rng, train=train)
    return L.linear(p["fc"], y), (s if train else state)


FAMILY = Family(
    name="xception",
    config=XceptionConfig,
    init=init,
    apply=apply,
    # conv1 (3x3/2, no padding) needs 3 pixels and must leave conv2 (3x3, no padding) 3 of them;
    # the strided blocks pad (max pool 3x3/2 pad 1, 1x1/2 projection), so 1x1 maps go through.
    min_size=lambda cfg: 7,
    paper=PAPER,
)

register(
    "xception", FAMILY, params=22855952, reference=Reference("timm", "legacy_xception"),
    deterministic_train={"drop_rate": 0.0},
    notes="timm legacy_xception (= Cadene pretrainedmodels.xception): the Keras ImageNet weights; "
    "timm's xception41/65/71 are the later DeepLab 'aligned' variants, a different network.",
    extra={"input_size": 299, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
)
