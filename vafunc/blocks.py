"""Building blocks shared by the mobile / efficient CNN families (one implementation each).

* :func:`make_divisible` -- the channel rounding of MobileNet, MNASNet, EfficientNet and timm;
* :func:`conv_bn_act` -- convolution -> BatchNorm -> optional activation (torchvision's
  ``Conv2dNormActivation``; a :class:`ConvUnit` describes one);
* :func:`squeeze_excite` -- squeeze-and-excitation (Hu et al. 2018; an :class:`SEUnit`);
* :func:`mbconv` -- the inverted residual / MBConv block (MobileNetV2 Sec. 3.3, MobileNetV3,
  MNASNet, EfficientNet), :func:`fused_mbconv` -- Fused-MBConv (EfficientNetV2 Sec. 3.2, Fig. 2),
  :func:`depthwise_separable` -- MobileNetV1's block (Howard et al. 2017, Fig. 3). These three
  only *plan* a :class:`Block` (a tuple of units, data); :func:`run_block` is the one function
  that executes every block (units in order, then the residual with stochastic depth) and
  :func:`init_block` the one that initialises it.

Checkpoint layouts. The same block is stored under different names by different references;
a :class:`Layout` says where each unit's tensors live (key paths inside the block's subtree):

==================  ========================================================================
``TORCHVISION``     MobileNetV3 / EfficientNet: ``block.{i}.0`` conv, ``block.{i}.1`` BN,
                    SE at ``block.{i}.fc1/fc2`` (one ``Conv2dNormActivation`` per unit)
``MOBILENET_V2``    ``conv.{i}.0`` / ``conv.{i}.1``, but the projection is a bare conv + BN:
                    ``conv.{n}``, ``conv.{n+1}``
``MNASNET``         one flat ``nn.Sequential``: ``layers.{k}`` conv, ``layers.{k+1}`` BN and
                    ``layers.{k+2}`` the (parameter-free) activation, so indices skip by 3
``TIMM_DS``         timm's depthwise-separable block: ``conv_dw``/``bn1``, ``conv_pw``/``bn2``
==================  ========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from . import layers as L
from . import random as vrandom

__all__ = [
    "make_divisible",
    "Norm",
    "ConvUnit",
    "SEUnit",
    "Block",
    "Layout",
    "TORCHVISION",
    "MOBILENET_V2",
    "MNASNET",
    "TIMM_DS",
    "conv_unit",
    "place",
    "mbconv",
    "fused_mbconv",
    "depthwise_separable",
    "conv_bn_act",
    "squeeze_excite",
    "apply_unit",
    "run_block",
    "init_unit",
    "init_block",
    "subkey",
]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), rounding up instead when rounding down would lose more than
    ``1 - round_limit`` (10%). The TF MobileNet rule used by torchvision (``_make_divisible``,
    MNASNet's ``_round_to_multiple_of``) and timm (``make_divisible``): 83 -> 80, 84 -> 88."""
    if divisor < 1:
        raise ValueError(f"divisor must be a positive int, got {divisor!r}")
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < round_limit * value else new


# --------------------------------------------------------------------------- units (data)


class Norm(NamedTuple):
    """BatchNorm hyper-parameters (torch's defaults; MobileNetV3 and EfficientNet-B5..B7 use
    ``eps=1e-3, momentum=0.01``, MNASNet ``momentum=3e-4``)."""

    eps: float = 1e-5
    momentum: float = 0.1


class ConvUnit(NamedTuple):
    """One convolution -> BatchNorm -> activation; ``conv``/``bn`` are key paths in the block.

    Padding is "same" for odd kernels: ``(kernel - 1) // 2 * dilation``; no conv bias."""

    cin: int
    cout: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    dilation: int = 1
    act: str | None = None  # a key of layers.ACTIVATIONS, or None
    norm: Norm = Norm()
    conv: tuple = ("0",)
    bn: tuple = ("1",)


class SEUnit(NamedTuple):
    """Squeeze-and-excitation over ``channels`` with a ``squeeze``-wide bottleneck; the two 1x1
    convs (with bias) live at ``path + ("fc1",)`` and ``path + ("fc2",)``."""

    channels: int
    squeeze: int
    act: str = "relu"
    gate: str = "sigmoid"
    path: tuple = ()


