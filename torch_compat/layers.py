"""torch's layers where torch has none of its own, for torch_compat's trees (:mod:`torch_compat.tree`).

The parameter-free layers of a declaration (``m.op``) become torch's class where one computes the
same (``nn.ReLU``, ``nn.MaxPool2d``, ...: :func:`op_module`), else an :class:`Op`. Keyed dropout
and stochastic depth (:class:`Dropout`, :class:`DropPath`) take a vafunc key, or draw a fresh one
from torch's global generator. Under FX, the keyed masks, TF "SAME" padding and einops' functions
are single graph nodes (``torch.fx.wrap``).
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import torch
import torch.nn.functional as F
from torch import nn

from vafunc.core import layers as L

__all__ = [
    "LayerNorm2d",
    "Conv2dSame",
    "BatchNormAct2d",
    "InstanceNorm2d",
    "Op",
    "Dropout",
    "DropPath",
    "op_module",
    "fresh_key",
    "keyed_dropout",
    "keyed_drop_path",
    "keyed_attention",
]


def fresh_key(device) -> torch.Tensor:
    """A vafunc key drawn from torch's global generator (a train-mode call without ``rng=``)."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)


def keyed_dropout(x, rate: float, rng, train: bool):
    """:func:`vafunc.core.layers.dropout`, one opaque node under FX (the mask's counters need the shape)."""
    if train and rate and rng is None:
        rng = fresh_key(x.device)
    return L.dropout(x, rate, rng, train=train)


def keyed_drop_path(x, rate: float, rng, train: bool):
    """:func:`vafunc.core.layers.drop_path`, one opaque node under FX."""
    if train and rate and rng is None:
        rng = fresh_key(x.device)
    return L.drop_path(x, rate, rng, train=train)


def keyed_attention(q, k, v, bias, scale, rate: float, rng, train: bool):
    """:func:`vafunc.core.layers.attention` (the documented implementation rule), keyed attention
    dropout; one opaque node under FX (the rule reads the operands' ranks)."""
    if train and rate and rng is None:
        rng = fresh_key(q.device)
    return L.attention(q, k, v, bias=bias, scale=scale, rate=rate, rng=rng, train=train)


torch.fx.wrap("keyed_attention")
torch.fx.wrap("keyed_dropout")
torch.fx.wrap("keyed_drop_path")
# einops does not know FX's Proxy: its functions are single nodes of a traced graph. torch.fx.wrap
# patches a name in the globals of the module that calls it at top level, so it runs at the top
# level of einops' namespace, where the families' ``einops.rearrange(...)`` looks the name up.
exec(
    "import torch.fx\nfor _f in ('rearrange', 'repeat', 'reduce', 'einsum'):\n    torch.fx.wrap(_f)\ndel _f",  # noqa: S102
    einops.__dict__,
)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``[N, C, H, W]`` (torchvision's ConvNeXt ``LayerNorm2d``,
    an ``nn.LayerNorm``): :func:`vafunc.core.layers.layer_norm2d`."""

    def forward(self, x):
        return L.layer_norm2d({"weight": self.weight, "bias": self.bias}, x, eps=self.eps)


def pad_same(x, kernel, stride, dilation):
    """:func:`vafunc.core.layers.pad_same`, one opaque node under FX (the padding is read off the size)."""
    return L.pad_same(x, kernel, stride, dilation)


torch.fx.wrap("pad_same")


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's ``"SAME"`` padding, computed from the input size
    (:func:`vafunc.core.layers.pad_same`; timm's ``Conv2dSame``)."""

    def forward(self, x):
        return self._conv_forward(pad_same(x, self.kernel_size, self.stride, self.dilation), self.weight, self.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by its activation module ``act``, one module (timm's ``BatchNormAct2d``)."""

    def __init__(self, *args, act: Callable, **kw):
        super().__init__(*args, **kw)
        self.drop = nn.Identity()
        self.act = op_module(act, (), {})

    def _check_input_dim(self, x):
        if not torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # FX traces into this class
            super()._check_input_dim(x)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def instance_norm(x, weight, bias, eps):
    """:func:`vafunc.core.layers.instance_norm` on a batch; an unbatched ``[C, H, W]`` map as
    ``nn.InstanceNorm2d`` takes it. One opaque node under FX (both checks read the size)."""
    if x.dim() == 3:
        return F.instance_norm(x.unsqueeze(0), None, None, weight, bias, True, 0.0, eps).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"InstanceNorm2d expects a [N, C, H, W] or [C, H, W] input, got {x.dim()} dimensions")
    return L.instance_norm(x, weight, bias, eps)


torch.fx.wrap("instance_norm")


class InstanceNorm2d(nn.InstanceNorm2d):
    """torch's ``nn.InstanceNorm2d`` (affine, no running statistics) computing what the pure apply
    computes, GroupNorm of one channel per group (:func:`vafunc.core.layers.instance_norm`), so the
    two agree bit for bit; reconfigured (running statistics, no affine), torch's own."""

    def forward(self, x):
        if self.track_running_stats or not self.affine:
            return super().forward(x)
        return instance_norm(x, self.weight, self.bias, self.eps)


class Op(nn.Module):
    """A parameter-free layer of the reference that torch has no class for: ``fn(x, *args, **kw)``."""

    def __init__(self, fn: Callable, args: tuple = (), kw: dict | None = None):
        super().__init__()
        self.fn, self.args, self.kw = fn, tuple(args), dict(kw or {})

    def forward(self, x):
        return self.fn(x, *self.args, **self.kw)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with vafunc's keyed masks (:func:`vafunc.core.layers.dropout`): ``rng=`` a key,
    else (train mode) a fresh key from torch's global generator."""

    def forward(self, x, rng=None):
        return keyed_dropout(x, self.p, rng, self.training)  # (this module's global: the FX wrap applies)


class DropPath(nn.Module):
    """Stochastic depth per sample (torchvision's ``StochasticDepth(mode="row")``, timm's
    ``DropPath``), keyed as :class:`Dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x, rng=None):
        return keyed_drop_path(x, self.p, rng, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def op_module(fn: Callable, args: tuple, kw: dict) -> nn.Module:
    """torch's own class for the common parameter-free layers (same kernels, so the same values),
    :class:`Op` for the rest."""
    if fn in (L.relu, F.relu) and not args and not kw:
        return nn.ReLU()
    if fn in (L.relu_, torch.relu_) and not args and not kw:
        return nn.ReLU(inplace=True)
    if fn is L.identity:
        return nn.Identity()
    if fn is L.leaky_relu_ and not kw:
        return nn.LeakyReLU(*args, inplace=True)
    torch_class = {L.relu6_: nn.ReLU6, L.hardswish_: nn.Hardswish, L.silu_: nn.SiLU}.get(fn)
    if torch_class is not None and not args and not kw:
        return torch_class(inplace=True)
    torch_class = {
        torch.sigmoid: nn.Sigmoid,
        F.gelu: nn.GELU,
        L.hardswish: nn.Hardswish,
        L.silu: nn.SiLU,
        L.relu6: nn.ReLU6,
    }.get(fn)
    if torch_class is not None and not args and not kw:
        return torch_class()
    if fn in (L.adaptive_avg_pool2d, F.adaptive_avg_pool2d) and not kw:
        return nn.AdaptiveAvgPool2d(*args)
    if fn is L.max_pool2d:  # max_pool2d(x, kernel, stride, padding, *, ceil_mode, dilation): nn.MaxPool2d's order
        return nn.MaxPool2d(*args, **kw)
    return Op(fn, args, kw)
