"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
as a pytree beside the frozen parameters.

A targeted linear layer ``y = W x + b`` (``W [out, in]``) computes ``W x + b + s * B (A x)`` with
``A [r, in]``, ``B [out, r]`` and ``s = alpha / r``: peft's layout (``lora_A.weight``,
``lora_B.weight``, ``scaling = lora_alpha / r``) and peft's init (``A`` kaiming-uniform with
``a = sqrt(5)``, i.e. uniform in ``+-1/sqrt(in)``; ``B`` zero, so an adapted model starts out as
its base)::

    lm = vafunc.lora.adapt(model, ["qkv", "proj", "fc1", "fc2"], rank=8, alpha=16)
    adapters = lm.init(key)  # {"blocks": {"0": {"attn": {"qkv": {"lora_A": [8, D], "lora_B": [3D, 8]}}}}, ...}
    logits, state = lm.apply(params, adapters, state, x)  # the low-rank path inside the forward
    merged = lm.merge(params, adapters)  # plain params (W + s B A) for model.apply
    step = vafunc.make_train_step(lm.bind(params), opt)  # a model whose parameters are the adapters

**Targets** are matched as peft matches ``target_modules``, against the model's *linear* layers only
(their module paths, :func:`linear_layers`): a list of names takes every layer whose path is a name
or ends with ``"." + name`` (``"proj"`` takes ``blocks.3.attn.proj`` but not ``blocks.3.attn.q_proj``),
a string is a regular expression the whole path must match. Convolutions are never taken: ``"proj"``
leaves timm's patch embedding (a conv at ``patch_embed.proj``) alone, where peft would put a conv
adapter on it. Every name (or the expression) must take at least one layer, or a ``ValueError``
lists the model's linear layers.

