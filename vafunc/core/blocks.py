"""Building blocks of the mobile / efficient CNNs, as kit scope functions (:mod:`vafunc.core.kit`).

One implementation of each concept, for every family that uses it:

* :func:`make_divisible` -- the channel rounding of MobileNet, MNASNet, EfficientNet and timm;
* :func:`mbconv` -- the inverted residual / MBConv block (MobileNetV2 Sec. 3.3, MobileNetV3,
  MNASNet, EfficientNet), :func:`fused_mbconv` -- Fused-MBConv (EfficientNetV2 Sec. 3.2, Fig. 2),
  :func:`depthwise_separable` -- MobileNetV1's block (Howard et al. 2017, Fig. 3). Each is
  ``fn(m, x, cout, *, ..., names=LAYOUT, drop_path=, rng=)``; their convolutions are the kit's
  ``m.conv_norm_act`` and their squeeze-and-excitation the kit's ``m.squeeze_excite``;
* :func:`stages` -- the stage loop (stage ``i``, block ``j``, a feature tap after each, one
  stochastic-depth key per block), and :func:`sequence`, its flat form;
* :func:`up_conv` and :func:`skip_cat` -- the U-Nets' expansive path (Ronneberger et al. 2015,
  Fig. 1; MONAI's ``UpCat``): the 2x2 up-convolution and the skip concatenation, the two maps
  brought to one size by a crop or a pad.

Checkpoint layouts. The same block is stored under different names by different references;
a :class:`Layout` says where each unit of a block keeps its tensors (``names=``):

==================  ========================================================================
``TORCHVISION``     MobileNetV3 / EfficientNet: ``block.{i}.0`` conv, ``block.{i}.1`` BN,
                    SE at ``block.{i}.fc1/fc2`` (one ``Conv2dNormActivation`` per unit)
``MOBILENET_V2``    ``conv.{i}.0`` / ``conv.{i}.1``, but the projection is a bare conv + BN:
                    ``conv.{n}``, ``conv.{n+1}``
``MNASNET``         one flat ``nn.Sequential``: ``layers.{k}`` conv, ``layers.{k+1}`` BN and
                    ``layers.{k+2}`` the (parameter-free) activation, so indices skip by 3
``TIMM_DS``         timm's depthwise-separable block: ``conv_dw``/``bn1``, ``se.conv_reduce/
                    conv_expand``, ``conv_pw``/``bn2`` (a :meth:`Layout.named` layout)
``TIMM_IR``         timm's inverted residual (``InvertedResidual``): ``conv_pw``/``bn1``,
                    ``conv_dw``/``bn2``, ``se.conv_reduce/conv_expand``, ``conv_pwl``/``bn3``
==================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core.kit import Scope

__all__ = [
    "make_divisible",
    "Layout",
    "TORCHVISION",
    "MOBILENET_V2",
    "MNASNET",
    "TIMM_DS",
    "TIMM_IR",
    "mbconv",
    "fused_mbconv",
    "depthwise_separable",
    "sequence",
    "stages",
    "classifier",
    "transform_input",
    "drop_aux_remap",
    "up_conv",
    "skip_cat",
    "SKIP_FITS",
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


# --------------------------------------------------------------------------- layouts


def _split(key: str) -> tuple[tuple, str]:
    *path, name = key.split(".")
    return tuple(path), name


@dataclass(frozen=True)
class Layout:
    """Where a block's units keep their tensors, inside the block's scope.

    A block is a sequence of units, each a *role* (``"expand"``, ``"dw"``, ``"fused"``, ``"se"``,
    ``"project"``) that has an activation or not. ``kind``:

    * ``"cna"``: unit ``i`` is one module at ``prefix.{start + i}``, its conv at ``.0`` and BN at
      ``.1`` (torchvision's ``Conv2dNormActivation``), an SE unit's 1x1 convs at ``.fc1``/``.fc2``;
    * ``"cna_bare_project"``: as ``cna``, but the last unit is a bare conv + BN at
      ``prefix.{start + n}`` / ``prefix.{start + n + 1}``;
    * ``"flat"``: conv, BN and activation are consecutive indices of one sequence ``prefix``,
      from ``start`` (a unit without activation takes two indices); no SE;
    * ``"named"``: ``names`` maps each role to its (conv key, BN key) -- or (fc1 key, fc2 key)
      for SE -- dotted paths in the block (:meth:`named`).
    """

    kind: str
    prefix: str = ""
    start: int = 0
    names: tuple = ()  # (role, (key, key)) pairs for kind="named"

    def __post_init__(self) -> None:
        if self.kind not in {"cna", "cna_bare_project", "flat", "named"}:
            raise ValueError(f"unknown block layout kind {self.kind!r}")

    @classmethod
    def named(cls, **roles: tuple[str, str]) -> Layout:
        """A layout by state-dict names: ``Layout.named(dw=("conv_dw", "bn1"), se=("se.fc1",
        "se.fc2"), ...)``; the two keys of a role share their module path."""
        for role, (a, b) in roles.items():
            if _split(a)[0] != _split(b)[0]:
                raise ValueError(f"the {role!r} keys {a!r} and {b!r} must share their module path")
        return cls("named", names=tuple(roles.items()))

    def place(self, units: tuple) -> list:
        """``units``: ``((role, has_act), ...)`` -> ``[(module path tuple, key, key), ...]``."""
        pre = tuple(self.prefix.split(".")) if self.prefix else ()
        out, k, last = [], self.start, len(units) - 1
        for i, (role, act) in enumerate(units):
            if self.kind == "named":
                keys = dict(self.names).get(role)
                if keys is None:
                    raise ValueError(f"layout has no names for a {role!r} unit (known: {[r for r, _ in self.names]})")
                (path, a), (_, b) = _split(keys[0]), _split(keys[1])
                out.append((pre + path, a, b))
            elif self.kind == "flat":
                if role == "se":
                    raise ValueError("the flat (MNASNet) layout has no squeeze-and-excitation slot")
                out.append((pre, str(k), str(k + 1)))
                k += 2 + bool(act)
            elif self.kind == "cna_bare_project" and i == last and role != "se":
                out.append((pre, str(self.start + i), str(self.start + i + 1)))
            else:
                out.append(((*pre, str(self.start + i)), *(("fc1", "fc2") if role == "se" else ("0", "1"))))
        return out

    def run(self, m: Scope, x: Tensor, units: tuple, calls: tuple) -> Tensor:
        """Run a block's units in ``m``: ``units`` as in :meth:`place`, ``calls`` one
        ``(fn, args, kw)`` per unit (``Scope.conv_norm_act`` or ``Scope.squeeze_excite``), to
        which the unit's two keys are given as ``conv``/``norm`` (``fc1``/``fc2`` for SE). Every
        module path of the layout is a block of its own, so the units that share a container
        (torchvision's ``block``, MobileNetV2's ``conv``, MNASNet's ``layers``) run inside one
        call of it, in order. The plan is built once per distinct block (:func:`_plan`)."""
        return run_units(m, x, _plan(self, units, calls))


_PLANS: dict = {}


def _plan(layout: Layout, units: tuple, calls: tuple) -> tuple:
    """:meth:`Layout.run`'s steps grouped by module path (see :func:`run_units`), built once per
    distinct ``(layout, units, calls)``: every call of the same block gets the same plan object, so
    a module tree recognises its build arguments by identity. (A dict, not ``functools.cache``:
    dynamo traces through it without a warning.)"""
    key = (layout, units, calls)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _build_plan(layout, units, calls)
    return plan


def _build_plan(layout: Layout, units: tuple, calls: tuple) -> tuple:
    steps = []
    for (path, a, b), (role, act), (fn, args, kw) in zip(layout.place(units), units, calls):
        keys = {"fc1": a, "fc2": b} if role == "se" else {"conv": a, "norm": b}
        if layout.kind == "flat" and act:  # the activation module follows the BN in the sequence
            keys["act_name"] = str(int(b) + 1)
        steps.append((path, fn, tuple(args), {**dict(kw), **keys}))
    return _group(steps)


def _group(steps: list) -> tuple:
    """``(module path, fn, args, kw)`` steps -> a plan of ``(None, fn, args, kw)`` (run here) and
    ``(name, None, inner plan, None)`` (consecutive steps under the module ``name``, one block)."""
    out, i = [], 0
    while i < len(steps):
        path, fn, args, kw = steps[i]
        if not path:
            out.append((None, fn, args, kw))
            i += 1
            continue
        j = i
        while j < len(steps) and steps[j][0][:1] == path[:1]:
            j += 1
        out.append((path[0], None, _group([(p[1:], f, a, k) for p, f, a, k in steps[i:j]]), None))
        i = j
    return tuple(out)


TORCHVISION = Layout("cna", "block")
MOBILENET_V2 = Layout("cna_bare_project", "conv")
MNASNET = Layout("flat", "layers")
TIMM_DS = Layout.named(dw=("conv_dw", "bn1"), se=("se.conv_reduce", "se.conv_expand"), project=("conv_pw", "bn2"))
TIMM_IR = Layout.named(
    expand=("conv_pw", "bn1"),
    dw=("conv_dw", "bn2"),
    se=("se.conv_reduce", "se.conv_expand"),
    project=("conv_pwl", "bn3"),
)


# --------------------------------------------------------------------------- blocks


def run_units(m: Scope, y: Tensor, plan: tuple) -> Tensor:
    """Run a plan of :func:`_group` from ``m``: a step ``(None, fn, args, kw)`` is
    ``fn(m, y, *args, **kw)``; a group ``(name, None, inner, None)`` runs ``inner`` inside one
    ``m.block`` of that module (a module tree in torch_compat, a child scope in the pure apply)."""
    for name, fn, args, kw in plan:
        y = fn(m, y, *args, **kw) if name is None else m.block(name, run_units, y, args, tap=False)
    return y


def _residual(m: Scope, x: Tensor, y: Tensor, rate: float, rng: Tensor | None) -> Tensor:
    """``x + drop_path(y)`` (per-sample stochastic depth, keyed by ``rng`` or the scope's key),
    added in place into ``y``, the block's fresh last-layer output (torchvision's ``result += input``):
    same values, one feature map less alive at the peak."""
    return m.drop_path(y, rate, m.rng if rng is None else rng).add_(x)


def mbconv(
    m: Scope,
    x: Tensor,
    cout: int,
    *,
    cin: int | None = None,
    expanded: int,
    kernel: int,
    stride: int = 1,
    act: str,
    se: int | None = None,
    se_act: str = "relu",
    se_gate: str = "sigmoid",
    dilation: int = 1,
    expand: bool | None = None,
    padding: int | tuple[int, int] | str | None = None,
    names: Layout = TORCHVISION,
    drop_path: float = 0.0,
    rng: Tensor | None = None,
    eps: float | None = None,
    momentum: float | None = None,
) -> Tensor:
    """Inverted residual / MBConv (MobileNetV2 Sec. 3.3, Fig. 3; MnasNet Fig. 7; EfficientNet).

    ``x [N, cin, H, W] -> [N, cout, H/stride, W/stride]``: 1x1 expansion to ``expanded``
    channels (skipped when ``expand`` is False; default: when ``expanded == cin``),
    ``kernel``x``kernel`` depthwise conv (a dilated conv keeps stride 1 -- MobileNetV3's
    segmentation tail; ``padding``: the kit's conv padding, default "same"), optional
    squeeze-and-excitation to ``se`` channels (``se_act``, ``se_gate``), then a linear 1x1
    projection. The residual is added when ``stride == 1 and cin == cout``, with stochastic depth
    ``drop_path`` keyed by ``rng`` (default: the scope's key). ``eps``/``momentum``: BatchNorm's
    (default: the family's). ``cin``: the input channels, read off ``x`` when not given; the
    families pass it from their block specs, so that no Python decision reads a tensor's shape
    (torch_compat's module trees are traced by FX with symbolic shapes).
    """
    cin = x.shape[1] if cin is None else cin
    if stride not in (1, 2):
        raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
    expand = expanded != cin if expand is None else expand
    if not expand and expanded != cin:
        raise ValueError(f"MBConv without expansion needs expanded == cin, got {expanded} != {cin}")
    bn = (("eps", eps), ("momentum", momentum))
    units = (("expand", True),) * expand + (("dw", True),) + (("se", False),) * (se is not None) + (("project", False),)
    calls = (
        ((Scope.conv_norm_act, (expanded, 1), (("act", act),) + bn),) * expand
        + (
            (
                Scope.conv_norm_act,
                (expanded, kernel),
                (
                    ("act", act),
                    ("stride", 1 if dilation > 1 else stride),
                    ("padding", padding),
                    ("dilation", dilation),
                    ("groups", expanded),
                )
                + bn,
            ),
        )
        + ((Scope.squeeze_excite, (se,), (("act", se_act), ("gate", se_gate))),) * (se is not None)
        + ((Scope.conv_norm_act, (cout, 1), bn),)
    )
    y = names.run(m, x, units, calls)
    return _residual(m, x, y, drop_path, rng) if stride == 1 and cin == cout else y


def fused_mbconv(
    m: Scope,
    x: Tensor,
    cout: int,
    *,
    cin: int | None = None,
    expanded: int,
    kernel: int,
    stride: int = 1,
    act: str,
    se: int | None = None,
    se_act: str = "relu",
    se_gate: str = "sigmoid",
    padding: int | tuple[int, int] | str | None = None,
    names: Layout = TORCHVISION,
    drop_path: float = 0.0,
    rng: Tensor | None = None,
    eps: float | None = None,
    momentum: float | None = None,
) -> Tensor:
    """Fused-MBConv (EfficientNetV2 Sec. 3.2, Fig. 2): the expansion 1x1 and the depthwise conv
    of MBConv fused into one regular ``kernel``x``kernel`` conv.

    ``x [N, cin, H, W] -> [N, cout, H/stride, W/stride]``. With ``expanded != cin``: kxk conv to
    ``expanded`` (+ act), optional SE, linear 1x1 projection; otherwise a single kxk conv
    ``cin -> cout`` with activation (role ``"fused"``). Residual (with ``drop_path``) when
    ``stride == 1 and cin == cout``; other keywords as :func:`mbconv`.
    """
    cin = x.shape[1] if cin is None else cin
    if stride not in (1, 2):
        raise ValueError(f"Fused-MBConv stride must be 1 or 2, got {stride}")
    bn = (("eps", eps), ("momentum", momentum))
    conv = (("act", act), ("stride", stride), ("padding", padding)) + bn
    if expanded == cin:
        if se is not None:
            raise ValueError("Fused-MBConv without expansion has no squeeze-and-excitation")
        y = names.run(m, x, (("fused", True),), ((Scope.conv_norm_act, (cout, kernel), conv),))
    else:
        units = (("expand", True),) + (("se", False),) * (se is not None) + (("project", False),)
        calls = (
            ((Scope.conv_norm_act, (expanded, kernel), conv),)
            + ((Scope.squeeze_excite, (se,), (("act", se_act), ("gate", se_gate))),) * (se is not None)
            + ((Scope.conv_norm_act, (cout, 1), bn),)
        )
        y = names.run(m, x, units, calls)
    return _residual(m, x, y, drop_path, rng) if stride == 1 and cin == cout else y


def depthwise_separable(
    m: Scope,
    x: Tensor,
    cout: int,
    *,
    cin: int | None = None,
    kernel: int = 3,
    stride: int = 1,
    act: str,
    project_act: bool = True,
    se: int | None = None,
    se_act: str = "relu",
    se_gate: str = "sigmoid",
    skip: bool = False,
    padding: int | tuple[int, int] | str | None = None,
    names: Layout = TIMM_DS,
    drop_path: float = 0.0,
    rng: Tensor | None = None,
    eps: float | None = None,
    momentum: float | None = None,
) -> Tensor:
    """Depthwise separable convolution (MobileNetV1, Howard et al. 2017, Sec. 3.1, Fig. 3).

    ``x [N, cin, H, W] -> [N, cout, H/stride, W/stride]``: kxk depthwise conv + BN + act,
    optional SE (timm's ``DepthwiseSeparableConv``), then 1x1 pointwise conv + BN (+ act when
    ``project_act``, as in MobileNetV1). MobileNetV1 has no shortcut (``skip=False``); with
    ``skip`` the identity is added (with ``drop_path``) when the shapes allow it.
    """
    cin = x.shape[1] if cin is None else cin
    bn = (("eps", eps), ("momentum", momentum))
    units = (("dw", True),) + (("se", False),) * (se is not None) + (("project", project_act),)
    calls = (
        (
            (
                Scope.conv_norm_act,
                (cin, kernel),
                (("act", act), ("stride", stride), ("padding", padding), ("groups", cin)) + bn,
            ),
        )
        + ((Scope.squeeze_excite, (se,), (("act", se_act), ("gate", se_gate))),) * (se is not None)
        + ((Scope.conv_norm_act, (cout, 1), (("act", act if project_act else None),) + bn),)
    )
    y = names.run(m, x, units, calls)
    return _residual(m, x, y, drop_path, rng) if skip and stride == 1 and cin == cout else y


# --------------------------------------------------------------------------- the stage loop


def sequence(
    m: Scope, x: Tensor, specs: Sequence[Any], block: Callable[..., Tensor], *, start: int = 0, index: int = 0
) -> Tensor:
    """Blocks in a row: ``block(child, x, spec)`` for each spec, at the children ``start``,
    ``start + 1``, ... of ``m``, each output tapped under its path. Block ``j`` gets the key
    ``fold_in(m.rng, index + j)`` (its stochastic depth), ``None`` without a key."""
    for j, spec in enumerate(specs):
        x = m.block(str(start + j), block, x, spec, rng=m.key(index + j))
    return x


def stages(
    m: Scope, x: Tensor, plan: Sequence[Sequence[Any]], block: Callable[..., Tensor], *, start: int = 0
) -> Tensor:
    """The stage loop: stage ``i`` of ``plan`` (a sequence of block specs) at child
    ``start + i`` of ``m``, its blocks at ``.0``, ``.1``, ... (:func:`sequence`); every block and
    every stage output is tapped (``features.2.1``, then ``features.2``). Blocks are counted over
    all stages: block ``b`` gets the key ``fold_in(m.rng, b)``."""
    b = 0
    for i, specs in enumerate(plan):
        x = m.block(str(start + i), sequence, x, specs, block, rng=m.rng, index=b)
        b += len(specs)
    return x


def classifier(m: Scope, x: Tensor, num_classes: int, rate: float, *, init: Any = None) -> Tensor:
    """torchvision's ``classifier = Sequential(Dropout(rate), Linear(C, num_classes))``
    (MobileNetV2, EfficientNet, MNASNet): ``[N, C] -> [N, num_classes]``, the dropout keyed by
    the scope's key."""
    return m.linear("1", m.dropout(x, rate, m.rng, name="0"), num_classes, init=init)


# --------------------------------------------------------------------------- Inception-era helpers


def transform_input(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``transform_input`` (GoogLeNet, Inception v3): undo ImageNet normalisation
    and redo it as ``(x - 0.5) / 0.5``, the scaling of the original (Google) weights:
    ``[N, 3, H, W] -> same``.

    Computed channel by channel as ``x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5`` (the Python
    floats rounded to float32 by torch, exactly like torchvision), then concatenated; the
    algebraically equal ``(x * std + mean - 0.5) / 0.5`` rounds differently, visibly so in the
    logits of deep networks.
    """
    from vafunc.serving._imageops import IMAGENET_MEAN, IMAGENET_STD

    channels = [
        x[:, c : c + 1] * (std / 0.5) + (mean - 0.5) / 0.5
        for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))
    ]
    return torch.cat(channels, 1)


def drop_aux_remap(prefixes: tuple[str, ...], head: str) -> Callable:
    """A ``remap`` (see :func:`family`) that drops auxiliary-head tensors from a checkpoint when
    the config has no aux heads (``cfg.aux_logits`` false; torchvision's checkpoints contain them
    and its builders delete them after loading), with a note naming them."""

    def remap(cfg: Any, flat: dict) -> tuple[dict, list[str]]:
        if cfg.aux_logits:
            return flat, []
        dropped = [k for k in flat if k.startswith(prefixes)]
        if not dropped:
            return flat, []
        kept = {k: v for k, v in flat.items() if not k.startswith(prefixes)}
        heads = ", ".join(p + "*" for p in prefixes)
        note = (
            f"dropped {len(dropped)} {head} tensors ({heads}) from the checkpoint: the model was "
            "built with aux_logits=False"
        )
        return kept, [note]

    return remap


# --------------------------------------------------------------------------- U-Net's expansive path


def _up_conv(m: Scope, x: Tensor, cout: int, weight_init: tuple, bias_init: tuple) -> Tensor:
    w = m.param("weight", (x.shape[1], cout, 2, 2), weight_init)
    b = m.param("bias", (cout,), bias_init)
    return F.conv_transpose2d(x, w, b, stride=2)


def up_conv(
    m: Scope, name: str, x: Tensor, cout: int, weight_init: tuple, bias_init: tuple = ("zeros",), *, tap: bool = False
) -> Tensor:
    """The 2x2 up-convolution at ``name`` (``nn.ConvTranspose2d(cin, cout, 2, stride=2)``: weight
    ``[cin, cout, 2, 2]``, bias ``[cout]``): ``[N, cin, H, W] -> [N, cout, 2H, 2W]``, each output
    pixel one kernel tap of one input pixel. ``weight_init``/``bias_init``: the family's
    :meth:`Scope.param` init specs (the U-Net paper's normal, torch's default uniform)."""
    spec = (("in_channels", x.shape[1]), ("out_channels", cout), ("kernel_size", 2), ("stride", 2))
    return m.block(name, _up_conv, x, cout, weight_init, bias_init, tap=tap, module=("ConvTranspose2d", spec))


#: how :func:`skip_cat` brings the skip and the up-sampled map to one size
SKIP_FITS = ("crop", "zeros", "replicate")


def skip_cat(skip: Tensor, up: Tensor, fit: str) -> Tensor:
    """``[skip, up]`` along the channels (skip channels first), the maps brought to one size:
    ``fit="crop"`` centre-crops the skip to the up-sampled map (the paper's unpadded U-Net, "copy
    and crop"); ``"zeros"`` / ``"replicate"`` pad the up-sampled map to the skip's size where a
    pooling floored an odd side (the extra pixel at the bottom/right: milesial's Pytorch-UNet pads
    zeros, MONAI's ``UpCat`` replicates the edge)."""
    if fit not in SKIP_FITS:
        raise ValueError(f"fit must be one of {SKIP_FITS}, got {fit!r}")
    dh, dw = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
    if fit == "crop":
        skip = skip[..., dh // 2 : dh // 2 + up.shape[-2], dw // 2 : dw // 2 + up.shape[-1]]
    elif dh or dw:
        pad = [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2]
        up = F.pad(up, pad) if fit == "zeros" else F.pad(up, pad, mode="replicate")
    return torch.cat([skip, up], 1)


torch.fx.wrap("skip_cat")  # one FX node: it compares the two maps' sizes in Python (call it as B.skip_cat)
