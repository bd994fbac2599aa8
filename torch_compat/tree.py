"""A kit family's one declaration bound to a tree of real torch modules.

The module tree is not written per family: it is derived from the family's ``forward(m, cfg, x)``
by running it twice with two more kinds of :class:`vafunc.core.kit.Scope` (see ``docs/design.md``,
"torch_compat: the declaration bound to modules"):

* **build** (:class:`_Builder`, once, on meta tensors): an init-mode scope that also creates a
  module for every layer call: ``m.conv`` an ``nn.Conv2d`` with the call's stride, padding,
  dilation and groups, ``m.batch_norm`` an ``nn.BatchNorm2d``, ``m.linear`` an ``nn.Linear``, the
  norms ``nn.GroupNorm``/``nn.LayerNorm``, ``m.op`` the parameter-free layer (``nn.ReLU``,
  ``nn.MaxPool2d``, or :class:`~torch_compat.layers.Op`: :mod:`torch_compat.layers`),
  ``m.param``/``m.buffer`` a tensor of the enclosing module.
  ``m.block(name, fn, x, *args)`` becomes a :class:`Block` whose forward is ``fn`` with the
  call's arguments, or a :class:`Sequential` (an ``nn.Sequential``) where its children are ``0..n-1``
  and each takes the previous one's output (the build checks the chain on the meta tensors).
* **forward** (:class:`Bound`, every call): each layer call of the declaration is a call of the
  module at that name, ``m.conv("conv1", x, ...)`` is ``self.conv1(x)``, so every
  ``nn.Module.__call__`` runs: hooks fire, parametrizations apply, and a replaced submodule
  (``m.fc = nn.Linear(512, 10)``, ``m.layer4 = nn.Identity()``) replaces its computation.

Randomness stays keyed: a block's key is handed to it as ``rng=``; where none was given (train
mode, a block called on its own), a dropout or stochastic-depth layer draws a fresh key from
torch's global generator, as ``nn.Dropout`` draws from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vafunc.core import tree as vtree
from vafunc.core.init import Initializer
from vafunc.core.kit import Scope
from vafunc.core.layers import same_padding

from . import layers as CL  # keyed_*: called through the module, where torch.fx.wrap patches them
from .layers import BatchNormAct2d, Conv2dSame, Dropout, DropPath, InstanceNorm2d, LayerNorm2d, op_module

__all__ = ["VafuncModule", "Block", "Sequential", "Bound", "call"]

_EMPTY: dict = {}


def tracing() -> bool:
    """Whether FX, TorchScript's tracer or dynamo is tracing (input checks are skipped then)."""
    return torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()


# --------------------------------------------------------------------------- containers


_DATA = (torch.Tensor, torch.fx.Proxy)


def call(mod: nn.Module, x):
    """A module the declaration does not run itself, called as the reference calls it: an
    ``nn.MultiheadAttention`` as self-attention ``mod(x, x, x, need_weights=False)[0]``, any
    other module ``mod(x)``."""
    if isinstance(mod, nn.MultiheadAttention):
        return mod(x, x, x, need_weights=False)[0]
    return mod(x)


def _same(a: tuple, b: tuple) -> bool:
    """Whether a block's call arguments are the ones it was built with (no tensors among them)."""
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if u is v and not isinstance(u, _DATA):
            continue
        if isinstance(u, _DATA) or isinstance(v, _DATA) or type(u) is not type(v) or u != v:
            return False
    return True


class _Declared:
    """What :class:`Block` and :class:`Sequential` share: ``fn`` of the declaration with the arguments
    of the build's call, run in a :class:`Bound` scope over this module."""

    fn: Callable | None
    args: tuple
    kw: dict
    defaults: dict

    def _declare(self, fn, args, kw, defaults):
        self.fn, self.args, self.kw, self.defaults = fn, tuple(args), dict(kw), defaults

    def matches(self, args: tuple, kw: dict) -> bool:
        return _same(args, self.args) and ((not kw and not self.kw) or _same(tuple(kw.items()), tuple(self.kw.items())))

    def _run(self, x, args, kw, rng):
        if not args and not kw:
            args, kw = self.args, self.kw
        return self.fn(Bound(self, self.training, rng, self.defaults), x, *args, **kw)