**How it runs.** :meth:`LoRA.apply` runs the model with a backend (:mod:`vafunc.core.backends`, the
hook the per-sample tape uses) whose ``linear`` adds ``s * B (A x)`` for the weights it was handed,
recognised by identity; no ``W + s B A`` is formed. A layer whose tensors the family passes to the
kit itself (EVA-02 tiny/small's ``qkv``, whose bias is built from ``q_bias`` and ``v_bias``) is
adapted too; peft cannot adapt that one (timm reads ``qkv.weight`` without calling the module, so
peft's wrapper is bypassed and its adapter has no effect). Under a precision policy the targeted
weights and their adapters are cast to the compute dtype first, once per call, as the kit would.

**Training** only the adapters is :meth:`LoRA.bind`: a model whose ``apply(adapters, state, x)``
closes over the frozen (detached) base parameters, so :func:`vafunc.make_train_step`,
:mod:`vafunc.training.optim` and ``torch.func`` see the adapters as the parameters. Adapters under
per-sample gradients or members-mode ensembles are not supported (the backend is LoRA's own).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import tree as vtree
from vafunc.core.backends import Plain
from vafunc.core.init import Initializer
from vafunc.core.kit import Scope
from vafunc.core.precision import check_policy
from vafunc.core.probing import Recording

__all__ = ["LoRA", "Bound", "adapt", "linear_layers", "PEFT_PREFIX"]

#: the prefix of peft's names (``get_peft_model_state_dict``) for a model wrapped by ``get_peft_model``
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- the model's linear layers


@lru_cache(maxsize=64)
def _layers(model) -> tuple[dict[str, tuple[str, int, int]], tuple[str, ...]]:
    """``({layer path: (weight leaf path, out, in)}, conv paths)`` from one init-mode run on meta
    tensors with a scope that records each ``linear``/``linear_with``/``conv`` call."""
    family = model.family
    if family.probe is None:
        raise ValueError(f"{model.name} is not a kit family: LoRA finds its linear layers through the declaration")
    linear: dict[str, tuple[str, int, int]] = {}
    convs: list[str] = []
    declared: dict[int, str] = {}  # id(meta tensor of a bare parameter) -> its leaf path

    class Recorder(Recording, Scope):
        __slots__ = ()

        def linear(self, name, x, fout, *, bias=True, init=None):
            y = super().linear(name, x, fout, bias=bias, init=init)
            linear[self.path + name] = (f"{self.path}{name}.weight", int(fout), int(x.shape[-1]))
            return y

        def linear_with(self, x, w, b=None):
            leaf = declared.get(id(w))
            if leaf is not None and w.dim() == 2:
                layer = leaf[: -len(".weight")] if leaf.endswith(".weight") else leaf
                linear[layer] = (leaf, int(w.shape[0]), int(w.shape[1]))
            return super().linear_with(x, w, b)

        def param(self, name, shape, init=("zeros",), *, batched=False):
            t = super().param(name, shape, init, batched=batched)
            declared[id(t)] = self.path + name  # on meta the stored tensor itself comes back
            return t

        def conv(self, name, x, *args, **kw):
            convs.append(self.path + name)
            return super().conv(name, x, *args, **kw)

    family.probe(model.config, Initializer.from_key(0, device="meta"), scope=Recorder)
    return linear, tuple(convs)


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """The module paths of ``model``'s linear layers, in call order, with ``(out, in)``: what LoRA
    targets are matched against (``"blocks.0.attn.qkv": (576, 192)``). A weight the family declares
    as a bare parameter (torchvision ViT's ``in_proj_weight``) is named by its leaf path."""
    return {k: v[1:] for k, v in _layers(model)[0].items()}


def _summary(paths: Sequence[str]) -> str:
    """``blocks.*.attn.qkv, head``: the paths with their block indices generalised, each once."""
    seen = dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", p) for p in paths)
    return ", ".join(seen)


def _select(model, targets: str | Sequence[str]) -> tuple[str, ...]:
    linear, convs = _layers(model)
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is not a regular expression: {e}") from None
        entries = [(targets, lambda p: rx.fullmatch(p) is not None)]
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets):
        entries = [(t, lambda p, t=t: p == t or p.endswith("." + t)) for t in targets]
    else:
        raise TypeError(
            f"targets must be a regular expression (str) or a non-empty list of layer names, got {targets!r}"
        )
    chosen: set[str] = set()
    for what, hit in entries:
        got = [p for p in linear if hit(p)]
        if not got:
            other = [p for p in convs if hit(p)]
            note = f" (it matches only convolutions: {_summary(other)}; LoRA adapts linear layers)" if other else ""
            raise ValueError(
                f"LoRA target {what!r} matches no linear layer of {model.name}{note}; its linear layers: "
                f"{_summary(list(linear))} (a name matches a path or its last parts, a string is a regular "
                "expression matched against the whole path)"
            )
        chosen.update(got)
    return tuple(p for p in linear if p in chosen)


# --------------------------------------------------------------------------- trees


def _get(tree: Mapping, path: str, what: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{what} has no {path!r}")
        node = node[part]
    return node


def _put(tree: dict, path: str, value: Any) -> dict:
    """``tree`` with the leaf at ``path`` replaced (only the dicts along the path copied)."""
    head, _, rest = path.partition(".")
    out = dict(tree)
    out[head] = _put(tree[head], rest, value) if rest else value
    return out


# --------------------------------------------------------------------------- the backend


class _Adapted(Plain):
    """The aten ops, plus ``s * B (A x)`` on the linear layers whose weight is in ``table``."""

    def __init__(self, table: dict[int, tuple[Tensor, Tensor]], scale: float):
        self.table = table
        self.scale = scale
        self.used: set[int] = set()

    def linear(self, x, w, b):
        y = F.linear(x, w, b)
        ab = self.table.get(id(w))
        if ab is None:
            return y
        self.used.add(id(w))
        return y + F.linear(F.linear(x, ab[0]), ab[1]) * self.scale  # peft's order: B(A x) * scaling

    linear_with = linear


# --------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters of rank ``rank`` on the linear ``layers`` (module paths, call order) of
    ``model``, scaled by ``alpha / rank`` (:func:`adapt` builds one; ``leaves`` and ``sizes``, each
    layer's weight leaf path and ``(out, in)``, are read off the declaration there, so that nothing
    is probed inside a compiled or transformed call). Frozen and hashable; the adapters themselves
    are a pytree (:meth:`init`)."""

    model: Any
    layers: tuple[str, ...]
    rank: int
    alpha: float
    leaves: tuple[str, ...] = field(repr=False)
    sizes: tuple[tuple[int, int], ...] = field(repr=False)

    @property
    def scale(self) -> float:
        """``alpha / rank``, peft's ``scaling``."""
        return self.alpha / self.rank

    def shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """``{layer: (shape of A [r, in], shape of B [out, r])}``."""
        return {p: ((self.rank, i), (o, self.rank)) for p, (o, i) in zip(self.layers, self.sizes)}

    def init(self, key=0, *, device=None, dtype=None) -> dict:
        """Fresh adapters from a key or int seed: ``A`` uniform in ``+-1/sqrt(in)`` (peft's
        kaiming-uniform, ``a = sqrt(5)``), ``B`` zero, nested at each layer's path as ``lora_A``,
        ``lora_B`` (drawn in layer order on the CPU generator, as :meth:`ModelDef.init`)."""
        ini = Initializer.from_key(key, device=device, dtype=dtype)
        out: dict = {}
        for path, (sa, sb) in self.shapes().items():
            a = ini.uniform(sa, -1 / math.sqrt(sa[1]), 1 / math.sqrt(sa[1]))
            node = out
            for part in path.split("."):
                node = node.setdefault(part, {})
            node["lora_A"], node["lora_B"] = a, ini.zeros(sb)
        return out

    def _pairs(self, params: Mapping, adapters: Mapping):
        """``(layer, weight leaf path, W, A, B)`` per layer, shapes checked."""
        for (path, (sa, sb)), leaf in zip(self.shapes().items(), self.leaves):
            w = _get(params, leaf, f"{self.model.name}'s params")
            node = _get(adapters, path, "the adapter tree")
            if not isinstance(node, Mapping) or set(node) != {"lora_A", "lora_B"}:
                raise ValueError(f"adapters[{path!r}] must hold lora_A and lora_B, got {node!r:.80}")
            a, b = node["lora_A"], node["lora_B"]
            if tuple(a.shape) != sa or tuple(b.shape) != sb:
                raise ValueError(
                    f"adapters of {path}: lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                    f"expected {list(sa)} and {list(sb)} (rank {self.rank})"
                )
            yield path, leaf, w, a, b

    def apply(self, params, adapters, state, x, *, policy=None, **kw):
        """``model.apply`` with each adapted layer computing ``W x + b + s * B (A x)`` (no weight
        copy); keywords as ``model.apply`` (``train``, ``rng``, ``policy``, ``attention``, ``remat``)."""
        if kw.get("backend") is not None:
            raise TypeError("LoRA's forward runs its own backend; backend= (per-sample tape, members) is not supported")
        kw.pop("backend", None)
        policy = check_policy(policy)
        compute = policy.compute if policy is not None and policy.mixed else None
        table: dict[int, tuple[Tensor, Tensor]] = {}
        run = params
        for path, leaf, w, a, b in self._pairs(params, adapters):
            if compute is not None:  # cast once here, so that the kit's cast of W is the identity
                w, a, b = w.to(compute), a.to(compute), b.to(compute)
                run = _put(run, leaf, w)
            elif a.dtype != w.dtype or b.dtype != w.dtype:
                raise TypeError(
                    f"adapters of {path} are {a.dtype}/{b.dtype} but the weight is {w.dtype}; "
                    f"init them with dtype={w.dtype} or pass a precision policy"
                )
            table[id(w)] = (a, b)
        low = _Adapted(table, self.scale)
        y, new_state = self.model.apply(run, state, x, policy=policy, backend=low, **kw)
        if len(low.used) != len(table):
            missed = [p for p, _, w, _, _ in self._pairs(run, adapters) if id(w) not in low.used]
            raise RuntimeError(f"{self.model.name}: the forward did not reach the adapted layers {missed}")
        return y, new_state

    def merge(self, params, adapters) -> dict:
        """Plain parameters for ``model.apply``: each adapted weight replaced by ``W + s * B A``
        (peft's ``merge_and_unload``); the other leaves are shared, not copied."""
        out = params
        for _, leaf, w, a, b in self._pairs(params, adapters):
            out = _put(out, leaf, w + (b @ a) * self.scale)
        return out

    def bind(self, params) -> Bound:
        """A model whose parameters are the adapters: ``apply(adapters, state, x, **kw)`` with these
        base ``params`` frozen (detached) inside, for :func:`vafunc.make_train_step` and ``torch.func``."""
        return Bound(self, vtree.tree_map(torch.Tensor.detach, params))

    # ---------------------------------------------------------------- peft's names
    def to_peft(self, adapters) -> dict[str, Tensor]:
        """The adapters under peft's names (``get_peft_model_state_dict`` of ``get_peft_model(
        timm_model, LoraConfig(...))``: ``base_model.model.<layer>.lora_A.weight``), for
        ``set_peft_model_state_dict`` or an ``adapter_model.safetensors``."""
        out = {}
        for path in self.layers:
            node = _get(adapters, path, "the adapter tree")
            for k in ("lora_A", "lora_B"):
                out[f"{PEFT_PREFIX}{path}.{k}.weight"] = node[k]
        return out

    def from_peft(self, state_dict: Mapping[str, Tensor]) -> dict:
        """Adapters from peft's names (:meth:`to_peft`'s inverse); strict: every adapted layer's
        ``lora_A``/``lora_B`` and nothing else."""
        want = {f"{PEFT_PREFIX}{p}.{k}.weight": (p, k) for p in self.layers for k in ("lora_A", "lora_B")}
        missing, extra = [k for k in want if k not in state_dict], [k for k in state_dict if k not in want]
        if missing or extra:
            raise ValueError(f"peft adapter names do not fit this LoRA: missing {missing[:4]}, unexpected {extra[:4]}")
        out: dict = {}
        for name, (path, k) in want.items():
            node = out
            for part in path.split("."):
                node = node.setdefault(part, {})
            node[k] = state_dict[name]
        self._check_shapes(out)
        return out

    def _check_shapes(self, adapters) -> None:
        for path, (sa, sb) in self.shapes().items():
            node = _get(adapters, path, "the adapter tree")
            if tuple(node["lora_A"].shape) != sa or tuple(node["lora_B"].shape) != sb:
                raise ValueError(
                    f"adapters of {path}: lora_A {list(node['lora_A'].shape)}, lora_B {list(node['lora_B'].shape)}; "
                    f"expected {list(sa)} and {list(sb)}"
                )


@dataclass(frozen=True, eq=False)
class Bound:
    """:meth:`LoRA.bind`: the adapted model with its base parameters closed over; its parameters
    are the adapters (``init``, ``apply(adapters, state, x, **kw)``)."""

    lora: LoRA
    params: dict = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.lora.model.name}+lora"

    @property
    def config(self):
        return self.lora.model.config

    def init(self, key=0, *, device=None, dtype=None) -> dict:
        """Fresh adapters (:meth:`LoRA.init`)."""
        return self.lora.init(key, device=device, dtype=dtype)

    def apply(self, adapters, state, x, **kw):
        """:meth:`LoRA.apply` with the bound base parameters."""
        return self.lora.apply(self.params, adapters, state, x, **kw)

    __call__ = apply


def adapt(model, targets: str | Sequence[str], *, rank: int = 8, alpha: float = 8) -> LoRA:
    """LoRA on ``model``'s linear layers that ``targets`` picks (a list of names, matched as a path
    or its last parts, or a regular expression matched against the whole path, as peft's
    ``target_modules``), of rank ``rank``, scaled by ``alpha / rank`` (peft's defaults: 8 and 8)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    layers = _select(model, targets)
    linear = _layers(model)[0]
    return LoRA(
        model, layers, rank, float(alpha), tuple(linear[p][0] for p in layers), tuple(linear[p][1:] for p in layers)
    )