class Block(NamedTuple):
    """A residual (or plain) block: ``units`` applied in order, then, if ``residual``,
    ``x + drop_path(y, drop_path)`` (stochastic depth, per sample)."""

    units: tuple
    residual: bool = False
    drop_path: float = 0.0


@dataclass(frozen=True)
class Layout:
    """Where a block's units are stored. ``kind``: ``"cna"`` (unit ``i`` at ``prefix.i.0`` /
    ``prefix.i.1``), ``"cna_bare_project"`` (as ``cna`` but the last unit is a bare conv + BN at
    ``prefix.n`` / ``prefix.n+1``), ``"flat"`` (conv, BN, activation as consecutive indices of one
    sequence) or ``"named"`` (``names``: role -> (conv key, BN key), SE role -> (key,))."""

    kind: str
    prefix: tuple = ()
    names: tuple = ()  # (role, keys) pairs for kind="named"

    def __post_init__(self):
        if self.kind not in {"cna", "cna_bare_project", "flat", "named"}:
            raise ValueError(f"unknown block layout kind {self.kind!r}")


TORCHVISION = Layout("cna", ("block",))
MOBILENET_V2 = Layout("cna_bare_project", ("conv",))
MNASNET = Layout("flat", ("layers",))
TIMM_DS = Layout("named", (), (("dw", ("conv_dw", "bn1")), ("project", ("conv_pw", "bn2")), ("se", ("se",))))


def conv_unit(cin, cout, kernel=1, *, stride=1, groups=1, dilation=1, act=None, norm=Norm()) -> ConvUnit:
    """A :class:`ConvUnit` at the default ``Conv2dNormActivation`` paths (``0`` conv, ``1`` BN)."""
    if cin % groups or cout % groups:
        raise ValueError(f"conv {cin}->{cout} channels is not divisible by groups={groups}")
    return ConvUnit(cin, cout, kernel, stride, groups, dilation, act, norm)


def place(layout: Layout, parts: Sequence[tuple[str, ConvUnit | SEUnit]]) -> tuple:
    """Give each ``(role, unit)`` of a block its key paths under ``layout`` (see module doc)."""
    pre, out, k = layout.prefix, [], 0
    names = dict(layout.names)
    for i, (role, u) in enumerate(parts):
        last = i == len(parts) - 1
        if layout.kind == "named":
            if role not in names:
                raise ValueError(f"layout has no names for a {role!r} unit (known: {sorted(names)})")
            keys = tuple((n,) for n in names[role])
        elif layout.kind == "flat":
            if isinstance(u, SEUnit):
                raise ValueError("the flat (MNASNet) layout has no squeeze-and-excitation slot")
            keys = ((str(k),), (str(k + 1),))
            k += 2 + (u.act is not None)
        elif layout.kind == "cna_bare_project" and last and isinstance(u, ConvUnit):
            keys = ((str(i),), (str(i + 1),))
        else:
            keys = ((str(i),) if isinstance(u, SEUnit) else (str(i), "0"), (str(i), "1"))
        if isinstance(u, SEUnit):
            out.append(u._replace(path=pre + keys[0]))
        else:
            out.append(u._replace(conv=pre + keys[0], bn=pre + keys[1]))
    return tuple(out)


# --------------------------------------------------------------------------- block plans


