"""MNASNet (B1 variant) in torchvision's layout.

Tan et al. 2019, "MnasNet: Platform-Aware Neural Architecture Search for Mobile"
(arXiv:1807.11626), Fig. 7. State-dict names are torchvision's: one flat ``layers`` sequence
(``layers.0..7`` stem: conv, BN, ReLU, depthwise conv, BN, ReLU, 1x1 conv, BN; ``layers.8..13``
six stacks of inverted residuals, each ``layers.{n}.{j}.layers.{0..7}``; ``layers.14..16`` the
1x1 head conv, BN, ReLU) and ``classifier.1``. BatchNorm momentum is ``1 - 0.9997``.

Checkpoint versions. torchvision's ``MNASNet`` is at layout *version 2*: the stem widths
(``layers.0`` .. ``layers.7``, and the input of the first stack ``layers.8.0``) scale with
``alpha`` like the rest of the network. Checkpoints saved by older torchvision are *version 1*:
their stem is fixed at 32 -> 16 channels whatever ``alpha`` is. torchvision reads the version
from ``state_dict._metadata`` (a plain dict without it makes ``load_state_dict`` raise) and
swaps in the old stem for version 1 with ``alpha != 1``.

vafunc does not need ``_metadata``: :func:`remap` recognises the layout from the stem's shapes.

* ``alpha`` whose version-2 stem is 32 -> 16 (``mnasnet1_0``): both versions have the same
  names and shapes, so any torchvision checkpoint loads as is.
* other ``alpha`` (``mnasnet0_5``, ``0_75``, ``1_3``): the two versions are different networks
  (different tensor shapes), so no renaming can convert one into the other. Loading a
  version-1 checkpoint into the default (version-2) model raises a ``ValueError`` that says so
  and names the fix: build the model with ``stem_version=1`` (``get_model("mnasnet0_5",
  stem_version=1)``), which is torchvision's version-1 network and loads the file exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from vafunc.core import blocks as B
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register

PAPER = "Tan et al. 2019, MnasNet: Platform-Aware Neural Architecture Search for Mobile, arXiv:1807.11626"

#: Channel depths before scaling: stem conv, stem projection, then the six stacks' outputs.
DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)
#: Fig. 7 (B1): (kernel, stride, expansion, repeats) of the stacks ``layers.8`` .. ``layers.13``.
STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
HEAD = 1280
_FIRST_STACK = 8  # index of the first stack in ``layers``


@dataclass(frozen=True)
class MNASNetConfig:
    """torchvision ``MNASNet`` keywords: ``alpha`` (depth multiplier), ``num_classes``,
    ``dropout``; ``stem_version`` 2 is torchvision's current network, 1 the pre-version-2 one
    (stem fixed at 32 -> 16 channels) that old checkpoints with ``alpha != 1`` need."""

    alpha: float = 1.0
    num_classes: int = 1000
    dropout: float = 0.2
    stem_version: int = 2
    in_channels: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        check_config(self, rates=("dropout",))
        if self.stem_version not in (1, 2):
            raise ValueError(
                f"stem_version must be 1 or 2 (torchvision's MNASNet layout versions), got {self.stem_version!r}"
            )


def depths(cfg: MNASNetConfig) -> tuple[int, ...]:
    """Scaled depths (round to a multiple of 8, preferring to round up); version 1 keeps the
    stem at 32 -> 16."""
    d = tuple(B.make_divisible(c * cfg.alpha, 8) for c in DEPTHS)
    return (32, 16) + d[2:] if cfg.stem_version == 1 else d


class StackBlock(NamedTuple):
    cout: int
    expanded: int
    kernel: int
    stride: int
    cin: int


def plan(cfg: MNASNetConfig) -> tuple[tuple[int, int], tuple]:
    """``(stem channels (conv, projection), stacks of StackBlocks)``."""
    d = depths(cfg)
    stacks, cin = [], d[1]
    for (k, stride, t, n), cout in zip(STACKS, d[2:]):
        stacks.append(
            tuple(
                StackBlock(cout, (cin if j == 0 else cout) * t, k, stride if j == 0 else 1, cin if j == 0 else cout)
                for j in range(n)
            )
        )
        cin = cout
    return d[:2], tuple(stacks)


def block(m: Scope, x: Tensor, b: StackBlock) -> Tensor:
    return B.mbconv(
        m,
        x,
        b.cout,
        cin=b.cin,
        expanded=b.expanded,
        expand=True,
        kernel=b.kernel,
        stride=b.stride,
        act="relu",
        names=B.MNASNET,
    )


#: The stem's depthwise-separable conv at ``layers.3`` .. ``layers.7`` (after the first conv).
_STEM_DS = B.Layout("flat", start=3)


def forward(m: Scope, cfg: MNASNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Feature names (torchvision module paths): ``layers.7`` (stem, stride 2), every block
    ``layers.{8..13}.{j}``, every stack ``layers.8`` .. ``layers.13`` (strides 4, 8, 16, 16,
    32, 32) and ``layers.16`` (head).
    """
    (c0, c1), stacks = plan(cfg)
    y = m.block("layers", layers, x, c0, c1, stacks, tap=False)
    return m.block("classifier", B.classifier, y.mean((2, 3)), cfg.num_classes, cfg.dropout, tap=False, rng=m.rng)