class Block(_Declared, nn.Module):
    """A block of the declaration (``m.block(name, fn, x, *args)``): ``forward(x)`` runs ``fn``
    over this module's children."""

    def __init__(self, fn: Callable, args: tuple = (), kw: dict | None = None, defaults: dict | None = None):
        nn.Module.__init__(self)
        self._declare(fn, args, kw or {}, defaults or {})

    def forward(self, x, *args, rng=None, **kw):
        return self._run(x, args, kw, rng)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", "")


class Sequential(_Declared, nn.Sequential):
    """An ``nn.Sequential`` of the reference (``layer1``, ``features``, ``downsample``): indexable,
    sliceable, assignable. While its children are the ones built (replaced ones included) it runs
    the declaration's ``fn``, which threads the keys of its blocks as the pure apply does; once
    children are added, removed or reordered (``append``, ``del``, a slice), it is a plain chain."""

    def __init__(self, *mods):
        nn.Sequential.__init__(self, *mods)
        self._declare(None, (), {}, {})
        self.names: tuple = ()
        self.plain = False  # whether the declaration's fn is exactly the chain of its children

    def forward(self, x, *args, rng=None, **kw):
        if self.fn is not None and tuple(self._modules) == self.names and not (self.plain and rng is None):
            return self._run(x, args, kw, rng)
        if args or kw:  # a plain chain hands its children the image only: say so, drop nothing silently
            raise TypeError(
                f"this nn.Sequential's children were added, removed or reordered, so it runs as a "
                f"plain chain of x only; it cannot take the block arguments {args} {sorted(kw)}"
            )
        for mod in self._modules.values():  # (a key given as rng= is not used: dropout draws from torch's RNG)
            x = mod(x)
        return x


class Bound(Scope):
    """The scope of a compat module's forward: every layer call is a call of the submodule at that
    name (``docs/design.md``). Parameter-free arithmetic of the declaration runs inline."""

    __slots__ = ("mod",)

    def __init__(self, mod: nn.Module, train: bool, rng, defaults: dict):
        Scope.__init__(self, _EMPTY, _EMPTY, rng=rng, defaults=defaults)
        self.train = train
        self.mod = mod

    # structure
    def child(self, name, rng=None, *, module=None):
        return Bound(self.mod._modules[name], self.train, rng, self.defaults)

    def block(self, name, fn, x, *args, tap=True, rng=None, module=None, sequential=False, **kw):
        mod = self.mod._modules[name]
        if not isinstance(mod, _Declared):  # torch's layer, or a user's replacement (nn.Identity(), a new head)
            return call(mod, x)
        if mod.matches(args, kw):
            return mod(x) if rng is None else mod(x, rng=rng)
        return mod(x, *args, rng=rng, **kw)

    def tap(self, name, y):
        return y

    def require_multiple(self, k):
        return None

    def cast(self, t):
        return t

    # layers: the module at the name (its hyperparameters live in the module, built from the declaration)
    def _layer(self, name, x, *args, **kw):
        return self.mod._modules[name](x)

    conv = linear = batch_norm = group_norm = instance_norm = norm = layer_norm = layer_norm2d = norm_act = _layer

    def op(self, name, fn, x, *args, tap=True, **kw):
        return self.mod._modules[name](x)

    def param(self, name, shape=None, init=None, *, batched=False):
        return getattr(self.mod, name)

    def layer_scale(self, name, channels=None, value=None, *, shape=None, ndim=4):
        return getattr(self.mod, name)

    def buffer(self, name, make=None):
        return getattr(self.mod, name)

    def linear_with(self, x, w, b=None):
        return F.linear(x, w, b)

    def dropout(self, x, rate, rng, name=None):
        if name is not None:
            mod = self.mod._modules[name]
            return mod(x) if rng is None or not isinstance(mod, Dropout) else mod(x, rng)
        return CL.keyed_dropout(x, rate, rng, self.train)

    def drop_path(self, x, rate, rng, name=None):
        if name is not None:
            mod = self.mod._modules[name]
            return mod(x) if rng is None or not isinstance(mod, DropPath) else mod(x, rng)
        return CL.keyed_drop_path(x, rate, rng, self.train)

    def attention(self, q, k, v, *, bias=None, scale=None, rate=0.0, rng=None):
        return CL.keyed_attention(q, k, v, bias, scale, rate, rng, self.train)