def mbconv(
    cin: int,
    cout: int,
    *,
    expanded: int,
    kernel: int,
    stride: int,
    act: str,
    layout: Layout,
    norm: Norm = Norm(),
    dilation: int = 1,
    se: tuple | None = None,
    expand: bool | None = None,
    drop_path: float = 0.0,
) -> Block:
    """Inverted residual / MBConv (MobileNetV2 Sec. 3.3, Fig. 3; MnasNet Fig. 7; EfficientNet).

    ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``: 1x1 expansion to ``expanded`` channels
    (skipped when ``expand`` is False; default: when ``expanded == cin``), ``kernel``x``kernel``
    depthwise conv (a dilated conv keeps stride 1 -- MobileNetV3's segmentation tail), optional
    squeeze-and-excitation ``se = (squeeze_channels, act, gate)``, then a linear 1x1 projection.
    The residual is added when ``stride == 1 and cin == cout``, with stochastic depth
    ``drop_path``.
    """
    if stride not in (1, 2):
        raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
    expand = expanded != cin if expand is None else expand
    if not expand and expanded != cin:
        raise ValueError(f"MBConv without expansion needs expanded == cin, got {expanded} != {cin}")
    parts = []
    if expand:
        parts.append(("expand", conv_unit(cin, expanded, 1, act=act, norm=norm)))
    dw_stride = 1 if dilation > 1 else stride
    parts.append(
        ("dw", conv_unit(expanded, expanded, kernel, stride=dw_stride, groups=expanded, dilation=dilation, act=act, norm=norm))
    )
    if se is not None:
        squeeze, se_act, gate = se
        parts.append(("se", SEUnit(expanded, squeeze, se_act, gate)))
    parts.append(("project", conv_unit(expanded, cout, 1, norm=norm)))
    return Block(place(layout, parts), stride == 1 and cin == cout, drop_path)


def fused_mbconv(
    cin: int,
    cout: int,
    *,
    expanded: int,
    kernel: int,
    stride: int,
    act: str,
    layout: Layout,
    norm: Norm = Norm(),
    se: tuple | None = None,
    drop_path: float = 0.0,
) -> Block:
    """Fused-MBConv (EfficientNetV2 Sec. 3.2, Fig. 2): the expansion 1x1 and the depthwise conv
    of MBConv fused into one regular ``kernel``x``kernel`` conv.

    ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``. With ``expanded != cin``: kxk conv to
    ``expanded`` (+ act), optional SE, linear 1x1 projection; otherwise a single kxk conv
    ``cin -> cout`` with activation. Residual (with ``drop_path``) when ``stride == 1 and cin == cout``.
    """
    if stride not in (1, 2):
        raise ValueError(f"Fused-MBConv stride must be 1 or 2, got {stride}")
    if expanded == cin:
        if se is not None:
            raise ValueError("Fused-MBConv without expansion has no squeeze-and-excitation")
        parts = [("fused", conv_unit(cin, cout, kernel, stride=stride, act=act, norm=norm))]
    else:
        parts = [("expand", conv_unit(cin, expanded, kernel, stride=stride, act=act, norm=norm))]
        if se is not None:
            parts.append(("se", SEUnit(expanded, se[0], se[1], se[2])))
        parts.append(("project", conv_unit(expanded, cout, 1, norm=norm)))
    return Block(place(layout, parts), stride == 1 and cin == cout, drop_path)


def depthwise_separable(
    cin: int,
    cout: int,
    *,
    kernel: int = 3,
    stride: int = 1,
    act: str,
    layout: Layout,
    norm: Norm = Norm(),
    project_act: bool = True,
    skip: bool = False,
) -> Block:
    """Depthwise separable convolution (MobileNetV1, Howard et al. 2017, Sec. 3.1, Fig. 3).

    ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``: kxk depthwise conv + BN + act, then 1x1
    pointwise conv + BN (+ act when ``project_act``, as in MobileNetV1). MobileNetV1 has no
    shortcut (``skip=False``); with ``skip`` the identity is added when the shapes allow it.
    """
    parts = [
        ("dw", conv_unit(cin, cin, kernel, stride=stride, groups=cin, act=act, norm=norm)),
        ("project", conv_unit(cin, cout, 1, act=act if project_act else None, norm=norm)),
    ]
    return Block(place(layout, parts), skip and stride == 1 and cin == cout)


# --------------------------------------------------------------------------- execution