def layers(m: Scope, x: Tensor, c0: int, c1: int, stacks: tuple) -> Tensor:
    """torchvision's flat ``layers`` sequence: stem conv ``0-2``, its depthwise-separable conv
    ``3-7``, the stacks ``8..13``, the head conv ``14-16``."""
    y = m.conv_norm_act(x, c0, 3, conv="0", norm="1", act="relu", stride=2)
    y = B.depthwise_separable(m, y, c1, cin=c0, act="relu", project_act=False, names=_STEM_DS)
    y = m.tap("7", y)
    y = B.stages(m, y, stacks, block, start=_FIRST_STACK)
    h = _FIRST_STACK + len(stacks)
    return m.tap(str(h + 2), m.conv_norm_act(y, HEAD, 1, conv=str(h), norm=str(h + 1), act="relu", act_name=str(h + 2)))


def remap(cfg: MNASNetConfig, flat: dict) -> tuple[dict, list[str]]:
    """Accept torchvision MNASNet checkpoints of either layout version (see module doc).

    Returns ``(flat, notes)`` unchanged when the checkpoint's stem fits ``cfg``; raises a
    ``ValueError`` naming the version mismatch when it has the other version's stem."""
    if "layers.0.weight" not in flat or "layers.6.weight" not in flat:
        return flat, []  # not an MNASNet checkpoint: the strict loader lists what is wrong
    got = (tuple(flat["layers.0.weight"].shape[:1]), tuple(flat["layers.6.weight"].shape[:2]))
    other = MNASNetConfig(cfg.alpha, cfg.num_classes, cfg.dropout, 3 - cfg.stem_version, cfg.in_channels)
    want_d, other_d = depths(cfg), depths(other)
    if got == ((want_d[0],), (want_d[1], want_d[0])) or want_d[:2] == other_d[:2]:
        return flat, []
    if got == ((other_d[0],), (other_d[1], other_d[0])):
        fix = "stem_version=1" if other.stem_version == 1 else "stem_version=2 (the default)"
        raise ValueError(
            f"this is a version-{other.stem_version} torchvision MNASNet checkpoint (stem "
            f"{other_d[0]} -> {other_d[1]} channels), but the model is the version-{cfg.stem_version} "
            f"network for alpha={cfg.alpha} (stem {want_d[0]} -> {want_d[1]}). The two versions differ "
            f"in shape for alpha != 1, so the weights cannot be renamed into each other; build the "
            f"model with {fix} to load this checkpoint"
        )
    return flat, []


#: torchvision's init: BatchNorm momentum ``1 - 0.9997``; the classifier
#: ``kaiming_uniform_(mode="fan_out", nonlinearity="sigmoid")`` with a zero bias.
FAMILY = family(
    "mnasnet",
    MNASNetConfig,
    forward,
    paper=PAPER,
    remap=remap,
    defaults={"linear": "kaiming_fan_out_uniform", "momentum": 1.0 - 0.9997},
)

for _name, _alpha, _n in [
    ("mnasnet0_5", 0.5, 2218512),
    ("mnasnet0_75", 0.75, 3170208),
    ("mnasnet1_0", 1.0, 4383312),
    ("mnasnet1_3", 1.3, 6282256),
]:
    register(_name, FAMILY, params=_n, reference=Reference("torchvision", _name), alpha=_alpha)
