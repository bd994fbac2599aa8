"""MobileNet V1, V2 and V3.

* V1: Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
  Applications" (arXiv:1704.04861), Table 1. torchvision has no V1; names, layout and init follow
  timm's ``mobilenetv1_100`` (the most used public checkpoint): ``conv_stem``, ``bn1``,
  ``blocks.{i}.{j}.conv_dw/bn1/conv_pw/bn2``, ``classifier``. ReLU6 everywhere, no shortcuts.
* V2: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
  (arXiv:1801.04381), Table 2. torchvision names: ``features.{0..18}``, blocks at
  ``features.{n}.conv.*`` (see :data:`vafunc.blocks.MOBILENET_V2`), ``classifier.1``.
* V3: Howard et al. 2019, "Searching for MobileNetV3" (arXiv:1905.02244), Tables 1-2.
  torchvision names: ``features.{n}.block.{i}.{0,1}``, SE at ``block.{i}.fc1/fc2``,
  ``classifier.0`` and ``classifier.3``. BatchNorm ``eps=1e-3, momentum=0.01``.

All blocks are the shared ones of :mod:`vafunc.blocks` (depthwise separable, MBConv, SE,
conv-BN-act); the per-family differences are data (stage tables, layouts, norms).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import blocks as B
from .. import layers as L
from ..registry import Family, Reference, check_config, register

PAPER_V1 = "Howard et al. 2017, MobileNets: Efficient CNNs for Mobile Vision Applications, arXiv:1704.04861"
PAPER_V2 = "Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks, arXiv:1801.04381"
PAPER_V3 = "Howard et al. 2019, Searching for MobileNetV3, arXiv:1905.02244"


def _check_common(cfg, dropout_field: str = "dropout"):
    check_config(cfg, rates=(dropout_field,))
    if not cfg.width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {cfg.width_mult!r}")


# =========================================================================== MobileNetV1

#: Table 1 of the paper, as timm's arch def: (blocks, output channels, stride of the first).
V1_STAGES = ((1, 64, 1), (2, 128, 2), (2, 256, 2), (6, 512, 2), (2, 1024, 2))


@dataclass(frozen=True)
class MobileNetV1Config:
    """timm ``mobilenetv1_*`` keywords: ``num_classes``, ``drop_rate`` (dropout before the
    classifier), ``width_mult`` (timm's ``channel_multiplier``: 1.0 is ``mobilenetv1_100``,
    1.25 ``mobilenetv1_125``), ``in_channels`` (timm's ``in_chans``)."""

    num_classes: int = 1000
    width_mult: float = 1.0
    drop_rate: float = 0.0
    in_channels: int = 3

    def __post_init__(self):
        _check_common(self, "drop_rate")


def plan_v1(cfg: MobileNetV1Config):
    """``(stem ConvUnit, stages of Blocks, feature channels)``; channels rounded like timm."""
    ch = lambda c: B.make_divisible(c * cfg.width_mult, 8)  # noqa: E731
    stem = B.conv_unit(cfg.in_channels, ch(32), 3, stride=2, act="relu6")._replace(conv=("conv_stem",), bn=("bn1",))
    cin, stages = ch(32), []
    for n, c, stride in V1_STAGES:
        stage = []
        for j in range(n):
            stage.append(B.depthwise_separable(cin, ch(c), stride=stride if j == 0 else 1, act="relu6", layout=B.TIMM_DS))
            cin = ch(c)
        stages.append(tuple(stage))
    return stem, tuple(stages), cin


def init_v1(cfg: MobileNetV1Config, ini) -> dict:
    stem, stages, feat = plan_v1(cfg)
    t = B.init_block(ini, [stem], conv_scheme="goog")
    t["blocks"] = {
        str(i): {str(j): B.init_block(ini, b, conv_scheme="goog") for j, b in enumerate(stage)}
        for i, stage in enumerate(stages)
    }
    t["classifier"] = ini.linear(feat, cfg.num_classes, scheme="uniform_range")
    return t


def apply_v1(cfg: MobileNetV1Config, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names: ``bn1`` (stem, stride 2), every block ``blocks.{i}.{j}`` and every stage
    ``blocks.0`` .. ``blocks.4`` (strides 2, 4, 8, 16, 32) -- timm's module paths.
    """
    stem, stages, _ = plan_v1(cfg)
    y, s = B.apply_unit(params, dict(state), x, stem, train=train)
    y = L.tap(taps, "bn1", y)
    sb = dict(s["blocks"])
    for i, stage in enumerate(stages):
        pi, si = params["blocks"][str(i)], dict(sb[str(i)])
        for j, b in enumerate(stage):
            y, si[str(j)] = B.run_block(pi[str(j)], si[str(j)], y, b, train=train)
            y = L.tap(taps, f"blocks.{i}.{j}", y)
        sb[str(i)] = si
        y = L.tap(taps, f"blocks.{i}", y)
    s["blocks"] = sb
    if L.taps_complete(taps):
        return None, (s if train else state)
    y = L.dropout(L.global_avg_pool(y), cfg.drop_rate, rng, train=train)
    return L.linear(params["classifier"], y), (s if train else state)


FAMILY_V1 = Family(name="mobilenet_v1", config=MobileNetV1Config, init=init_v1, apply=apply_v1,
                   min_size=lambda cfg: 1, paper=PAPER_V1)


# =========================================================================== MobileNetV2

#: Table 2 of the paper: (expansion t, output channels c, repeats n, first stride s).
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


@dataclass(frozen=True)
class MobileNetV2Config:
    """torchvision ``MobileNetV2`` keywords (``block``/``norm_layer`` aside);
    ``inverted_residual_setting=None`` means the paper's Table 2 (:data:`V2_SETTING`)."""

    num_classes: int = 1000
    width_mult: float = 1.0
    inverted_residual_setting: tuple | None = None
    round_nearest: int = 8
    dropout: float = 0.2
    in_channels: int = 3

    def __post_init__(self):
        _check_common(self)
        rows = V2_SETTING if self.inverted_residual_setting is None else self.inverted_residual_setting
        rows = tuple(tuple(r) for r in rows)
        if not rows or any(len(r) != 4 for r in rows):
            raise ValueError(f"inverted_residual_setting must be non-empty rows of 4 (t, c, n, s), got {rows}")
        for t, c, n, s in rows:
            if s not in (1, 2) or int(n) < 1 or int(c) < 1 or not t > 0:
                raise ValueError(f"bad inverted_residual_setting row {(t, c, n, s)}: need t > 0, c >= 1, n >= 1, s in (1, 2)")
        object.__setattr__(self, "inverted_residual_setting", rows)
        if not isinstance(self.round_nearest, int) or self.round_nearest < 1:
            raise ValueError(f"round_nearest must be a positive int, got {self.round_nearest!r}")


def plan_v2(cfg: MobileNetV2Config):
    """``(stem, blocks, head)``: ``features.0``, ``features.1..n``, ``features.n+1``."""
    rnd = cfg.round_nearest
    cin = B.make_divisible(32 * cfg.width_mult, rnd)
    last = B.make_divisible(1280 * max(1.0, cfg.width_mult), rnd)
    stem = B.conv_unit(cfg.in_channels, cin, 3, stride=2, act="relu6")
    blocks = []
    for t, c, n, s in cfg.inverted_residual_setting:
        cout = B.make_divisible(c * cfg.width_mult, rnd)
        for j in range(int(n)):
            blocks.append(B.mbconv(
                cin, cout, expanded=int(round(cin * t)), expand=t != 1, kernel=3, stride=s if j == 0 else 1,
                act="relu6", layout=B.MOBILENET_V2,
            ))
            cin = cout
    head = B.conv_unit(cin, last, 1, act="relu6")
    return stem, tuple(blocks), head


def init_v2(cfg: MobileNetV2Config, ini) -> dict:
    stem, blocks, head = plan_v2(cfg)
    feats = {"0": B.init_block(ini, [stem])}
    for n, b in enumerate(blocks, 1):
        feats[str(n)] = B.init_block(ini, b)
    feats[str(len(blocks) + 1)] = B.init_block(ini, [head])
    return {"features": feats, "classifier": {"1": ini.linear(head.cout, cfg.num_classes, scheme="normal", std=0.01)}}


def _run_features(p, s, x, units_or_blocks, *, train, taps, rng=None):
    """Run ``features.0 .. features.K`` (each a ConvUnit or a Block) with a tap after each."""
    s, y = dict(s), x
    for n, b in enumerate(units_or_blocks):
        k = str(n)
        if isinstance(b, B.Block):
            y, s[k] = B.run_block(p[k], s[k], y, b, train=train, rng=B.subkey(rng, n))
        else:
            y, s[k] = B.apply_unit(p[k], s[k], y, b, train=train)
        y = L.tap(taps, f"features.{n}", y)
        if L.taps_complete(taps):
            break
    return y, s


def apply_v2(cfg: MobileNetV2Config, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names: ``features.0`` .. ``features.18`` (torchvision's module paths; the stem is
    stride 2, the last block of each stride level ends a stage).
    """
    stem, blocks, head = plan_v2(cfg)
    s = dict(state)
    y, s["features"] = _run_features(params["features"], state["features"], x, (stem, *blocks, head), train=train, taps=taps)
    if L.taps_complete(taps):
        return None, (s if train else state)
    y = L.dropout(L.global_avg_pool(y), cfg.dropout, rng, train=train)
    return L.linear(params["classifier"]["1"], y), (s if train else state)


FAMILY_V2 = Family(name="mobilenet_v2", config=MobileNetV2Config, init=init_v2, apply=apply_v2,
                   min_size=lambda cfg: 1, paper=PAPER_V2)


# =========================================================================== MobileNetV3

#: Tables 1 (large) and 2 (small): (input, kernel, expanded, output, SE, activation, stride).
#: Rows from index ``c4`` on form the last stage ("C4"): ``dilated`` gives them dilation 2
#: instead of the stride, ``reduced_tail`` halves their output (and, after the first, their
#: expanded) channels -- torchvision's segmentation-backbone options.
V3_ARCH = {
    "large": dict(
        rows=(
            (16, 3, 16, 16, False, "relu", 1),
            (16, 3, 64, 24, False, "relu", 2),
            (24, 3, 72, 24, False, "relu", 1),
            (24, 5, 72, 40, True, "relu", 2),
            (40, 5, 120, 40, True, "relu", 1),
            (40, 5, 120, 40, True, "relu", 1),
            (40, 3, 240, 80, False, "hardswish", 2),
            (80, 3, 200, 80, False, "hardswish", 1),
            (80, 3, 184, 80, False, "hardswish", 1),
            (80, 3, 184, 80, False, "hardswish", 1),
            (80, 3, 480, 112, True, "hardswish", 1),
            (112, 3, 672, 112, True, "hardswish", 1),
            (112, 5, 672, 160, True, "hardswish", 2),
            (160, 5, 960, 160, True, "hardswish", 1),
            (160, 5, 960, 160, True, "hardswish", 1),
        ),
        c4=12,
        last_channel=1280,
    ),
    "small": dict(
        rows=(
            (16, 3, 16, 16, True, "relu", 2),
            (16, 3, 72, 24, False, "relu", 2),
            (24, 3, 88, 24, False, "relu", 1),
            (24, 5, 96, 40, True, "hardswish", 2),
            (40, 5, 240, 40, True, "hardswish", 1),
            (40, 5, 240, 40, True, "hardswish", 1),
            (40, 5, 120, 48, True, "hardswish", 1),
            (48, 5, 144, 48, True, "hardswish", 1),
            (48, 5, 288, 96, True, "hardswish", 2),
            (96, 5, 576, 96, True, "hardswish", 1),
            (96, 5, 576, 96, True, "hardswish", 1),
        ),
        c4=8,
        last_channel=1024,
    ),
}
V3_NORM = B.Norm(eps=1e-3, momentum=0.01)


@dataclass(frozen=True)
class MobileNetV3Config:
    """torchvision ``mobilenet_v3_large/small`` keywords: ``num_classes``, ``dropout``,
    ``width_mult``, ``reduced_tail``, ``dilated``; ``arch`` is ``"large"`` or ``"small"``."""

    arch: str = "large"
    num_classes: int = 1000
    width_mult: float = 1.0
    reduced_tail: bool = False
    dilated: bool = False
    dropout: float = 0.2
    in_channels: int = 3

    def __post_init__(self):
        if self.arch not in V3_ARCH:
            raise ValueError(f"arch must be one of {sorted(V3_ARCH)}, got {self.arch!r}")
        _check_common(self)


def plan_v3(cfg: MobileNetV3Config):
    """``(stem, blocks, head, hidden)``: ``features.0``, ``features.1..n``, ``features.n+1``,
    and the width of the first classifier layer."""
    arch = V3_ARCH[cfg.arch]
    ch = lambda c: B.make_divisible(c * cfg.width_mult, 8)  # noqa: E731
    div, dil = (2 if cfg.reduced_tail else 1), (2 if cfg.dilated else 1)
    blocks = []
    for i, (cin, k, exp, out, se, act, stride) in enumerate(arch["rows"]):
        tail, after = i >= arch["c4"], i > arch["c4"]
        cin, exp, out = ch(cin // div if after else cin), ch(exp // div if after else exp), ch(out // div if tail else out)
        blocks.append(B.mbconv(
            cin, out, expanded=exp, kernel=k, stride=stride, dilation=dil if tail else 1, act=act,
            se=(B.make_divisible(exp // 4, 8), "relu", "hardsigmoid") if se else None,
            layout=B.TORCHVISION, norm=V3_NORM,
        ))
    first = blocks[0].units[0].cin
    stem = B.conv_unit(cfg.in_channels, first, 3, stride=2, act="hardswish", norm=V3_NORM)
    head = B.conv_unit(out, 6 * out, 1, act="hardswish", norm=V3_NORM)
    return stem, tuple(blocks), head, ch(arch["last_channel"] // div)


def init_v3(cfg: MobileNetV3Config, ini) -> dict:
    stem, blocks, head, hidden = plan_v3(cfg)
    feats = {"0": B.init_block(ini, [stem])}
    for n, b in enumerate(blocks, 1):
        feats[str(n)] = B.init_block(ini, b)
    feats[str(len(blocks) + 1)] = B.init_block(ini, [head])
    return {
        "features": feats,
        "classifier": {
            "0": ini.linear(head.cout, hidden, scheme="normal", std=0.01),
            "3": ini.linear(hidden, cfg.num_classes, scheme="normal", std=0.01),
        },
    }


def apply_v3(cfg: MobileNetV3Config, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names: ``features.0`` .. ``features.{n+1}`` (torchvision's module paths).
    """
    stem, blocks, head, _ = plan_v3(cfg)
    s = dict(state)
    y, s["features"] = _run_features(params["features"], state["features"], x, (stem, *blocks, head), train=train, taps=taps)
    if L.taps_complete(taps):
        return None, (s if train else state)
    pc = params["classifier"]
    y = L.hardswish(L.linear(pc["0"], L.global_avg_pool(y)))
    y = L.dropout(y, cfg.dropout, rng, train=train)
    return L.linear(pc["3"], y), (s if train else state)


FAMILY_V3 = Family(name="mobilenet_v3", config=MobileNetV3Config, init=init_v3, apply=apply_v3,
                   min_size=lambda cfg: 1, paper=PAPER_V3)


# =========================================================================== registry

register(
    "mobilenet_v1", FAMILY_V1, params=4231976, reference=Reference("timm", "mobilenetv1_100"),
    notes="timm mobilenetv1_100 layout and init (torchvision has no MobileNetV1)",
)
register(
    "mobilenet_v2", FAMILY_V2, params=3504872, reference=Reference("torchvision", "mobilenet_v2"),
    deterministic_train={"dropout": 0.0},
)
register(
    "mobilenet_v3_large", FAMILY_V3, params=5483032, reference=Reference("torchvision", "mobilenet_v3_large"),
    deterministic_train={"dropout": 0.0}, arch="large",
)
register(
    "mobilenet_v3_small", FAMILY_V3, params=2542856, reference=Reference("torchvision", "mobilenet_v3_small"),
    deterministic_train={"dropout": 0.0}, arch="small",
)
