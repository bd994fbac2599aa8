"""GoogLeNet (Inception v1) with BatchNorm, in torchvision's layout.

Szegedy et al. 2015, "Going Deeper with Convolutions" (arXiv:1409.4842), Table 1 (the network),
Figure 2(b) (the Inception module) and Section 5 (the auxiliary classifiers). torchvision's
version adds BatchNorm (eps 1e-3) after every convolution, uses a 3x3 (not 5x5) convolution in
the "5x5" branch (pytorch/vision#906; the released weights have that shape) and pools the
auxiliary heads adaptively to 4x4.

State-dict names are torchvision's: ``conv{1,2,3}.{conv,bn}``, ``inception{3a..5b}.branch1``,
``.branch{2,3}.{0,1}``, ``.branch4.1``, ``aux{1,2}.{conv,fc1,fc2}`` (only with ``aux_logits``)
and ``fc``.

The auxiliary heads are computed only when asked for: ``apply(..., aux=True)`` returns
``({"logits", "aux1", "aux2"}, new_state)`` in train and eval mode alike; the default returns
``(logits, new_state)``. (torchvision runs them in every train-mode call and returns a namedtuple
then; here, without ``aux=True``, their BatchNorm statistics are returned unchanged.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import layers as L
from .. import random as vrandom
from ..registry import Family, Reference, check_config, register

PAPER = "Szegedy et al. 2015, Going Deeper with Convolutions, arXiv:1409.4842"

BN_EPS = 1e-3

#: ImageNet mean/std per RGB channel; ``transform_input`` re-normalises inputs prepared with
#: them to the (x - 0.5) / 0.5 scaling of the original (Google) weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionSpec(NamedTuple):
    """One row of Table 1: input channels and the widths of the four branches."""

    cin: int
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int

    @property
    def cout(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


class Pool(NamedTuple):
    kernel: int
    stride: int


#: Table 1 from the 3a module on: Inception modules and the max-pools between them (ceil mode).
BODY = (
    ("inception3a", InceptionSpec(192, 64, 96, 128, 16, 32, 32)),
    ("inception3b", InceptionSpec(256, 128, 128, 192, 32, 96, 64)),
    ("maxpool3", Pool(3, 2)),
    ("inception4a", InceptionSpec(480, 192, 96, 208, 16, 48, 64)),
    ("inception4b", InceptionSpec(512, 160, 112, 224, 24, 64, 64)),
    ("inception4c", InceptionSpec(512, 128, 128, 256, 24, 64, 64)),
    ("inception4d", InceptionSpec(512, 112, 144, 288, 32, 64, 64)),
    ("inception4e", InceptionSpec(528, 256, 160, 320, 32, 128, 128)),
    ("maxpool4", Pool(2, 2)),
    ("inception5a", InceptionSpec(832, 256, 160, 320, 32, 128, 128)),
    ("inception5b", InceptionSpec(832, 384, 192, 384, 48, 128, 128)),
)


class AuxHead(NamedTuple):
    name: str
    cin: int
    slot: int  # dropout key: fold_in(rng, slot)


#: Section 5: auxiliary classifiers on the outputs of 4a and 4d, keyed by the module they follow.
AUX_HEADS = {"inception4a": AuxHead("aux1", 512, 1), "inception4d": AuxHead("aux2", 528, 2)}
AUX_POOLED, AUX_WIDTH, AUX_HIDDEN = 4, 128, 1024
FEATURES_OUT = 1024


@dataclass(frozen=True)
class GoogLeNetConfig:
    """torchvision ``GoogLeNet`` keywords (``blocks`` aside); defaults are torchvision's with
    ``weights=None``. ``init_weights=None`` means ``True``, as in torchvision."""

    num_classes: int = 1000
    aux_logits: bool = True
    transform_input: bool = False
    init_weights: bool | None = True
    dropout: float = 0.2
    dropout_aux: float = 0.7
    in_channels: int = 3

    def __post_init__(self):
        if self.init_weights is None:
            object.__setattr__(self, "init_weights", True)
        check_config(self, bools=("aux_logits", "transform_input", "init_weights"), rates=("dropout", "dropout_aux"))
        if self.transform_input and self.in_channels != 3:
            raise ValueError(f"transform_input needs 3 (RGB) input channels, got in_channels={self.in_channels}")


# --------------------------------------------------------------------------- shared pieces


def transform_input(x: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation and redo it as ``(x - 0.5) / 0.5``: ``[N, 3, H, W] -> same``.

    Computed channel by channel as ``x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5`` (the Python
    floats rounded to float32 by torch, exactly like torchvision), then concatenated; the
    algebraically equal ``(x * std + mean - 0.5) / 0.5`` rounds differently, visibly so in the
    logits of deep networks.
    """
    channels = [
        x[:, c : c + 1] * (std / 0.5) + (mean - 0.5) / 0.5
        for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))
    ]
    return torch.cat(channels, 1)


