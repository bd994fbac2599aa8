"""Pure layer functions.

Every function takes its parameters as an explicit subtree (``p``), its BatchNorm buffers as an
explicit subtree (``s``) and returns new state instead of mutating it. Shapes use
``N`` batch, ``C`` channels, ``H``/``W`` spatial size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import einops
import torch
import torch.nn.functional as F

from vafunc.core import random as vrandom
from vafunc.core._pairs import pair

__all__ = [
    "conv2d",
    "linear",
    "batch_norm",
    "fold_batch_norm",
    "layer_norm2d",
    "instance_norm",
    "channel_shuffle",
    "pad_same",
    "same_padding",
    "relu",
    "relu6",
    "hardswish",
    "hardsigmoid",
    "silu",
    "sigmoid",
    "leaky_relu_",
    "ACTIVATIONS",
    "activation",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "global_avg_pool",
    "dropout",
    "drop_path",
    "attention",
    "attention_path",
    "require_rng",
]

Params = Mapping[str, torch.Tensor]
#: a kernel size, stride, padding or dilation: one int for both axes, or ``(h, w)``
IntPair = int | tuple[int, int]
#: the attention implementations (:data:`ATTENTION_IMPLS`, :func:`attention_path`)
AttentionImpl = Literal["auto", "fused", "math"]
#: an activation: a name of :data:`ACTIVATIONS` or a function (:func:`activation`)
ActSpec = str | Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- linear maps


def conv2d(
    p: Params,
    x: torch.Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution: ``[N, Cin, H, W] -> [N, Cout, H', W']`` with ``p = {weight[, bias]}``."""
    return F.conv2d(x, p["weight"], p.get("bias"), stride, padding, dilation, groups)


def linear(p: Params, x: torch.Tensor) -> torch.Tensor:
    """Affine map ``[..., Fin] -> [..., Fout]`` with ``p = {weight [Fout, Fin][, bias [Fout]]}``."""
    return F.linear(x, p["weight"], p.get("bias"))


# --------------------------------------------------------------------------- normalisation


def batch_norm(
    p: Params, s: Mapping[str, torch.Tensor], x: torch.Tensor, *, train: bool, momentum: float = 0.1, eps: float = 1e-5
) -> tuple[torch.Tensor, dict]:
    """BatchNorm over ``[N, C, ...]`` (Ioffe & Szegedy 2015), functional.

    Eval: normalise with ``s["running_mean"]``/``s["running_var"]``; returns ``s`` unchanged.
    Train: normalise with the batch statistics and return new buffers exactly as torch updates
    them: ``running = (1 - momentum) * running + momentum * batch_stat`` (unbiased variance) and
    ``num_batches_tracked + 1``. ``p`` may be empty (``affine=False``).
    """
    w, b = p.get("weight"), p.get("bias")
    rm, rv = s["running_mean"], s["running_var"]
    if not train:
        return F.batch_norm(x, rm, rv, w, b, False, 0.0, eps), s
    # torch's own kernel updates the running statistics in place: hand it fresh copies, so the
    # update is torch's to the last bit and the caller's state is never touched.
    new_rm, new_rv = rm.clone(), rv.clone()
    y = F.batch_norm(x, new_rm, new_rv, w, b, True, momentum, eps)
    new = {"running_mean": new_rm, "running_var": new_rv}
    if "num_batches_tracked" in s:
        new["num_batches_tracked"] = s["num_batches_tracked"] + 1
    return y, new


