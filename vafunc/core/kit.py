"""The architecture kit: a family is declared once, as one ``forward(m, cfg, x)`` function.

The forward is written against a :class:`Scope` ``m``, which owns the parameter names. Each layer call names its
parameters where it uses them (``m.conv("conv1", x, 64, 7, stride=2)``), in the manner of Flax's ``@nn.compact`` and
Haiku's ``transform``. The same function then serves two purposes, so init and apply cannot drift:

* **init**: :func:`family` runs the forward once on a meta-device input, with a scope in *init
  mode*. Every layer call draws its tensors from the :class:`~vafunc.core.init.Initializer` (in call
  order, which is the reference's state_dict order) and computes on meta tensors, so shapes flow
  with no arithmetic done. Input channels are read off the incoming tensor and never repeated.
* **apply**: the same forward runs with a scope in *apply mode*. Each call looks its tensors up in the caller's
  ``params``/``state`` trees and runs the plain aten op. In train mode, BatchNorm's new running statistics are
  collected in fresh dicts and merged into a new state tree at the end (the caller's state is never touched). In
  eval mode the state is returned as it came (``new_state is state``).

The rest follows from the same declaration:

* **feature taps**: ``m.block(name, fn, x)`` runs ``fn`` in the child scope ``name`` and records its output under
  the module path (``layer1.0``). ``m.tap(name, y)`` records a parameter-free point (``maxpool``). Once every
  requested feature is recorded, the scope raises :class:`Done`, which :func:`family`'s apply catches, so the head
  is never computed. This is plain Python control flow, so ``torch.compile(fullgraph=True)`` traces it.
* **parameter count**: from init on the meta device (``ModelDef.num_params``).
* **valid input sizes**: :func:`min_size` probes the init-mode forward on meta inputs for the
  smallest square size every op accepts; layers that need divisible sizes (patch embeddings,
  window partitions) declare ``m.require_multiple(k)``, and the probe searches multiples of ``k``.
  A largest size, where there is one, is declared to :func:`family` (``max_size``).

Everything is pure: a scope lives for one call and apply mutates nothing it was given, so the
functions vmap, grad and compile like hand-written ones; an apply-mode layer call is a dict lookup
and the torch op. Design notes: ``docs/design.md``; a worked example: ``docs/adding-a-family.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import backends as B
from vafunc.core import layers as L
from vafunc.core import random as vrandom
from vafunc.core import remat as R
from vafunc.core.init import Initializer
from vafunc.core.layers import activation, same_padding
from vafunc.core.precision import Policy, check_policy, dtype_mismatch
from vafunc.core.registry import Family
from vafunc.core.sizes import min_size, size_multiple

__all__ = ["Scope", "Done", "family", "min_size", "size_multiple", "subkey", "same_padding", "activation"]

_EMPTY: dict = {}


class Done(Exception):
    """Raised by :meth:`Scope.tap` once every requested feature is recorded (early exit)."""


def subkey(rng: Tensor | None, i: int) -> Tensor | None:
    """``fold_in(rng, i)``, or ``None`` when no key was given (eval and deterministic runs)."""
    return None if rng is None else vrandom.fold_in(rng, i)


def _meta(t: dict) -> dict:
    return {k: v if v.device.type == "meta" else torch.empty_like(v, device="meta") for k, v in t.items()}


def _overlay(old: dict, new: dict) -> dict:
    """``old`` with the leaves and subtrees of ``new`` put in (copying only the touched dicts)."""
    if not new:
        return old
    out = dict(old)
    for k, v in new.items():
        if isinstance(v, dict):
            if v:
                out[k] = _overlay(old.get(k, _EMPTY), v)
        else:
            out[k] = v
    return out


class Ctx(NamedTuple):
    """Per-call options every scope of a forward shares: the compute dtype of a mixed precision
    policy (``None``: compute in the parameters' dtype), the attention implementation
    (:func:`vafunc.core.layers.attention_path`), the backend that runs the layers (chosen once per
    call: :mod:`vafunc.core.backends`) and whether eval BatchNorm is folded into its conv."""

    compute: torch.dtype | None = None
    attention: L.AttentionImpl = "auto"
    low: B.Plain = B.PLAIN  # Plain, Taped (per-sample gradients) or Members (stacked members)
    fold: bool = False  # Policy.fold_norm (plain backend only): eval BatchNorm folded into the conv
    remat: frozenset = frozenset()  # the paths of the blocks recomputed in the backward (vafunc.core.remat)


_CTX = Ctx()


class Scope:
    """One node of the parameter tree during a forward pass (see the module docstring).

    ``m.train``, ``m.rng`` and ``m.initializing`` are read by the family code; ``m.path`` is the
    dotted module path of this scope (``"layer1.0."``), used for feature names.
    """

    __slots__ = ("p", "s", "new", "train", "rng", "taps", "ini", "path", "defaults", "sizes", "ctx")

    def __init__(
        self,
        p: dict,
        s: dict | None,
        *,
        train: bool = False,
        rng: Tensor | None = None,
        taps: L.Taps | None = None,
        ini: Initializer | None = None,
        path: str = "",
        defaults: dict | None = None,
        sizes: list[int] | None = None,
        ctx: Ctx = _CTX,
    ) -> None:
        self.p = p
        self.s = s
        self.new = {} if train else None
        self.train = train
        self.rng = rng
        self.taps = taps
        self.ini = ini
        self.path = path
        self.defaults = defaults or {}
        self.sizes = sizes
        self.ctx = ctx

    # ------------------------------------------------------------------ structure
    @property
    def initializing(self) -> bool:
        """True while init runs the forward (branches that only some calls take, such as
        auxiliary heads, must run then so their parameters exist)."""
        return self.ini is not None

    def child(self, name: str, rng: Tensor | None = None, *, module: tuple | None = None) -> Scope:
        """The scope of submodule ``name`` (``rng``: its key, default none). ``module``: where
        the reference holds a torch layer here whose tensors its forward reads without calling it
        (Swin's ``qkv``), ``(torch class name, keywords)``; torch_compat's tree holds that class."""
        if self.ini is not None:
            return Scope(
                self.p.setdefault(name, {}),
                None,
                ini=self.ini,
                path=f"{self.path}{name}.",
                defaults=self.defaults,
                sizes=self.sizes,
                ctx=self.ctx,
            )
        c = Scope(
            self.p.get(name, _EMPTY),
            self.s.get(name, _EMPTY),
            train=self.train,
            rng=rng,
            taps=self.taps,
            path=f"{self.path}{name}.",
            defaults=self.defaults,
            ctx=self.ctx,
        )
        if self.train:
            self.new[name] = c.new
        return c

    def block(
        self,
        name: str,
        fn: Callable[..., Tensor],
        x: Tensor,
        *args: Any,
        tap: bool = True,
        rng: Tensor | None = None,
        module: tuple | None = None,
        sequential: bool = False,
        **kw: Any,
    ) -> Tensor:
        """``fn(child_scope, x, *args, **kw)`` in the child scope ``name``; the output is recorded
        as the feature ``path.name`` unless ``tap=False``. For torch_compat's module tree (the
        pure apply ignores both): ``module``, the reference's torch layer when it has one here,
        ``(torch class name, keywords)`` (ViT's ``nn.MultiheadAttention``; ``fn`` is its pure
        lowering); ``sequential``, the block is an ``nn.Sequential`` although its children are
        named (ViT's ``encoder_layer_{i}``); children named ``0..n-1`` are detected."""
        y = (  # apply(..., remat=): a listed block is recomputed in the backward (vafunc.core.remat)
            R.run_block(self, name, fn, x, args, kw, rng)
            if self.ctx.remat and self.taps is None and self.path + name in self.ctx.remat
            else fn(self.child(name, rng), x, *args, **kw)
        )
        return self.tap(name, y) if tap else y

    def tap(self, name: str, y: Tensor) -> Tensor:
        """Record ``y`` as the feature ``path.name``; raise :class:`Done` once all are recorded."""
        taps = self.taps
        if taps is None:
            return y
        taps(self.path + name, y)
        if taps.complete:
            raise Done
        return y

    def op(self, name: str, fn: Callable[..., Tensor], x: Tensor, *args: Any, tap: bool = True, **kw: Any) -> Tensor:
        """A parameter-free layer the reference holds as a module at ``name`` (an activation, a
        pool, a dropout, a flatten): ``fn(x, *args, **kw)``, recorded as the feature
        ``path.name`` unless ``tap=False``. In a ``torch_compat`` tree it is a module of its own
        (torch's class where there is one), so hooks, slicing and replacement see it."""
        y = fn(x, *args, **kw)
        return self.tap(name, y) if tap else y

    def declare(self, name: str, module: tuple) -> None:
        """A module the reference holds at ``name`` that has no tensors and computes nothing
        (ShuffleNet V2's empty ``branch1`` Sequential of a basic unit), ``(torch class name,
        keywords)``: only torch_compat's tree holds it; the pure apply ignores it."""

    def key(self, i: int) -> Tensor | None:
        """The key of slot ``i`` of this scope's ``rng`` (``None`` without one)."""
        return None if self.rng is None else vrandom.fold_in(self.rng, i)

    def require_multiple(self, k: int) -> None:
        """Declare that the input height and width must be multiples of ``k``."""
        if self.sizes is not None:
            self.sizes.append(int(k))

    def _create(self, name: str, make: Callable[[Initializer], dict]) -> dict:
        t = make(self.ini)
        if name in self.p:
            raise ValueError(f"{self.path}{name} is declared twice")
        self.p[name] = t
        return _meta(t)

    def _init(self, kind: str, init: Any) -> Any:
        return self.defaults.get(kind) if init is None else init

    def _weights(
        self, name: str, x: Tensor, fold: tuple[str, float] | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(weight, bias, x)`` of a conv or linear layer, cast to the compute dtype of the
        precision policy (gradients flow back to the stored tensors); without a policy, a float
        input of another dtype than the weights gets a clear TypeError. ``fold``: ``(name, eps)``
        of an eval BatchNorm after it, folded in before the cast."""
        p = self.p[name]
        w, b = p["weight"], p.get("bias")
        c = self.ctx.compute
        if c is not None:
            if fold is not None:
                w, b = L.fold_batch_norm(w, b, self.p.get(fold[0], _EMPTY), self.s[fold[0]], eps=fold[1])
            return w.to(c), (None if b is None else b.to(c)), x.to(c)
        if x.dtype != w.dtype:
            raise dtype_mismatch(f"layer {self.path}{name}", x.dtype, w.dtype)
        return w, b, x

    def _eps(self, eps: float | None) -> float:  # a BatchNorm's epsilon: the given one, the family's, or torch's 1e-5
        return self.defaults.get("eps", 1e-5) if eps is None else eps

    def _folds_bn(self) -> bool:
        """Whether :meth:`conv_norm_act` folds its BatchNorm (``Policy.fold_norm``, eval, plain mode)."""
        return self.ctx.fold and not self.train and self.defaults.get("norm", "batch") == "batch"

    def cast(self, t: Tensor) -> Tensor:
        """A parameter used directly by the family (a class token, a position embedding, a
        relative position table), cast to the policy's compute dtype."""
        c = self.ctx.compute
        return t if c is None or not t.is_floating_point() else t.to(c)

    # ------------------------------------------------------------------ layers
    def conv(
        self,
        name: str,
        x: Tensor,
        cout: int,
        kernel: L.IntPair,
        *,
        stride: L.IntPair = 1,
        padding: L.IntPair | str | None = None,
        dilation: L.IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        init: Any = None,
        _fold: tuple[str, float] | None = None,
    ) -> Tensor:
        """Conv2d ``[N, Cin, H, W] -> [N, cout, H', W']`` with tensors at ``name``; padding defaults to "same"
        (:func:`same_padding`); ``padding="tf_same"``: TensorFlow's "SAME" (:func:`vafunc.core.layers.pad_same`, for
        TF-ported checkpoints: asymmetric at stride 2); ``init``: an init scheme (``vafunc.core.init``)."""
        if self.ini is None:
            w, b, x = self._weights(name, x, _fold)
        else:
            scheme = self._init("conv", init)
            p = self._create(
                name, lambda ini: ini.conv_scheme(scheme, x.shape[1], cout, kernel, groups=groups, bias=bias)
            )
            w, b = p["weight"], p.get("bias")
        if padding is None:
            padding = same_padding(kernel, dilation)
        elif padding == "tf_same":  # TensorFlow "SAME": static where it is symmetric, else padded to fit
            if stride in (1, (1, 1)) and (kernel % 2 if isinstance(kernel, int) else all(k % 2 for k in kernel)):
                padding = same_padding(kernel, dilation)
            else:
                x, padding = L.pad_same(x, kernel, stride, dilation), 0
        return self.ctx.low.conv(x, w, b, stride, padding, dilation, groups)

    def linear(self, name: str, x: Tensor, fout: int, *, bias: bool = True, init: Any = None) -> Tensor:
        """Affine map ``[..., Fin] -> [..., fout]`` with tensors at ``name``."""
        if self.ini is None:
            w, b, x = self._weights(name, x)
        else:
            scheme = self._init("linear", init)
            p = self._create(name, lambda ini: ini.linear_scheme(scheme, x.shape[-1], fout, bias=bias))
            w, b = p["weight"], p.get("bias")
        return self.ctx.low.linear(x, w, b)

    def linear_with(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        """``F.linear(x, w, b)`` with tensors the family declared itself (``m.param``: a fused
        projection), taped under per-sample gradients like :meth:`linear`."""
        return self.ctx.low.linear_with(x, w, b)

    def batch_norm(
        self,
        name: str,
        x: Tensor,
        *,
        eps: float | None = None,
        momentum: float | None = None,
        zero_init: bool = False,
        affine: bool = True,
    ) -> Tensor:
        """BatchNorm over channels with tensors at ``name`` (:func:`vafunc.core.layers.batch_norm`);
        ``eps``/``momentum`` default to the family's (torch's 1e-5 / 0.1 unless declared)."""
        eps = self._eps(eps)
        momentum = self.defaults.get("momentum", 0.1) if momentum is None else momentum
        if self.ini is not None:
            self._create(name, lambda ini: ini.batch_norm(x.shape[1], zero_weight=zero_init, affine=affine))
            return torch.empty_like(x)  # shapes only (meta BatchNorm runs a slow Python decomposition)
        y, ns = self.ctx.low.batch_norm(
            x, self.p.get(name, _EMPTY), self.s[name], train=self.train, momentum=momentum, eps=eps
        )
        if self.train:
            self.new[name] = ns
        return y

    def group_norm(self, name: str, x: Tensor, groups: int, *, eps: float = 1e-5, zero_init: bool = False) -> Tensor:
        """GroupNorm (Wu & He 2018) over ``[N, C, ...]`` with ``groups`` groups, tensors at
        ``name`` (weight 1, or 0 with ``zero_init``; bias 0); no running statistics, so no
        coupling between samples (what per-sample gradients and DP-SGD need)."""
        c = x.shape[1]
        if c % groups:
            raise ValueError(
                f"GroupNorm at {self.path}{name}: {groups} groups do not divide {c} channels; "
                f"choose a group count that divides every width of the network"
            )
        if self.ini is not None:
            p = self._create(
                name, lambda ini: {"weight": ini.full((c,), 0.0 if zero_init else 1.0), "bias": ini.zeros((c,))}
            )
            return F.group_norm(x, groups, p["weight"], p["bias"], eps)
        p = self.p[name]
        return self.ctx.low.group_norm(x, groups, p["weight"], p["bias"], eps)

    def instance_norm(self, name: str, x: Tensor, *, eps: float = 1e-5) -> Tensor:
        """InstanceNorm, affine (weight 1, bias 0) at ``name``: :func:`vafunc.core.layers.instance_norm`."""
        p = self.p[name] if self.ini is None else self._create(name, lambda ini: ini.layer_norm(x.shape[1]))
        return L.instance_norm(x, p["weight"], p["bias"], eps, group_norm=self.ctx.low.group_norm)

    def norm(
        self, name: str, x: Tensor, *, eps: float | None = None, momentum: float | None = None, zero_init: bool = False
    ) -> Tensor:
        """The family's normalisation layer at ``name``: BatchNorm (:meth:`batch_norm`), or, when
        the family's defaults say ``norm="group"``, GroupNorm with ``norm_groups`` groups
        (:meth:`group_norm`; torchvision's ``norm_layer`` choice)."""
        if self.defaults.get("norm", "batch") == "group":
            return self.group_norm(
                name, x, self.defaults.get("norm_groups", 32), eps=self._eps(eps), zero_init=zero_init
            )
        return self.batch_norm(name, x, eps=eps, momentum=momentum, zero_init=zero_init)

    def norm_act(
        self,
        name: str,
        x: Tensor,
        act: Callable[[Tensor], Tensor],
        *,
        eps: float | None = None,
        momentum: float | None = None,
        zero_init: bool = False,
    ) -> Tensor:
        """The family's norm at ``name`` then ``act`` in place: one module in the reference (timm's
        ``BatchNormAct2d``; a family declares ``defaults={"norm_act": True}`` and :meth:`conv_norm_act` uses it)."""
        return act(self.norm(name, x, eps=eps, momentum=momentum, zero_init=zero_init))

    def layer_norm(self, name: str, x: Tensor, *, eps: float = 1e-5) -> Tensor:
        """LayerNorm over the last axis of ``[..., C]`` (``nn.LayerNorm(C)``), tensors at
        ``name`` (weight 1, bias 0)."""
        p = self.p[name] if self.ini is None else self._create(name, lambda ini: ini.layer_norm(x.shape[-1]))
        return self.ctx.low.layer_norm(x, p["weight"], p["bias"], eps)

    def layer_norm2d(self, name: str, x: Tensor, *, eps: float = 1e-6) -> Tensor:
        """LayerNorm over the channels of ``[N, C, H, W]`` at every position (ConvNeXt's
        ``LayerNorm2d``: :func:`vafunc.core.layers.layer_norm2d`), tensors at ``name``."""
        p = self.p[name] if self.ini is None else self._create(name, lambda ini: ini.layer_norm(x.shape[1]))
        return self.ctx.low.layer_norm2d(x, p["weight"], p["bias"], eps)

    def layer_scale(
        self, name: str, channels: int, value: float, *, shape: Sequence[int] | None = None, ndim: int = 4
    ) -> Tensor:
        """Layer scale (CaiT, Sec. 2.1; ConvNeXt): a per-channel factor, initialised to ``value``, the bare parameter
        ``name`` of ``shape`` (default ``[channels, 1, 1]``, torchvision's ``CNBlock.layer_scale``; timm's ``gamma``:
        ``[channels]``), for the caller to multiply into a tensor of ``ndim`` axes (a per-sample tape or members mode
        gives it a batch axis). Declare it where the reference registers it (own parameters precede children's)."""
        return self.param(name, (channels, 1, 1) if shape is None else tuple(shape), ("full", value), batched=ndim)

    def param(
        self, name: str, shape: Sequence[int], init: tuple = ("zeros",), *, batched: bool | int = False
    ) -> Tensor:
        """A bare parameter ``name`` of ``shape`` used directly by the family (a class token, a position embedding, a
        bias table), cast to the compute dtype. ``init``: ``("zeros",)``, ``("full", value)``, ``("normal", std)`` or
        ``("trunc_normal", std)`` (truncated at +-2). ``batched=True``: its leading axis (of size 1) broadcasts over
        the batch (ViT's class token); ``batched=k``: it broadcasts against a batch of ``k`` axes (a bias). Under a
        per-sample tape or members mode it gets a real batch axis, so the family's code must broadcast it."""
        if self.ini is None:
            return self.ctx.low.param(self.cast(self.p[name]), batched)
        if name in self.p:
            raise ValueError(f"{self.path}{name} is declared twice")
        t = self.p[name] = self.ini.draw(init, tuple(shape))
        return t if t.device.type == "meta" else torch.empty_like(t, device="meta")

    def buffer(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """A constant buffer ``name`` the reference keeps in its state_dict (Swin's
        ``relative_position_index``): made by ``make()`` at init, stored in the state tree (its
        leaf name must be in :data:`vafunc.tree.STATE_LEAVES`), read from the state in apply."""
        if self.ini is None:
            self.ctx.low.buffer()
            return self.s[name]
        if name in self.p:
            raise ValueError(f"{self.path}{name} is declared twice")
        t = make()
        t = self.p[name] = torch.empty_like(t, device="meta") if self.ini.meta else t.to(self.ini.device)
        return t if t.device.type == "meta" else torch.empty_like(t, device="meta")

    def conv_norm_act(
        self,
        x: Tensor,
        cout: int,
        kernel: L.IntPair,
        *,
        conv: str = "0",
        norm: str = "1",
        act: L.ActSpec | None = None,
        stride: L.IntPair = 1,
        padding: L.IntPair | str | None = None,
        dilation: L.IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float | None = None,
        momentum: float | None = None,
        init: Any = None,
        zero_init: bool = False,
        act_name: str | None = None,
    ) -> Tensor:
        """Convolution -> BatchNorm -> activation (torchvision's ``Conv2dNormActivation``, timm's
        ``ConvNormAct``, Inception's ``BasicConv2d``): the conv's tensors at ``conv``, the
        norm's at ``norm``. The activation runs in place on the fresh BatchNorm output. Under a
        precision policy with ``fold_norm`` the eval-mode BatchNorm is folded into the conv in the
        stored dtype before the cast (:func:`vafunc.core.layers.fold_batch_norm`). The activation is a
        module of the reference at ``act_name`` (default ``"2"`` after ``conv="0", norm="1"``, as in
        ``Conv2dNormActivation``; ``None`` elsewhere: computed inline, as BasicConv2d's ``F.relu``)."""
        fold = (norm, self._eps(eps)) if self._folds_bn() else None
        y = self.conv(
            conv,
            x,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            init=init,
            _fold=fold,
        )
        act = activation(act)
        if fold is None and self.defaults.get("norm_act"):  # timm's BatchNormAct2d, with or without its act
            return self.norm_act(
                norm,
                y,
                L.INPLACE.get(act, act) if act is not None else L.identity,
                eps=eps,
                momentum=momentum,
                zero_init=zero_init,
            )
        if fold is None:
            y = self.norm(norm, y, eps=eps, momentum=momentum, zero_init=zero_init)
        if act is None:
            return y
        if act_name is None and conv == "0" and norm == "1":
            act_name = "2"
        act = L.INPLACE.get(act, act)
        return act(y) if act_name is None else self.op(act_name, act, y, tap=False)

    def squeeze_excite(
        self,
        x: Tensor,
        squeeze: int,
        *,
        act: L.ActSpec = "relu",
        gate: L.ActSpec = "sigmoid",
        fc1: str = "fc1",
        fc2: str = "fc2",
        init: Any = None,
    ) -> Tensor:
        """Squeeze-and-excitation (Hu et al. 2018, Eq. 2-4): ``x * gate(fc2(act(fc1(mean_hw x))))``,
        ``fc1``/``fc2`` 1x1 convs with bias (torchvision's ``SqueezeExcitation``, timm's ``SEModule``)."""
        s = F.adaptive_avg_pool2d(x, 1)
        s = activation(act)(self.conv(fc1, s, squeeze, 1, bias=True, init=init))
        s = activation(gate)(self.conv(fc2, s, x.shape[1], 1, bias=True, init=init))
        return s * x

    def cbam(
        self, x: Tensor, squeeze: int, *, kernel: int = 7, act: L.ActSpec = "relu", bias: bool = True, init: Any = None
    ) -> Tensor:
        """CBAM (Woo et al. 2018, Eq. 1-4; timm's ``CbamModule``): the channel gate at ``channel``
        (1x1 convs ``fc1``/``fc2``, with ``bias``, shared by the spatial mean and max, summed, sigmoid),
        then the spatial gate at ``spatial`` (a ``kernel`` conv ``conv.conv`` and BatchNorm ``conv.bn``,
        timm's ``ConvNormAct``, over the channel mean and max, sigmoid); each rescales its input."""
        x = self.block("channel", _cbam_channel, x, squeeze, act, bias, init, tap=False)
        return self.block("spatial", _cbam_spatial, x, kernel, init, tap=False)

    def head(
        self,
        x: Tensor,
        num_classes: int,
        *,
        name: str = "fc",
        rate: float = 0.0,
        rng: Tensor | None = None,
        init: Any = None,
    ) -> Tensor:
        """The classifier head ``[N, C, H, W] -> [N, num_classes]``: global average pool, dropout
        at ``rate`` (keyed by ``rng``, train mode only), linear layer at ``name``."""
        y = L.global_avg_pool(x)
        if rate:
            y = self.dropout(y, rate, rng)
        return self.linear(name, y, num_classes, init=init)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        bias: Tensor | None = None,
        scale: float | None = None,
        rate: float = 0.0,
        rng: Tensor | None = None,
    ) -> Tensor:
        """Scaled dot-product attention over ``[..., L, d]`` (:func:`vafunc.core.layers.attention`): fused SDPA or
        the math path by the documented rule, keyed attention dropout at ``rate`` in train mode; the implementation
        can be forced per call with ``apply(..., attention="math")``."""
        self.ctx.low.attention(rate, self.train)
        return L.attention(
            q, k, v, bias=bias, scale=scale, rate=rate, rng=rng, train=self.train, impl=self.ctx.attention
        )

    def dropout(self, x: Tensor, rate: float, rng: Tensor | None, name: str | None = None) -> Tensor:
        """Keyed element-wise dropout (train mode only; :func:`vafunc.core.layers.dropout`); ``name``:
        the reference's ``nn.Dropout`` module path, where it has one (a module in torch_compat)."""
        return self.ctx.low.dropout(x, rate, rng, self.train)

    def drop_path(self, x: Tensor, rate: float, rng: Tensor | None, name: str | None = None) -> Tensor:
        """Keyed per-sample stochastic depth (train mode only; :func:`vafunc.core.layers.drop_path`);
        ``name`` as in :meth:`dropout`."""
        return self.ctx.low.drop_path(x, rate, rng, self.train)

    # ------------------------------------------------------------------ results
    def new_state(self, state: dict) -> dict:
        """The state tree after this call: ``state`` with the updated BatchNorm buffers."""
        return _overlay(state, self.new) if self.train else state


# --------------------------------------------------------------------------- declaration


def _cbam_channel(m: Scope, x: Tensor, squeeze: int, act: L.ActSpec, bias: bool, init: Any) -> Tensor:
    def mlp(s: Tensor) -> Tensor:
        s = activation(act)(m.conv("fc1", s, squeeze, 1, bias=bias, init=init))
        return m.conv("fc2", s, x.shape[1], 1, bias=bias, init=init)

    a = mlp(x.mean((2, 3), keepdim=True))  # fc1/fc2 are shared: declared by the first call at init
    return x * torch.sigmoid(a if m.initializing else a + mlp(x.amax((2, 3), keepdim=True)))


def _cbam_spatial(m: Scope, x: Tensor, kernel: int, init: Any) -> Tensor:
    s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    s = m.block("conv", _conv_bn, s, kernel, init, tap=False)
    return x * torch.sigmoid(s)


def _conv_bn(m: Scope, x: Tensor, kernel: int, init: Any) -> Tensor:  # timm's ConvNormAct(apply_act=False)
    return m.norm_act("bn", m.conv("conv", x, 1, kernel, init=init), L.identity)


def family(
    name: str,
    config: type,
    forward: Callable[..., Tensor],
    *,
    paper: str = "",
    remap: Callable | None = None,
    init_size: int | Callable[[Any], int] = 224,
    defaults: Callable[[Any], dict] | dict | None = None,
    in_channels: Callable[[Any], int] = lambda cfg: getattr(cfg, "in_channels", 3),
    max_size: Callable[[Any], int | None] = lambda cfg: None,
    intermediates: Callable | None = None,
) -> Family:
    """Declare a family from its one ``forward(m, cfg, x, **kw)``.

    ``defaults``: the family's init schemes and BatchNorm settings, ``{"conv": scheme,
    "linear": scheme, "eps": 1e-5, "momentum": 0.1}`` (a dict, or a function of the config).
    ``init_size``: a square input size the network accepts, used to run init on meta tensors.
    ``max_size(cfg)``: the largest input side, where there is one (it cannot be probed).
    ``intermediates``: :meth:`vafunc.core.registry.ModelDef.intermediates` for token networks.
    Extra keywords of ``forward`` (``aux=True``) pass through ``apply``; ``remat=``: :mod:`vafunc.core.remat`.
    """

    def scope_defaults(cfg: Any) -> dict:
        d = defaults(cfg) if callable(defaults) else (defaults or {})
        return {"conv": "kaiming_fan_out", "linear": "torch_default", **d}

    def run_init(
        cfg: Any, ini: Initializer, size: int | None = None, sizes: list[int] | None = None, scope: type[Scope] = Scope
    ) -> Scope:
        s = size or (init_size(cfg) if callable(init_size) else init_size)
        m = scope({}, None, ini=ini, defaults=scope_defaults(cfg), sizes=sizes)
        # the input in the init dtype: a float32 input meets float64 biases in meta convs otherwise
        forward(m, cfg, torch.empty(1, in_channels(cfg), s, s, device="meta", dtype=ini.dtype))
        return m

    def init(cfg: Any, ini: Initializer) -> dict:
        return run_init(cfg, ini).p

    def apply(
        cfg: Any,
        params: dict,
        state: dict,
        x: Tensor,
        *,
        train: bool = False,
        rng: Tensor | None = None,
        taps: L.Taps | None = None,
        policy: Policy | None = None,
        attention: L.AttentionImpl = "auto",
        backend: B.Plain | None = None,
        remat: str | Sequence[str] | None = None,
        **kw: Any,
    ) -> tuple[Tensor | None, dict]:
        policy = check_policy(policy)
        ctx = _CTX
        low = B.PLAIN if backend is None else backend
        if policy is not None:
            x = x.to(policy.compute)
        x, low = low.enter(x, taps)
        if policy is not None:
            ctx = Ctx(
                policy.compute if policy.mixed else None,
                attention,
                low,
                policy.mixed and policy.fold_norm and low is B.PLAIN,
            )
        elif attention != "auto" or low is not B.PLAIN:
            ctx = Ctx(None, attention, low)
        if attention not in L.ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {L.ATTENTION_IMPLS}, got {attention!r}")
        m = Scope(
            params,
            state,
            train=train,
            rng=rng,
            taps=taps,
            defaults=scope_defaults(cfg),
            ctx=ctx if remat is None else ctx._replace(remat=R.plan(fam, cfg, remat, Scope)),  # vafunc.core.remat
        )
        try:
            y = forward(m, cfg, x, **kw)
        except Done:
            y = None
        if policy is not None:
            if isinstance(y, dict):  # segmentation models: {"out", "aux"}
                y = {k: v.to(policy.output) for k, v in y.items()}
            elif y is not None:
                y = y.to(policy.output)
            if taps is not None:
                for k, v in taps.got.items():
                    taps.got[k] = v.to(policy.output) if v.is_floating_point() else v
        return y, m.new_state(state)

    fam = Family(
        name=name,
        config=config,
        init=init,
        apply=apply,
        min_size=lambda cfg: min_size(fam, cfg),
        paper=paper,
        remap=remap,
        in_channels=in_channels,
        probe=run_init,
        multiple=lambda cfg: size_multiple(fam, cfg),
        max_size=max_size,
        declaration=Declaration(forward, scope_defaults),
        intermediates=intermediates,
    )
    return fam


class Declaration(NamedTuple):
    """A kit family's one declaration, for backends outside the kit (``torch_compat`` binds it to a
    module tree): ``forward(m, cfg, x, **kw)`` and the scope defaults of a config."""

    forward: Callable
    defaults: Callable[[Any], dict]
