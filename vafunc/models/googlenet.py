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
then; here, without ``aux=True``, their BatchNorm statistics are returned unchanged.) They run
after the last Inception module, in the order of their tensors in the state_dict (their inputs,
the outputs of 4a and 4d, are kept; nothing after them writes to those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.blocks import drop_aux_remap, transform_input
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register
from vafunc.serving._imageops import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["GoogLeNetConfig", "FAMILY", "transform_input", "IMAGENET_MEAN", "IMAGENET_STD"]

PAPER = "Szegedy et al. 2015, Going Deeper with Convolutions, arXiv:1409.4842"

BN_EPS = 1e-3


class InceptionSpec(NamedTuple):
    """One row of Table 1: the widths of the four branches (the input channels follow from the
    previous row)."""

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int


class Pool(NamedTuple):
    kernel: int
    stride: int


#: Table 1 from the 3a module on: Inception modules and the max-pools between them (ceil mode).
BODY = (
    ("inception3a", InceptionSpec(64, 96, 128, 16, 32, 32)),
    ("inception3b", InceptionSpec(128, 128, 192, 32, 96, 64)),
    ("maxpool3", Pool(3, 2)),
    ("inception4a", InceptionSpec(192, 96, 208, 16, 48, 64)),
    ("inception4b", InceptionSpec(160, 112, 224, 24, 64, 64)),
    ("inception4c", InceptionSpec(128, 128, 256, 24, 64, 64)),
    ("inception4d", InceptionSpec(112, 144, 288, 32, 64, 64)),
    ("inception4e", InceptionSpec(256, 160, 320, 32, 128, 128)),
    ("maxpool4", Pool(2, 2)),
    ("inception5a", InceptionSpec(256, 160, 320, 32, 128, 128)),
    ("inception5b", InceptionSpec(384, 192, 384, 48, 128, 128)),
)


class AuxHead(NamedTuple):
    name: str
    slot: int  # dropout key: fold_in(rng, slot)


#: Section 5: auxiliary classifiers on the outputs of 4a and 4d, keyed by the module they follow.
AUX_HEADS = {"inception4a": AuxHead("aux1", 1), "inception4d": AuxHead("aux2", 2)}
AUX_POOLED, AUX_WIDTH, AUX_HIDDEN = 4, 128, 1024


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

    def __post_init__(self) -> None:
        if self.init_weights is None:
            object.__setattr__(self, "init_weights", True)
        check_config(self, bools=("aux_logits", "transform_input", "init_weights"), rates=("dropout", "dropout_aux"))
        if self.transform_input and self.in_channels != 3:
            raise ValueError(f"transform_input needs 3 (RGB) input channels, got in_channels={self.in_channels}")


# --------------------------------------------------------------------------- the network


def basic_conv(m: Scope, x: Tensor, cout: int, kernel: int, **conv_kw: Any) -> Tensor:
    """torchvision's ``BasicConv2d`` (tensors ``conv``, ``bn``): conv (no bias, "same" padding)
    -> BatchNorm (eps 1e-3) -> ReLU."""
    return m.conv_norm_act(x, cout, kernel, conv="conv", norm="bn", act="relu", **conv_kw)


def inception(m: Scope, x: Tensor, b: InceptionSpec) -> Tensor:
    """Inception module with dimension reductions (paper Figure 2b, BN after every conv):
    ``[N, cin, H, W] -> [N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W]``.

    Branches: 1x1; 1x1 -> 3x3; 1x1 -> "5x5" (a 3x3 in torchvision, see the module docstring);
    3x3 max-pool (stride 1, ceil mode; slot "0" of torchvision's branch4) -> 1x1 projection.
    """
    b1 = m.block("branch1", basic_conv, x, b.ch1x1, 1, tap=False)
    b2 = m.block("branch2", _reduce_then_3x3, x, b.ch3x3red, b.ch3x3, tap=False)
    b3 = m.block("branch3", _reduce_then_3x3, x, b.ch5x5red, b.ch5x5, tap=False)
    b4 = m.block("branch4", _pool_then_proj, x, b.pool_proj, tap=False)
    return torch.cat([b1, b2, b3, b4], 1)


def _reduce_then_3x3(m: Scope, x: Tensor, reduce: int, cout: int) -> Tensor:
    """Slot "0": 1x1 reduction; slot "1": 3x3 conv with padding 1."""
    y = m.block("0", basic_conv, x, reduce, 1, tap=False)
    return m.block("1", basic_conv, y, cout, 3, tap=False)


def _pool_then_proj(m: Scope, x: Tensor, cout: int) -> Tensor:
    """Slot "0": 3x3/1 max pool (ceil mode); slot "1": 1x1 projection."""
    y = m.op("0", L.max_pool2d, x, 3, 1, 1, ceil_mode=True, tap=False)
    return m.block("1", basic_conv, y, cout, 1, tap=False)


def aux_head(m: Scope, x: Tensor, num_classes: int, rate: float) -> Tensor:
    """Auxiliary classifier (paper Section 5): 4x4 average pool, 1x1 conv to 128, FC 1024 with
    ReLU and dropout (keyed by ``m.rng``), FC to the classes. ``[N, C, H, W] -> [N, num_classes]``."""
    y = m.block("conv", basic_conv, L.adaptive_avg_pool2d(x, AUX_POOLED), AUX_WIDTH, 1, tap=False)
    y = L.relu(m.linear("fc1", y.flatten(1), AUX_HIDDEN))
    return m.linear("fc2", m.dropout(y, rate, m.rng, name="dropout"), num_classes)


def forward(m: Scope, cfg: GoogLeNetConfig, x: Tensor, *, aux: bool = False) -> Tensor | dict[str, Tensor]:
    """``x [N, C, H, W] -> logits [N, num_classes]``; with ``aux=True``
    ``{"logits", "aux1", "aux2"}`` (train and eval; needs ``aux_logits=True``).

    Feature names: ``conv1``, ``maxpool1`` (stride 4), ``conv2``, ``conv3``, ``maxpool2`` (8),
    ``inception3a``, ``inception3b``, ``maxpool3`` (16), ``inception4a`` .. ``inception4e``,
    ``maxpool4`` (32), ``inception5a``, ``inception5b``.
    Dropout keys: ``m.key(0)`` for the head, ``1`` and ``2`` for aux1 and aux2.
    """
    if aux and not cfg.aux_logits:
        raise ValueError("aux=True needs a model built with aux_logits=True (this one has no auxiliary heads)")
    if cfg.transform_input:
        x = transform_input(x)
    y = m.block("conv1", basic_conv, x, 64, 7, stride=2)
    y = m.op("maxpool1", L.max_pool2d, y, 3, 2, ceil_mode=True)
    y = m.block("conv2", basic_conv, y, 64, 1)
    y = m.block("conv3", basic_conv, y, 192, 3)
    y = m.op("maxpool2", L.max_pool2d, y, 3, 2, ceil_mode=True)
    run_aux = aux or (m.initializing and cfg.aux_logits)
    aux_inputs = {}
    for name, b in BODY:
        if isinstance(b, Pool):
            y = m.op(name, L.max_pool2d, y, b.kernel, b.stride, ceil_mode=True)
        else:
            y = m.block(name, inception, y, b)
        if run_aux and name in AUX_HEADS:
            aux_inputs[AUX_HEADS[name]] = y
    outputs = {
        h.name: m.block(h.name, aux_head, a, cfg.num_classes, cfg.dropout_aux, rng=m.key(h.slot), tap=False)
        for h, a in aux_inputs.items()
    }
    y = m.op("avgpool", L.adaptive_avg_pool2d, y, 1, tap=False).flatten(1)
    logits = m.linear("fc", m.dropout(y, cfg.dropout, m.key(0), name="dropout"), cfg.num_classes)
    return {"logits": logits, **outputs} if aux else logits


def defaults(cfg: GoogLeNetConfig) -> dict:
    """torchvision's init: conv and linear weights truncated normal(0, 0.01) at +-2, BN 1/0,
    linear biases torch's default. ``init_weights=False``: torch's default init."""
    d = {"eps": BN_EPS}
    if cfg.init_weights:
        return {**d, "conv": ("trunc_normal", 0.01), "linear": ("trunc_normal_default_bias", 0.01)}
    return {**d, "conv": "kaiming_fan_in_uniform", "linear": "torch_default"}


FAMILY = family(
    "googlenet",
    GoogLeNetConfig,
    forward,
    paper=PAPER,
    defaults=defaults,
    remap=drop_aux_remap(("aux1.", "aux2."), "auxiliary-head"),
)

register(
    "googlenet",
    FAMILY,
    params=13004888,
    reference=Reference("torchvision", "googlenet"),
    notes=(
        "torchvision's weights=None defaults: aux heads built (13,004,888 params; 6,624,904 with "
        "aux_logits=False, the released checkpoint's inference model), transform_input=False; "
        "BatchNorm eps 1e-3; 3x3 conv in the '5x5' branch as in torchvision"
    ),
)