def basic_conv(p, s, x, *, train: bool, **conv_kw):
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU.

    ``p = {conv, bn}``; returns ``(y, new_state)`` with ``new_state = {"bn": ...}``.
    """
    y, bn = L.conv_bn(p["conv"], p["bn"], s["bn"], x, train=train, act=L.relu, eps=BN_EPS, **conv_kw)
    return y, {"bn": bn}


def init_basic_conv(ini, cin: int, cout: int, kernel, *, std: float | None) -> dict:
    """``BasicConv2d`` tensors: ``std`` -> truncated normal(0, std) at +-2, ``None`` -> torch default."""
    if std is None:
        conv = ini.conv(cin, cout, kernel, scheme="kaiming_fan_in_uniform")
    else:
        conv = ini.conv(cin, cout, kernel, scheme="trunc_normal", std=std)
    return {"conv": conv, "bn": ini.batch_norm(cout)}


def init_linear(ini, fin: int, fout: int, *, std: float | None) -> dict:
    """Linear: weight truncated normal(0, std) at +-2 (``None``: torch default), and the bias
    keeps torch's default uniform(+-1/sqrt(fin)) (torchvision's init only touches weights)."""
    if std is None:
        return ini.linear(fin, fout)
    bound = 1.0 / fin**0.5
    return {"weight": ini.trunc_normal((fout, fin), std, -2.0, 2.0), "bias": ini.uniform((fout,), -bound, bound)}


def key(rng, i: int):
    """The dropout key of slot ``i`` (``None`` stays ``None``: no randomness given)."""
    return None if rng is None else vrandom.fold_in(rng, i)


def drop_aux_keys(prefixes: tuple[str, ...], head: str):
    """A ``Family.remap`` that drops auxiliary-head tensors when the config has no aux heads
    (torchvision's checkpoints contain them; its builder deletes them after loading)."""

    def remap(cfg, flat):
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


# --------------------------------------------------------------------------- blocks


def inception(p, s, x, b: InceptionSpec, *, train: bool):
    """Inception module with dimension reductions (paper Figure 2b, BN after every conv):
    ``[N, cin, H, W] -> [N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W]``.

    Branches: 1x1; 1x1 -> 3x3; 1x1 -> "5x5" (a 3x3 in torchvision, see the module docstring);
    3x3 max-pool (stride 1, ceil mode) -> 1x1 projection.
    """
    s = dict(s)
    b1, s["branch1"] = basic_conv(p["branch1"], s["branch1"], x, train=train)
    b2, s["branch2"] = _reduce_then_3x3(p["branch2"], s["branch2"], x, train=train)
    b3, s["branch3"] = _reduce_then_3x3(p["branch3"], s["branch3"], x, train=train)
    pooled = L.max_pool2d(x, 3, 1, 1, ceil_mode=True)  # slot "0" of torchvision's branch4
    s4 = dict(s["branch4"])
    b4, s4["1"] = basic_conv(p["branch4"]["1"], s4["1"], pooled, train=train)
    s["branch4"] = s4
    return torch.cat([b1, b2, b3, b4], 1), s


def _reduce_then_3x3(p, s, x, *, train: bool):
    """Slot "0": 1x1 reduction; slot "1": 3x3 conv with padding 1. Returns ``(y, new_state)``."""
    s = dict(s)
    y, s["0"] = basic_conv(p["0"], s["0"], x, train=train)
    y, s["1"] = basic_conv(p["1"], s["1"], y, train=train, padding=1)
    return y, s


def aux_head(p, s, x, *, dropout: float, train: bool, rng):
    """Auxiliary classifier (paper Section 5): 4x4 average pool, 1x1 conv to 128, FC 1024 with
    ReLU and dropout, FC to the classes. ``[N, C, H, W] -> ([N, num_classes], new_state)``."""
    y = L.adaptive_avg_pool2d(x, AUX_POOLED)
    y, s = basic_conv(p["conv"], s["conv"], y, train=train)
    y = L.relu(L.linear(p["fc1"], y.flatten(1)))
    y = L.dropout(y, dropout, rng, train=train)
    return L.linear(p["fc2"], y), {"conv": s}


# --------------------------------------------------------------------------- init / apply


def init(cfg: GoogLeNetConfig, ini) -> dict:
    """torchvision's init: conv and linear weights truncated normal(0, 0.01) at +-2, BN 1/0,
    linear biases torch's default. ``init_weights=False``: torch's default init."""
    std = 0.01 if cfg.init_weights else None

    def conv(cin, cout, k):
        return init_basic_conv(ini, cin, cout, k, std=std)

    t = {"conv1": conv(cfg.in_channels, 64, 7), "conv2": conv(64, 64, 1), "conv3": conv(64, 192, 3)}
    for name, b in BODY:
        if isinstance(b, InceptionSpec):
            t[name] = {
                "branch1": conv(b.cin, b.ch1x1, 1),
                "branch2": {"0": conv(b.cin, b.ch3x3red, 1), "1": conv(b.ch3x3red, b.ch3x3, 3)},
                "branch3": {"0": conv(b.cin, b.ch5x5red, 1), "1": conv(b.ch5x5red, b.ch5x5, 3)},
                "branch4": {"1": conv(b.cin, b.pool_proj, 1)},
            }
    if cfg.aux_logits:
        for head in AUX_HEADS.values():
            t[head.name] = {
                "conv": conv(head.cin, AUX_WIDTH, 1),
                "fc1": init_linear(ini, AUX_WIDTH * AUX_POOLED**2, AUX_HIDDEN, std=std),
                "fc2": init_linear(ini, AUX_HIDDEN, cfg.num_classes, std=std),
            }
    t["fc"] = init_linear(ini, FEATURES_OUT, cfg.num_classes, std=std)
    return t


def apply(cfg: GoogLeNetConfig, params, state, x, *, train: bool = False, rng=None, taps=None, aux: bool = False):
    """``x [N, C, H, W] -> (logits [N, num_classes], new_state)``; with ``aux=True``
    ``({"logits", "aux1", "aux2"}, new_state)`` (train and eval; needs ``aux_logits=True``).

    Feature names (``taps``): ``conv1``, ``maxpool1`` (stride 4), ``conv2``, ``conv3``,
    ``maxpool2`` (8), ``inception3a``, ``inception3b``, ``maxpool3`` (16), ``inception4a`` ..
    ``inception4e``, ``maxpool4`` (32), ``inception5a``, ``inception5b``.
    Dropout keys: ``fold_in(rng, 0)`` for the head, ``1`` and ``2`` for aux1 and aux2.
    """
    if aux and not cfg.aux_logits:
        raise ValueError("aux=True needs a model built with aux_logits=True (this one has no auxiliary heads)")
    p, s = params, dict(state)
    if cfg.transform_input:
        x = transform_input(x)
    y, s["conv1"] = basic_conv(p["conv1"], s["conv1"], x, train=train, stride=2, padding=3)
    y = L.tap(taps, "conv1", y)
    y = L.tap(taps, "maxpool1", L.max_pool2d(y, 3, 2, ceil_mode=True))
    y, s["conv2"] = basic_conv(p["conv2"], s["conv2"], y, train=train)
    y = L.tap(taps, "conv2", y)
    y, s["conv3"] = basic_conv(p["conv3"], s["conv3"], y, train=train, padding=1)
    y = L.tap(taps, "conv3", y)
    y = L.tap(taps, "maxpool2", L.max_pool2d(y, 3, 2, ceil_mode=True))
    outputs = {}
    for name, b in BODY:
        if isinstance(b, Pool):
            y = L.max_pool2d(y, b.kernel, b.stride, ceil_mode=True)
        else:
            y, s[name] = inception(p[name], s[name], y, b, train=train)
        y = L.tap(taps, name, y)
        if aux and name in AUX_HEADS:
            h = AUX_HEADS[name].name
            outputs[h], s[h] = aux_head(
                p[h], s[h], y, dropout=cfg.dropout_aux, train=train, rng=key(rng, AUX_HEADS[name].slot)
            )
    if L.taps_complete(taps):
        return None, (s if train else state)
    y = L.dropout(L.global_avg_pool(y), cfg.dropout, key(rng, 0), train=train)
    logits = L.linear(p["fc"], y)
    out = {"logits": logits, **outputs} if aux else logits
    return out, (s if train else state)


FAMILY = Family(
    name="googlenet",
    config=GoogLeNetConfig,
    init=init,
    apply=apply,
    min_size=lambda cfg: 15,
    paper=PAPER,
    remap=drop_aux_keys(("aux1.", "aux2."), "auxiliary-head"),
)

register(
    "googlenet", FAMILY, params=13004888, reference=Reference("torchvision", "googlenet"),
    deterministic_train={"dropout": 0.0, "dropout_aux": 0.0},
    notes=(
        "torchvision's weights=None defaults: aux heads built (13,004,888 params; 6,624,904 with "
        "aux_logits=False, the released checkpoint's inference model), transform_input=False; "
        "BatchNorm eps 1e-3; 3x3 conv in the '5x5' branch as in torchvision"
    ),
    extra={"aux_outputs": (("aux1", "aux_logits1"), ("aux2", "aux_logits2"))},
)