def _get(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path: tuple, value):
    """A copy of ``tree`` with ``path`` replaced (dicts along the path are shallow-copied)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def conv_bn_act(pc, pb, sb, x: torch.Tensor, u: ConvUnit, *, train: bool):
    """Conv -> BatchNorm -> activation (``Conv2dNormActivation``): ``[N, cin, H, W] ->
    ([N, cout, H', W'], new BN state)``."""
    return L.conv_bn(
        pc, pb, sb, x, train=train, act=None if u.act is None else L.ACTIVATIONS[u.act],
        eps=u.norm.eps, momentum=u.norm.momentum,
        stride=u.stride, padding=(u.kernel - 1) // 2 * u.dilation, dilation=u.dilation, groups=u.groups,
    )


def squeeze_excite(p, x: torch.Tensor, *, act: str = "relu", gate: str = "sigmoid") -> torch.Tensor:
    """Squeeze-and-excitation (Hu et al. 2018, Eq. 2-4): ``x * gate(fc2(act(fc1(mean_hw(x)))))``.

    ``x [N, C, H, W] -> [N, C, H, W]``; ``fc1``/``fc2`` are 1x1 convs with bias (torchvision's
    ``SqueezeExcitation``). MobileNetV3 gates with a hard sigmoid, EfficientNet with a sigmoid.
    """
    s = L.adaptive_avg_pool2d(x, 1)
    s = L.ACTIVATIONS[act](L.conv2d(p["fc1"], s))
    s = L.ACTIVATIONS[gate](L.conv2d(p["fc2"], s))
    return s * x


def apply_unit(p, s, x: torch.Tensor, u, *, train: bool):
    """Run one unit of a block on ``x``; ``p``/``s`` are the block's subtrees. Returns ``(y, s)``."""
    if isinstance(u, SEUnit):
        return squeeze_excite(_get(p, u.path), x, act=u.act, gate=u.gate), s
    y, sb = conv_bn_act(_get(p, u.conv), _get(p, u.bn), _get(s, u.bn), x, u, train=train)
    return y, (_set(s, u.bn, sb) if train else s)


def run_block(p, s, x: torch.Tensor, b: Block, *, train: bool, rng=None):
    """Execute any planned :class:`Block`: ``(y, new_state)``. ``rng`` drives the block's
    stochastic depth (only needed in train mode with ``b.drop_path > 0``)."""
    y = x
    for u in b.units:
        y, s = apply_unit(p, s, y, u, train=train)
    if b.residual:
        y = L.drop_path(y, b.drop_path, rng, train=train) + x
    return y, s


def subkey(rng, i: int):
    """``fold_in(rng, i)``, or ``None`` when no key was given (eval / deterministic runs)."""
    return None if rng is None else vrandom.fold_in(rng, i)


# --------------------------------------------------------------------------- init


def _put(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _conv_init(ini, cin, cout, kernel, groups, bias, scheme):
    if scheme == "goog":
        # timm / TF EfficientNet: normal, std sqrt(2 / fan_out) with fan_out = k*k*cout/groups
        std = math.sqrt(2.0 / (kernel * kernel * cout // groups))
        return ini.conv(cin, cout, kernel, groups=groups, bias=bias, scheme="normal", std=std)
    return ini.conv(cin, cout, kernel, groups=groups, bias=bias, scheme=scheme)


def init_unit(ini, tree: dict, u, *, conv_scheme: str = "kaiming_fan_out") -> None:
    """Insert the unit's parameters and BN buffers into ``tree`` at its paths (in order)."""
    if isinstance(u, SEUnit):
        _put(tree, u.path + ("fc1",), _conv_init(ini, u.channels, u.squeeze, 1, 1, True, conv_scheme))
        _put(tree, u.path + ("fc2",), _conv_init(ini, u.squeeze, u.channels, 1, 1, True, conv_scheme))
        return
    _put(tree, u.conv, _conv_init(ini, u.cin, u.cout, u.kernel, u.groups, False, conv_scheme))
    _put(tree, u.bn, ini.batch_norm(u.cout))


def init_block(ini, b: Block | Sequence, *, conv_scheme: str = "kaiming_fan_out") -> dict:
    """The merged parameter/buffer tree of a block (or of a sequence of units), reference names.

    ``conv_scheme``: ``"kaiming_fan_out"`` (torchvision) or ``"goog"`` (timm's TF-style init,
    fan-out divided by groups)."""
    tree: dict = {}
    for u in (b.units if isinstance(b, Block) else b):
        init_unit(ini, tree, u, conv_scheme=conv_scheme)
    return tree