def fold_batch_norm(
    w: torch.Tensor, b: torch.Tensor | None, p: Params, s: Mapping[str, torch.Tensor], *, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's ``(w, b)`` with the eval-mode BatchNorm ``(p, s)`` that follows folded in:
    ``w * g / sqrt(var + eps)`` and ``beta + (b - mean) * g / sqrt(var + eps)``, in the tensors'
    own dtype. The precision policy's ``fold_norm`` casts the result once (inductor's binary
    folding multiplies after the cast, and rounds twice)."""
    scale = torch.rsqrt(s["running_var"] + eps)
    if "weight" in p:
        scale = scale * p["weight"]
    shift = (-s["running_mean"] if b is None else b - s["running_mean"]) * scale
    if "bias" in p:
        shift = shift + p["bias"]
    return w * scale.reshape(-1, *(1,) * (w.dim() - 1)), shift


def layer_norm2d(p: Params, x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of ``[N, C, H, W]`` at every position (ConvNeXt's
    ``LayerNorm2d``), computed as torchvision does: to channels-last, ``F.layer_norm`` over ``C``,
    back. ``p = {weight [C], bias [C]}``."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), p.get("weight"), p.get("bias"), eps)
    return y.permute(0, 3, 1, 2)


def instance_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    group_norm: Callable[..., torch.Tensor] = F.group_norm,
) -> torch.Tensor:
    """Instance normalisation (Ulyanov et al. 2016; ``nn.InstanceNorm2d(C, affine=True)``, no running
    statistics): each sample's channels normalised over space with their own mean and biased variance,
    then scaled by ``weight`` and shifted by ``bias`` ``[C]``. Computed as GroupNorm with one channel
    per group (Wu & He 2018, Sec. 3.1: the same statistics), whose CPU kernel is 2-4x faster than
    ``F.instance_norm`` (a batch norm over the reshaped input); equal to it to float rounding.
    ``group_norm``: a backend's (``group_norm(x, groups, weight, bias, eps)``). One spatial element per
    channel has no statistics: a ValueError, as torch raises."""
    if x.shape[2:].numel() < 2:
        raise ValueError(f"instance norm needs more than one spatial element per channel, got {list(x.shape)}")
    return group_norm(x, x.shape[1], weight, bias, eps)


def channel_shuffle(x: torch.Tensor | Sequence[torch.Tensor], groups: int | None = None) -> torch.Tensor:
    """ShuffleNet's channel shuffle (Zhang et al. 2018, Sec. 3.1): with the channels read as
    ``groups`` groups of ``c``, the output takes one channel of each group in turn.

    ``x`` may also be the groups themselves, a sequence of ``[N, c, H, W]`` tensors (ShuffleNet
    V2's two branches; ``groups`` is their number): the shuffle of their channel concatenation,
    built in one copy (stacked on a new axis after the channels) instead of two (``torch.cat``,
    then the shuffle's), which is where a concatenate-then-shuffle unit spends its time. Same
    values to the bit: both only move elements.
    """
    if not isinstance(x, torch.Tensor):
        return torch.stack(tuple(x), 2).flatten(1, 2)
    return einops.rearrange(x, "n (g c) h w -> n (c g) h w", g=groups).contiguous()


def same_padding(kernel: IntPair, dilation: IntPair = 1) -> int | tuple[int, ...]:
    """The symmetric "same" padding of an odd kernel: ``(k - 1) // 2 * dilation`` per axis."""
    if isinstance(kernel, int):
        return (kernel - 1) // 2 * dilation
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    return tuple((k - 1) // 2 * di for k, di in zip(kernel, d))


def pad_same(
    x: torch.Tensor, kernel: IntPair, stride: IntPair = 1, dilation: IntPair = 1, value: float = 0.0
) -> torch.Tensor:
    """TensorFlow's ``"SAME"`` padding: pad ``[N, C, H, W]`` so that a ``kernel``/``stride``
    window gives ``ceil(H / stride)`` outputs, the extra row/column (if any) at the bottom/right.
    TF-ported checkpoints (timm's ``tf_*`` models) need it in front of their strided convs."""
    (kh, kw), (sh, sw), (dh, dw) = pair(kernel), pair(stride), pair(dilation)
    ih, iw = x.shape[-2:]
    ph = max((-(-ih // sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
    pw = max((-(-iw // sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


# --------------------------------------------------------------------------- activations

relu = torch.relu
sigmoid = torch.sigmoid


def relu6(x: torch.Tensor) -> torch.Tensor:
    return F.hardtanh(x, 0.0, 6.0)


def hardswish(x: torch.Tensor) -> torch.Tensor:
    return F.hardswish(x)


def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """``clamp(x + 3, 0, 6) / 6``: bit-identical to ``F.hardsigmoid`` (checked on 1e7 values), but
    built from ops with forward-mode derivatives, so Hessian-vector products (jvp of grad) work;
    torch 2.14's ``hardsigmoid_backward`` has no forward-mode rule."""
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def relu6_(x: torch.Tensor) -> torch.Tensor:
    return F.hardtanh_(x, 0.0, 6.0)


def hardswish_(x: torch.Tensor) -> torch.Tensor:
    return F.hardswish(x, inplace=True)


def silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


#: In-place twins, for tensors the caller owns (a fresh layer output): same values, less memory.
#: (Named functions, not lambdas: torch_compat modules hold them and are pickled.)
INPLACE: dict[Callable, Callable] = {relu: torch.relu_, relu6: relu6_, hardswish: hardswish_, silu: silu_}


def relu_(x: torch.Tensor) -> torch.Tensor:
    """ReLU in place, for a fresh layer output that nothing else holds (torchvision's
    ``ReLU(inplace=True)``): same values, one allocation less."""
    return torch.relu_(x)


def add_relu_(y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``relu(y + shortcut)`` computed in place in ``y``, which must be a fresh layer output
    (a residual block's last BatchNorm output), as torchvision's ``out += identity; relu(out)``."""
    return torch.relu_(y.add_(shortcut))


def leaky_relu_(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """LeakyReLU in place (``nn.LeakyReLU(negative_slope, inplace=True)``), for a fresh layer output."""
    return F.leaky_relu_(x, negative_slope)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": relu,
    "relu6": relu6,
    "hardswish": hardswish,
    "hardsigmoid": hardsigmoid,
    "silu": silu,
    "sigmoid": sigmoid,
    "identity": identity,
}


def activation(act: ActSpec | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An activation from a :data:`ACTIVATIONS` name, a callable, or ``None``."""
    if act is None or callable(act):
        return act
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}") from None


# --------------------------------------------------------------------------- pooling


#: bytes of input converted to channels_last at a time by :func:`max_pool2d` (whole samples)
POOL_CHUNK_BYTES = 2 << 20


def _pool_cl(
    x: torch.Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair, ceil_mode: bool
) -> torch.Tensor:
    """Pool a contiguous NCHW ``x`` in channels_last, a few samples at a time, into an NCHW output:
    the channels_last copy is at most POOL_CHUNK_BYTES beside the input (the whole copy cost
    squeezenet1_1 37% more peak memory than torchvision's eager call), and chunks that stay in
    cache are as fast or faster than one big copy (see benchmarks/README.md for the figures)."""
    n = x.shape[0]
    step = max(1, POOL_CHUNK_BYTES // max(1, x[0].nbytes)) if n else 1
    out = None
    for i in range(0, max(n, 1), step):  # one (empty) chunk for an empty batch
        y = F.max_pool2d(
            x[i : i + step].contiguous(memory_format=torch.channels_last),
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode,
        )
        if out is None:
            out = x.new_empty((n, *y.shape[1:]))
        out[i : i + step] = y
    return out


@torch.library.custom_op("vafunc::max_pool2d_cl", mutates_args=())
def _max_pool2d_cl(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool
) -> torch.Tensor:
    return _pool_cl(x, kernel_size, stride, padding, dilation, ceil_mode)


@_max_pool2d_cl.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


@_max_pool2d_cl.register_vmap
def _(info, in_dims, x, kernel_size, stride, padding, dilation, ceil_mode):
    xs = x.movedim(in_dims[0], 0)  # the vmapped axis folds into the batch (an outer vmap's tensor dispatches again)
    y = max_pool2d(xs.reshape(-1, *xs.shape[2:]), kernel_size, stride, padding, ceil_mode=ceil_mode, dilation=dilation)
    return y.view(*xs.shape[:2], *y.shape[1:]), 0


def max_pool2d(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Max pooling. Without a gradient to record, an NCHW input on the CPU is pooled in
    channels_last and returned contiguous: torch's CPU kernel for contiguous NCHW is slower than
    its channels_last one, even with both conversions (see benchmarks/README.md for the figures), and a
    maximum is exact, so the values are bit-equal. Inside ``torch.vmap`` the
    same through ``vafunc::max_pool2d_cl``, whose vmap rule folds the vmapped axis into the batch.
    With a gradient (ties could pick another argmax), inside other ``torch.func`` transforms and
    under ``torch.compile`` (inductor lowers pooling itself) it is the plain call."""
    if (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[1] > 1
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        stride = kernel_size if stride is None else stride
        if torch._C._functorch.is_batchedtensor(x):
            return _max_pool2d_cl(x, pair(kernel_size), pair(stride), pair(padding), pair(dilation), bool(ceil_mode))
        if not torch._C._functorch.is_functorch_wrapped_tensor(x) and x.is_contiguous():
            return _pool_cl(x, kernel_size, stride, padding, dilation, ceil_mode)
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


torch.fx.wrap("max_pool2d")  # one FX node: its CPU fast path branches on the input (calls as L.max_pool2d)


def avg_pool2d(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)


def adaptive_avg_pool2d(x: torch.Tensor, output_size: IntPair) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, output_size)


def resize_bilinear(x: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """``[N, C, h, w] -> [N, C, *size]``, bilinear with ``align_corners=False`` (the up-sampling of
    torchvision's segmentation models: logits to the input's size, pooled features to the map's);
    ``align_corners=True``: pytorchcv's (the Residual Attention Network's mask branch)."""
    size = size if isinstance(size, (tuple, torch.fx.Proxy)) else tuple(size)  # (FX: a traced shape, not iterated)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C]``: mean over space (same kernel as AdaptiveAvgPool2d(1))."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------- stochastic layers


def require_rng(rng: torch.Tensor | None, what: str) -> torch.Tensor:
    if rng is None:
        raise ValueError(
            f"{what} is active in train mode and needs randomness: pass rng=vafunc.random.key(seed) "
            "(or set its rate to 0, or call with train=False)"
        )
    return rng


def dropout(x: torch.Tensor, rate: float, rng: torch.Tensor | None, *, train: bool) -> torch.Tensor:
    """Element-wise dropout: zero each entry with probability ``rate``, scale the rest by
    ``1 / (1 - rate)`` (torch's ``F.dropout`` convention). Identity in eval or at rate 0."""
    if not train or rate == 0.0:
        return x
    if rate >= 1.0:
        return torch.zeros_like(x)
    rng = require_rng(rng, f"dropout (rate {rate})")
    keep = vrandom.uniform(rng, x.shape) >= rate
    return x * keep.to(x.dtype) * (1.0 / (1.0 - rate))


def drop_path(x: torch.Tensor, rate: float, rng: torch.Tensor | None, *, train: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016), per sample: each sample of the batch keeps the
    residual branch with probability ``1 - rate`` and is rescaled by ``1 / (1 - rate)``
    (torchvision's ``StochasticDepth(mode="row")``)."""
    if not train or rate == 0.0:
        return x
    if rate >= 1.0:  # every branch dropped (torchvision: x * 0, no rescaling; not 0 / 0)
        return x * 0.0
    rng = require_rng(rng, f"stochastic depth (rate {rate})")
    survival = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = vrandom.uniform(rng, shape) < survival
    return x * (keep.to(x.dtype) / survival)


# --------------------------------------------------------------------------- attention

#: ``impl`` values of :func:`attention`.
ATTENTION_IMPLS = ("auto", "fused", "math")


def attention_path(impl: AttentionImpl, *, train: bool, rate: float) -> Literal["fused", "math"]:
    """Which implementation :func:`attention` runs: ``"fused"`` or ``"math"``.

    The rule for ``impl="auto"`` (the default): the fused kernel
    (``F.scaled_dot_product_attention``: flash / memory-efficient on GPU, the flash kernel on
    CPU) unless one of these holds, in which case the explicit math path:

    * attention dropout is active (``train`` and ``rate > 0``): SDPA's ``dropout_p`` draws from
      torch's global generator, so the mask would not be a function of the vafunc key;
    * a ``torch.func`` transform is running (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...), which
      covers vmapped ensembles, per-sample gradients, Hessian-vector products and double
      backward: the CPU flash kernel has no batching rule (vmap would loop over samples), no
      forward-mode derivative and no double backward;
    * a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``).

    Under ``torch.compile`` the same rule is applied when the graph is traced. ``impl="math"``
    forces the math path (e.g. for ``torch.autograd.grad(..., create_graph=True)`` in plain
    autograd, which the rule cannot see coming); ``impl="fused"`` forces SDPA (dropout then
    raises: it cannot be keyed).
    """
    if impl == "math":
        return "math"
    dropping = train and rate > 0.0
    if impl == "fused":
        if dropping:
            raise ValueError("impl='fused' cannot apply keyed attention dropout; use impl='auto' or 'math'")
        return "fused"
    if impl != "auto":
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if dropping or _functorch_active() or _forward_ad_active():
        return "math"
    return "fused"


def _functorch_active() -> bool:
    # (not ``peek_interpreter_stack() is not None``: dynamo traces that as true with no transform
    # running, so every compiled graph took the math path, 0.75x timm's bf16 compiled deit_small)
    return torch._C._are_functorch_transforms_active()


def _forward_ad_active() -> bool:
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    rate: float = 0.0,
    rng: torch.Tensor | None = None,
    train: bool = False,
    impl: AttentionImpl = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, Eq. 1) over ``[..., L, d]`` tensors:
    ``softmax(q k^T * scale + bias) v``, ``scale`` default ``d ** -0.5``, ``bias`` an additive
    float mask / relative position bias broadcastable to ``[..., Lq, Lk]``.

    Two implementations, equal up to rounding, chosen by :func:`attention_path`: the fused
    ``F.scaled_dot_product_attention``, and the explicit math path, which materialises the
    attention probabilities (softmax in float32, whatever the compute dtype) and applies keyed
    dropout to them at ``rate`` (train mode, ``rng`` a :mod:`vafunc.core.random` key).
    """
    if attention_path(impl, train=train, rate=rate) == "fused":
        if bias is not None and bias.dim() == 3 and q.dim() == 4:
            bias = bias.unsqueeze(0)  # the CPU flash kernel takes 2-D or 4-D masks only (else: SDPA's math path)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * s, k.transpose(-2, -1))
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, -1, dtype=torch.float32 if scores.dtype in _LOW else None).to(q.dtype)
    probs = dropout(probs, rate, rng, train=train)
    return torch.matmul(probs, v)


_LOW = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- feature taps


class Taps:
    """Collects named intermediate tensors during ``apply`` (feature extraction).

    The kit's scopes record into it (:meth:`vafunc.core.kit.Scope.tap` and ``Scope.block``), with the
    reference's module path as the name (``"layer1.0"``, ``"layer1"``, ``"features.3"``), and
    stop the forward once everything asked for is recorded, so the head is not computed when it
    is not needed. ``Taps(None)`` records every name (used on the meta device to list a model's
    feature names and shapes). ``apply(..., taps=None)`` is the plain forward.
    """

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.want = None if names is None else frozenset(names)
        self.got: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, y: torch.Tensor) -> torch.Tensor:
        if self.want is None or name in self.want:
            self.got[name] = y
        return y

    @property
    def complete(self) -> bool:
        return self.want is not None and len(self.got) == len(self.want)
