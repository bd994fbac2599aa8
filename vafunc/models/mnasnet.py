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

from .. import blocks as B
from .. import layers as L
from ..registry import Family, Reference, check_config, register

PAPER = "Tan et al. 2019, MnasNet: Platform-Aware Neural Architecture Search for Mobile, arXiv:1807.11626"

NORM = B.Norm(eps=1e-5, momentum=1.0 - 0.9997)
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

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        check_config(self, rates=("dropout",))
        if self.stem_version not in (1, 2):
            raise ValueError(f"stem_version must be 1 or 2 (torchvision's MNASNet layout versions), got {self.stem_version!r}")


def depths(cfg: MNASNetConfig) -> tuple[int, ...]:
    """Scaled depths (round to a multiple of 8, preferring to round up); version 1 keeps the
    stem at 32 -> 16."""
    d = tuple(B.make_divisible(c * cfg.alpha, 8) for c in DEPTHS)
    return (32, 16) + d[2:] if cfg.stem_version == 1 else d


def plan(cfg: MNASNetConfig):
    """``(stem Block, stacks of Blocks, head ConvUnit)`` with torchvision's flat key paths."""
    d = depths(cfg)
    stem = B.Block(B.place(B.MNASNET, [
        ("conv", B.conv_unit(cfg.in_channels, d[0], 3, stride=2, act="relu", norm=NORM)),
        ("dw", B.conv_unit(d[0], d[0], 3, groups=d[0], act="relu", norm=NORM)),
        ("project", B.conv_unit(d[0], d[1], 1, norm=NORM)),
    ]))
    stacks, cin = [], d[1]
    for (k, stride, t, n), cout in zip(STACKS, d[2:]):
        stack = []
        for j in range(n):
            stack.append(B.mbconv(
                cin, cout, expanded=cin * t, expand=True, kernel=k, stride=stride if j == 0 else 1,
                act="relu", layout=B.MNASNET, norm=NORM,
            ))
            cin = cout
        stacks.append(tuple(stack))
    head_at = _FIRST_STACK + len(STACKS)
    head = B.conv_unit(cin, HEAD, 1, act="relu", norm=NORM)._replace(
        conv=("layers", str(head_at)), bn=("layers", str(head_at + 1))
    )
    return stem, tuple(stacks), head


def init(cfg: MNASNetConfig, ini) -> dict:
    stem, stacks, head = plan(cfg)
    t = B.init_block(ini, stem)
    for i, stack in enumerate(stacks):
        t["layers"][str(_FIRST_STACK + i)] = {str(j): B.init_block(ini, b) for j, b in enumerate(stack)}
    B.init_unit(ini, t, head)
    # torchvision: kaiming_uniform_(mode="fan_out", nonlinearity="sigmoid"): U(+-sqrt(3 / fan_out))
    bound = (3.0 / cfg.num_classes) ** 0.5
    t["classifier"] = {
        "1": {"weight": ini.uniform((cfg.num_classes, HEAD), -bound, bound), "bias": ini.zeros((cfg.num_classes,))}
    }
    return t


def apply(cfg: MNASNetConfig, params, state, x, *, train: bool = False, rng=None, taps=None):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``.

    Feature names (torchvision module paths): ``layers.7`` (stem, stride 2), every block
    ``layers.{8..13}.{j}``, every stack ``layers.8`` .. ``layers.13`` (strides 4, 8, 16, 16,
    32, 32) and ``layers.16`` (head).
    """
    stem, stacks, head = plan(cfg)
    y, s = B.run_block(params, state, x, stem, train=train)
    y = L.tap(taps, "layers.7", y)
    sl = dict(s["layers"])
    for i, stack in enumerate(stacks):
        name = str(_FIRST_STACK + i)
        pi, si = params["layers"][name], dict(sl[name])
        for j, b in enumerate(stack):
            y, si[str(j)] = B.run_block(pi[str(j)], si[str(j)], y, b, train=train)
            y = L.tap(taps, f"layers.{name}.{j}", y)
        sl[name] = si
        y = L.tap(taps, f"layers.{name}", y)
    s = dict(s, layers=sl)
    y, s = B.apply_unit(params, s, y, head, train=train)
    y = L.tap(taps, f"layers.{_FIRST_STACK + len(stacks) + 2}", y)
    if L.taps_complete(taps):
        return None, (s if train else state)
    y = L.dropout(y.mean((2, 3)), cfg.dropout, rng, train=train)
    return L.linear(params["classifier"]["1"], y), (s if train else state)


def remap(cfg: MNASNetConfig, flat: dict):
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


FAMILY = Family(name="mnasnet", config=MNASNetConfig, init=init, apply=apply, min_size=lambda cfg: 1,
                paper=PAPER, remap=remap)

for _name, _alpha, _n in [
    ("mnasnet0_5", 0.5, 2218512),
    ("mnasnet0_75", 0.75, 3170208),
    ("mnasnet1_0", 1.0, 4383312),
    ("mnasnet1_3", 1.3, 6282256),
]:
    register(
        _name, FAMILY, params=_n, reference=Reference("torchvision", _name),
        deterministic_train={"dropout": 0.0}, alpha=_alpha,
    )
