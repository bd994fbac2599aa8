"""Initialisers reproducing torchvision's schemes, driven by an explicit generator.

Family ``init`` functions receive an :class:`Initializer` and build one merged tree
(parameters and BatchNorm buffers together, named as in the reference state_dict); the model
splits it into ``(params, state)``. With ``device="meta"`` nothing is drawn or allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vafunc.core import random as vrandom

__all__ = ["Initializer", "seed_from_key"]


def seed_from_key(key) -> int:
    """A 64-bit ``torch.Generator`` seed from an int or a vafunc key (init is never traced)."""
    k = vrandom.as_key(key)
    if k.dim() != 1:
        raise ValueError(f"init expects a single key of shape [2], got shape {list(k.shape)}")
    # torch's CPU generator (mt19937) only uses the low 32 bits of a seed: make those a hash of
    # both key words.
    lo, hi = (int(v) for v in vrandom.bits(vrandom.fold_in(k, 0x1A17), (2,)).tolist())
    return (hi & 0x7FFFFFFF) << 32 | lo


@dataclass
class Initializer:
    """Draws initial tensors from a seeded ``torch.Generator`` (CPU, so results do not depend on
    the target device), then moves them to ``device``/``dtype``."""

    generator: torch.Generator | None
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def from_key(cls, key, *, device=None, dtype=None) -> Initializer:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"init dtype must be a floating torch.dtype, got {dtype!r}")
        meta = device is not None and torch.device(device).type == "meta"
        gen = None
        if not meta:
            gen = torch.Generator().manual_seed(seed_from_key(key))
        return cls(gen, device, dtype or torch.get_default_dtype())

    @property
    def meta(self) -> bool:
        return self.generator is None

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype)

    def _empty(self, shape) -> torch.Tensor:
        return torch.empty(tuple(shape), device="meta", dtype=self.dtype)

    # ------------------------------------------------------------------ primitive draws
    def normal(self, shape: Sequence[int], std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        if self.meta:
            return self._empty(shape)
        t = torch.empty(tuple(shape)).normal_(mean, std, generator=self.generator)
        return self._out(t)

    def uniform(self, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
        if self.meta:
            return self._empty(shape)
        return self._out(torch.empty(tuple(shape)).uniform_(low, high, generator=self.generator))

    def trunc_normal(self, shape, std=1.0, low=-2.0, high=2.0) -> torch.Tensor:
        """Normal(0, std) truncated to ``[low, high]`` (absolute bounds), by resampling."""
        if self.meta:
            return self._empty(shape)
        t = torch.empty(tuple(shape)).normal_(0.0, std, generator=self.generator)
        bad = (t < low) | (t > high)
        while bool(bad.any()):
            t[bad] = torch.empty(int(bad.sum())).normal_(0.0, std, generator=self.generator)
            bad = (t < low) | (t > high)
        return self._out(t)

    def full(self, shape: Sequence[int], value: float) -> torch.Tensor:
        if self.meta:
            return self._empty(shape)
        return torch.full(tuple(shape), value, device=self.device, dtype=self.dtype)

    def draw(self, spec, shape) -> torch.Tensor:
        """A tensor by a spec: ``("zeros",)``, ``("full", value)``, ``("normal", std)`` or
        ``("trunc_normal", std)`` (truncated at +-2 absolute, ``nn.init.trunc_normal_``'s default) or
        ``("uniform", low, high)``."""
        kind, *args = (spec,) if isinstance(spec, str) else spec
        if kind == "zeros":
            return self.zeros(shape)
        if kind == "full":
            return self.full(shape, *args)
        if kind == "normal":
            return self.normal(shape, *args)
        if kind == "trunc_normal":
            return self.trunc_normal(shape, *args)
        if kind == "uniform":
            return self.uniform(shape, *args)
        raise ValueError(f"unknown parameter init {spec!r}; known: zeros, full, normal, trunc_normal, uniform")

    def zeros(self, shape):
        return self.full(shape, 0.0)

    def ones(self, shape):
        return self.full(shape, 1.0)

    # ------------------------------------------------------------------ layers
    def conv(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        *,
        groups: int = 1,
        bias: bool = False,
        scheme: str = "kaiming_fan_out",
        std: float | None = None,
    ) -> dict:
        """Conv2d weight ``[cout, cin/groups, kh, kw]`` (+ bias).

        ``scheme``: ``"kaiming_fan_out"`` (torchvision's ResNet/MobileNet: normal with
        ``std = sqrt(2 / (cout * kh * kw))``, bias 0), ``"kaiming_fan_out_default_bias"`` (that
        weight, bias torch's default uniform in ``+-1/sqrt(fan_in)``: torchvision's RegNet),
        ``"kaiming_fan_in_uniform"`` (torch's default ``Conv2d.reset_parameters``),
        ``"kaiming_uniform"`` (``init.kaiming_uniform_``:
        uniform in ``+-sqrt(6 / fan_in)``, bias 0), ``"kaiming_normal"`` (``init.kaiming_normal_``:
        normal with ``std = sqrt(2 / fan_in)``, bias 0), ``"goog"`` (timm's TF-style init: normal with
        ``std = sqrt(2 / (kh * kw * cout / groups))``, bias 0), ``"normal"`` (``std``, bias 0) or
        ``"trunc_normal"`` (``std``, truncated at +-2, bias 0).
        """
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} are not divisible by groups={groups}")
        shape = (cout, cin // groups, kh, kw)
        fan_in, fan_out = (cin // groups) * kh * kw, cout * kh * kw
        p: dict = {}
        if scheme == "kaiming_fan_out":
            p["weight"] = self.normal(shape, math.sqrt(2.0 / fan_out))
            b = lambda: self.zeros((cout,))
        elif scheme == "kaiming_fan_in_uniform":
            p["weight"] = self.uniform(shape, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            b = lambda: self.uniform((cout,), -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif scheme == "normal":
            p["weight"] = self.normal(shape, std)
            b = lambda: self.zeros((cout,))
        elif scheme == "trunc_normal":
            p["weight"] = self.trunc_normal(shape, std, -2.0, 2.0)
            b = lambda: self.zeros((cout,))
        elif scheme == "kaiming_uniform":
            # torch.nn.init.kaiming_uniform_ defaults (fan_in, gain sqrt(2)): bound sqrt(6 / fan_in), bias 0
            bound = math.sqrt(6.0 / fan_in)
            p["weight"] = self.uniform(shape, -bound, bound)
            b = lambda: self.zeros((cout,))
        elif scheme == "kaiming_normal":
            # torch.nn.init.kaiming_normal_ defaults (fan_in, gain sqrt(2)): std sqrt(2 / fan_in), bias 0
            p["weight"] = self.normal(shape, math.sqrt(2.0 / fan_in))
            b = lambda: self.zeros((cout,))
        elif scheme == "kaiming_fan_out_default_bias":
            # torchvision's RegNet: the kaiming_fan_out weight; a bias (the SE convs') keeps torch's
            # default Conv2d init, uniform in +-1/sqrt(fan_in)
            p["weight"] = self.normal(shape, math.sqrt(2.0 / fan_out))
            b = lambda: self.uniform((cout,), -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif scheme == "goog":
            # timm / TF EfficientNet: normal, std sqrt(2 / fan_out) with fan_out = k*k*cout/groups
            p["weight"] = self.normal(shape, math.sqrt(2.0 / (kh * kw * cout // groups)))
            b = lambda: self.zeros((cout,))
        elif scheme in ("xavier_uniform", "xavier_uniform_mlp"):
            # init.xavier_uniform_ (bound sqrt(6 / (fan_in + fan_out))), bias 0; "_mlp": bias
            # normal(0, 1e-6) (timm's ViT-style init of MLP convs: MaxxVit's transformer blocks)
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            p["weight"] = self.uniform(shape, -bound, bound)
            b = (lambda: self.normal((cout,), 1e-6)) if scheme.endswith("_mlp") else (lambda: self.zeros((cout,)))
        else:
            raise ValueError(f"unknown conv init scheme {scheme!r}")
        if bias:
            p["bias"] = b()
        return p

    # ------------------------------------------------------------------ schemes by name
    def conv_scheme(self, scheme, cin: int, cout: int, kernel, *, groups: int = 1, bias: bool = False) -> dict:
        """:meth:`conv` by a scheme spec: a name, ``(name, std)``, or a callable
        ``f(ini, cin, cout, kernel, groups=, bias=) -> dict`` (what a family declares)."""
        if callable(scheme):
            return scheme(self, cin, cout, kernel, groups=groups, bias=bias)
        name, std = (scheme, None) if isinstance(scheme, str) else scheme
        return self.conv(cin, cout, kernel, groups=groups, bias=bias, scheme=name, std=std)

    def linear_scheme(self, scheme, fin: int, fout: int, *, bias: bool = True) -> dict:
        """:meth:`linear` by a scheme spec: a name, ``(name, std)`` or a callable
        ``f(ini, fin, fout, bias=) -> dict``."""
        if callable(scheme):
            return scheme(self, fin, fout, bias=bias)
        name, std = (scheme, None) if isinstance(scheme, str) else scheme
        return self.linear(fin, fout, bias=bias, scheme=name, std=std)

    def linear(self, fin: int, fout: int, *, bias: bool = True, scheme: str = "torch_default", std=None) -> dict:
        """Linear weight ``[fout, fin]`` (+ bias).

        ``scheme``: ``"torch_default"`` (``nn.Linear.reset_parameters``: weight and bias uniform in
        ``+-1/sqrt(fin)``), ``"torch_default_zero_bias"`` (that weight, bias 0), ``"normal"``
        (``std``, bias 0), ``"uniform_range"`` (weight uniform in
        ``+-1/sqrt(fout)``, bias 0: torchvision's EfficientNet/MobileNetV3 head),
        ``"trunc_normal"`` (``std``, bias 0), ``"kaiming_fan_out_uniform"`` (weight uniform in
        ``+-sqrt(3 / fout)``, bias 0: torchvision's MNASNet head) or
        ``"trunc_normal_default_bias"`` (weight as ``"trunc_normal"``, bias torch's default uniform in
        ``+-1/sqrt(fin)``: torchvision's
        GoogLeNet/Inception v3 init, which only touches weights).
        """
        p: dict = {}
        if scheme == "torch_default":
            bound = 1.0 / math.sqrt(fin)
            p["weight"] = self.uniform((fout, fin), -bound, bound)
            if bias:
                p["bias"] = self.uniform((fout,), -bound, bound)
            return p
        if scheme == "torch_default_zero_bias":
            # nn.Linear's own init, then init.constant_(bias, 0) (torchvision's DenseNet): the bias
            # is still drawn first, so the generator advances exactly as torch's does
            p = self.linear(fin, fout, bias=bias)
            if bias:
                p["bias"] = self.zeros((fout,))
            return p
        if scheme == "normal":
            p["weight"] = self.normal((fout, fin), std)
        elif scheme == "uniform_range":
            r = 1.0 / math.sqrt(fout)
            p["weight"] = self.uniform((fout, fin), -r, r)
        elif scheme == "trunc_normal":
            p["weight"] = self.trunc_normal((fout, fin), std, -2.0, 2.0)
        elif scheme == "kaiming_fan_out_uniform":
            # init.kaiming_uniform_(mode="fan_out", nonlinearity="sigmoid") (gain 1): torchvision's MNASNet
            bound = (3.0 / fout) ** 0.5
            p["weight"] = self.uniform((fout, fin), -bound, bound)
        elif scheme == "trunc_normal_default_bias":
            p["weight"] = self.trunc_normal((fout, fin), std, -2.0, 2.0)
            if bias:
                bound = 1.0 / math.sqrt(fin)
                p["bias"] = self.uniform((fout,), -bound, bound)
            return p
        else:
            raise ValueError(f"unknown linear init scheme {scheme!r}")
        if bias:
            p["bias"] = self.zeros((fout,))
        return p

    def batch_norm(self, c: int, *, zero_weight: bool = False, affine: bool = True) -> dict:
        """BatchNorm weight 1 (or 0 for ``zero_init_residual``), bias 0, running stats 0/1."""
        p: dict = {}
        if affine:
            p["weight"] = self.full((c,), 0.0 if zero_weight else 1.0)
            p["bias"] = self.zeros((c,))
        p["running_mean"] = self.zeros((c,))
        p["running_var"] = self.ones((c,))
        dev = "meta" if self.meta else self.device
        p["num_batches_tracked"] = torch.zeros((), dtype=torch.int64, device=dev)
        return p

    def layer_norm(self, c: int) -> dict:
        """LayerNorm over ``c`` features (``nn.LayerNorm``'s init): weight 1, bias 0; no draws."""
        return {"weight": self.ones((c,)), "bias": self.zeros((c,))}