# --------------------------------------------------------------------------- build


class _Builder(Scope):
    """An init-mode scope (on meta tensors) that also builds the module tree: see the module
    docstring. ``calls`` records ``(name, input, output)`` of each child module call, for the
    chain check that makes a block an ``nn.Sequential``."""

    __slots__ = ("mod", "calls")

    def __init__(self, p, s, *, mod: nn.Module, **kw):
        Scope.__init__(self, p, s, **kw)
        self.mod = mod
        self.calls: list = []

    def _sub(self, name: str, module: nn.Module) -> _Builder:
        mods = self.mod._modules
        module = mods.setdefault(name, module)
        return _Builder(
            self.p.setdefault(name, {}),
            None,
            mod=module,
            ini=self.ini,
            path=f"{self.path}{name}.",
            defaults=self.defaults,
            sizes=self.sizes,
            ctx=self.ctx,
        )

    def _leaf(self, name: str, module: nn.Module, x, y):
        if name not in self.mod._modules:
            self.mod.add_module(name, module)
        self.calls.append((name, x, y, x._version, y._version))
        return y

    def child(self, name, rng=None, *, module=None):
        return self._sub(name, nn.Module() if module is None else _torch_module(module, None))

    def declare(self, name, module):
        if name in self.mod._modules:
            raise ValueError(f"{self.path}{name} is declared twice")
        self.mod.add_module(name, _torch_module(module, None))

    def block(self, name, fn, x, *args, tap=True, rng=None, module=None, sequential=False, **kw):
        if name in self.mod._modules:
            raise ValueError(f"{self.path}{name} is declared twice")
        mod = Block(fn, args, kw, self.defaults)
        c = self._sub(name, mod)
        version = x._version
        y = fn(c, x, *args, **kw)
        if module is not None:  # torch's layer: the same tensors under the same names, checked
            torch_mod = _torch_module(module, x.dtype)
            want = {k: tuple(v.shape) for k, v in torch_mod.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
            if want != got:
                raise ValueError(
                    f"{self.path}{name}: the declaration's tensors {got} are not those of torch's {module[0]} {want}"
                )
            self.mod._modules[name] = torch_mod
            self.calls.append((name, x, y, x._version, y._version))
            return self.tap(name, y) if tap else y
        names = tuple(mod._modules)
        ints = names == tuple(str(i) for i in range(len(names)))
        chain = (
            names
            and (ints or sequential)
            and len(c.calls) == len(names)
            and [n for n, *_ in c.calls] == list(names)
            and c.calls[0][1] is x
            and (c.calls[-1][2] is y or sequential)  # sequential: an nn.Sequential subclass may finish its own way
            and all(c.calls[i][1] is c.calls[i - 1][2] for i in range(1, len(names)))
            and not mod._parameters
            and not mod._buffers
        )
        if sequential and not chain:
            raise ValueError(f"{self.path}{name} is declared sequential, but its children do not form a chain")
        if chain:  # the reference's nn.Sequential: same children, the declaration's fn while unmodified
            seq = Sequential()
            seq._modules = mod._modules
            seq._declare(fn, args, kw, self.defaults)
            seq.names = names
            seq.plain = c.calls[-1][2] is y and _plain_chain(c.calls, version, y, mod._modules)
            self.mod._modules[name] = seq
        self.calls.append((name, x, y, x._version, getattr(y, "_version", None)))  # a block may return a tuple
        return self.tap(name, y) if tap else y

    def conv(
        self, name, x, cout, kernel, *, stride=1, padding=None, dilation=1, groups=1, bias=False, init=None, _fold=None
    ):
        y = Scope.conv(
            self,
            name,
            x,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            init=init,
        )
        cls, pad = nn.Conv2d, padding
        if padding is None:
            pad = same_padding(kernel, dilation)
        elif padding == "tf_same":
            odd = kernel % 2 if isinstance(kernel, int) else all(k % 2 for k in kernel)
            if stride in (1, (1, 1)) and odd:
                pad = same_padding(kernel, dilation)
            else:
                cls, pad = Conv2dSame, 0
        mod = cls(x.shape[1], cout, kernel, stride, pad, dilation, groups, bias, device="meta", dtype=x.dtype)
        return self._leaf(name, mod, x, y)

    def linear(self, name, x, fout, *, bias=True, init=None):
        y = Scope.linear(self, name, x, fout, bias=bias, init=init)
        return self._leaf(name, nn.Linear(x.shape[-1], fout, bias=bias, device="meta", dtype=x.dtype), x, y)

    def batch_norm(self, name, x, *, eps=None, momentum=None, zero_init=False, affine=True):
        y = Scope.batch_norm(self, name, x, eps=eps, momentum=momentum, zero_init=zero_init, affine=affine)
        eps = self._eps(eps)
        momentum = self.defaults.get("momentum", 0.1) if momentum is None else momentum
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
        return self._leaf(
            name, cls(x.shape[1], eps=eps, momentum=momentum, affine=affine, device="meta", dtype=x.dtype), x, y
        )

    def group_norm(self, name, x, groups, *, eps=1e-5, zero_init=False):
        y = Scope.group_norm(self, name, x, groups, eps=eps, zero_init=zero_init)
        return self._leaf(name, nn.GroupNorm(groups, x.shape[1], eps, device="meta", dtype=x.dtype), x, y)

    def instance_norm(self, name, x, *, eps=1e-5):
        y = Scope.instance_norm(self, name, x, eps=eps)
        return self._leaf(name, InstanceNorm2d(x.shape[1], eps, affine=True, device="meta", dtype=x.dtype), x, y)

    def norm_act(self, name, x, act, *, eps=None, momentum=None, zero_init=False):
        y = act(Scope.batch_norm(self, name, x, eps=eps, momentum=momentum, zero_init=zero_init))
        eps = self._eps(eps)
        momentum = self.defaults.get("momentum", 0.1) if momentum is None else momentum
        return self._leaf(
            name, BatchNormAct2d(x.shape[1], eps=eps, momentum=momentum, act=act, device="meta", dtype=x.dtype), x, y
        )

    def layer_norm(self, name, x, *, eps=1e-5):
        y = Scope.layer_norm(self, name, x, eps=eps)
        return self._leaf(name, nn.LayerNorm(x.shape[-1], eps, device="meta", dtype=x.dtype), x, y)

    def layer_norm2d(self, name, x, *, eps=1e-6):
        y = Scope.layer_norm2d(self, name, x, eps=eps)
        return self._leaf(name, LayerNorm2d(x.shape[1], eps, device="meta", dtype=x.dtype), x, y)

    def op(self, name, fn, x, *args, tap=True, **kw):
        y = fn(x, *args, **kw)
        self._leaf(name, op_module(fn, args, kw), x, y)
        return self.tap(name, y) if tap else y

    def dropout(self, x, rate, rng, name=None):
        y = Scope.dropout(self, x, rate, rng)
        return y if name is None else self._leaf(name, Dropout(rate), x, y)

    def drop_path(self, x, rate, rng, name=None):
        y = Scope.drop_path(self, x, rate, rng)
        return y if name is None else self._leaf(name, DropPath(rate), x, y)

    def param(self, name, shape, init=("zeros",), *, batched=False):
        t = Scope.param(self, name, shape, init, batched=batched)
        self.mod.register_parameter(name, nn.Parameter(torch.empty_like(t, device="meta")))
        return t

    def buffer(self, name, make):
        t = Scope.buffer(self, name, make)
        self.mod.register_buffer(name, torch.empty_like(t, device="meta"))
        return t


def _plain_chain(calls: list, version: int, y, children: dict) -> bool:
    """Whether a chain block's fn is nothing but its children called in order: every child a torch
    leaf or a plain chain itself (not another block of the declaration, which may use its arguments
    or keys) and no in-place arithmetic of the fn between the calls (tensor versions on meta: a leaf
    that works in place, ``nn.ReLU(inplace=True)``, bumps its input's once). Such a block runs as a
    plain ``nn.Sequential`` when no key is given (the same module calls, without the scope)."""
    if any(isinstance(mod, _Declared) and not getattr(mod, "plain", False) for mod in children.values()):
        return False  # (a plain Sequential child runs its leaves on x alone, whatever arguments it is given)
    prev = version
    for _, x, out, xv, yv in calls:
        if xv != prev + (out is x):
            return False
        prev = yv
    return y._version == prev


class Holder(nn.Module):
    """A module of the reference whose tensors its parent reads without calling it (timm's
    ``RelPosBias``, read by ``get_bias()``): declared ``m.child(name, module=("Holder", ()))``;
    like the reference's, its forward hooks never fire."""


def _torch_module(spec: tuple, dtype) -> nn.Module:
    """``(torch class name, keywords)`` -> that module of ``torch.nn`` on the meta device."""
    cls, kw = spec
    if cls == "Holder":
        return Holder()
    if cls in ("Sequential", "ModuleList", "ModuleDict", "Identity"):  # containers: no tensors of their own
        return getattr(nn, cls)(**dict(kw))
    return getattr(nn, cls)(**dict(kw), device="meta", dtype=dtype)


class VafuncModule(nn.Module):
    """A vafunc model as the reference's module tree (:mod:`torch_compat.tree`), holding the given
    ``params``/``state`` tensors (shared, not copied).

    ``forward(x, *, rng=None, **kw)`` runs the family's declaration over the modules; ``rng``
    keys its dropout and stochastic depth in train mode as in ``apply(..., rng=rng)`` (the same
    key gives the same output), and without one they draw from torch's global generator.
    ``model`` is the :class:`vafunc.ModelDef`, :meth:`params_and_state` the two trees back.
    """

    def __init__(self, model, params, state):
        super().__init__()
        decl = model.family.declaration
        if decl is None:
            raise TypeError(f"{model.name}: torch_compat builds module trees of kit families (vafunc.core.kit.family)")
        object.__setattr__(self, "model", model)
        self.defaults = decl.defaults(model.config)
        dtype = next((t.dtype for t in vtree.tree_leaves(params) if t.is_floating_point()), None)
        ini = Initializer.from_key(0, device="meta", dtype=dtype)
        model.family.probe(model.config, ini, scope=lambda p, s, **kw: _Builder(p, s, mod=self, **kw))
        self.load_state_dict(vtree.to_state_dict(params, state), strict=True, assign=True)

    def extra_repr(self) -> str:
        return f"vafunc model {self.model.name!r}"

    def params_and_state(self) -> tuple[dict, dict]:
        """The module's tensors as vafunc's ``(params, state)`` trees (the tensors themselves)."""
        return (vtree.unflatten(dict(self.named_parameters())), vtree.unflatten(dict(self.named_buffers())))

    def forward(self, x: torch.Tensor, rng=None, **kw) -> Any:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            rng, kw = None, {}  # FX hands every argument a Proxy; a traced graph takes the image only
        elif not tracing():
            self.model.check_input(x)
        m = Bound(self, self.training, rng, self.defaults)
        return self.model.family.declaration.forward(m, self.model.config, x, **kw)
