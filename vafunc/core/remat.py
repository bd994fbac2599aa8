"""Rematerialisation: ``apply(..., remat="blocks")`` recomputes blocks in the backward.

A rematerialised block keeps only its inputs for the backward (the block's input, its parameters,
BatchNorm buffers and key, which exist anyway); its activations are freed as the forward goes on,
and the backward runs the block again, from those inputs, to differentiate it. Peak memory of a
train step falls to the stored block inputs plus one block's activations, for about one more
forward pass of compute.

``torch.utils.checkpoint`` cannot do this under ``torch.func``: its non-reentrant form relies on
saved-tensor hooks, which the functorch transforms refuse, and its reentrant form is an
``autograd.Function`` without ``setup_context``, which they also refuse (pytorch issues 165880
and 122729). Here the block is one :class:`_Remat` ``autograd.Function`` in the functorch style:
a pure ``forward`` (the block under no grad), ``setup_context`` saving only the inputs, a
``backward`` that re-runs the block under :func:`torch.func.vjp` (or plain autograd when no
transform is active) and ``generate_vmap_rule = True``. So it composes with ``torch.func.grad``,
``vjp``, ``vmap`` (an ensemble: ``vmap(grad(...))`` and ``grad(vmap(...))``), double backward
and plain ``loss.backward()``. Forward-mode AD (``jvp``) is not supported through a
rematerialised block.

What is recomputed is exactly what ran: the same parameters, the same batch statistics (train
mode), the same dropout masks (they come from the block's vafunc key), so gradients are those of
the plain apply (bit-equal where the op sequence is the same). Which blocks (:func:`plan`):

* ``"blocks"``: every tapped block (a feature name, ``model.feature_names``) with no tapped
  block inside it: ResNet's ``layer1.0`` ..., ViT's ``encoder.layers.encoder_layer_{i}``, Swin's
  ``features.1.0`` ..., DenseNet's dense layers and transitions;
* a list of block paths (``["layer3", "layer4"]``), any ``m.block`` of the declaration; a block
  inside a rematerialised one runs plainly (its outer block is recomputed as a whole).

A declaration can also mark a stretch of layers in its own scope as a block with :func:`segment`
(parameter paths unchanged); ``"blocks"`` selects those too. ResNet's stem (``conv1``, ``bn1``,
the activation, ``maxpool``) is the segment ``"stem"``: at 224 it holds three 112x112 maps (a
quarter of what the rematerialised resnet50 otherwise keeps), and recomputing it costs about 3% of
a forward.

Rematerialisation is off when features are tapped (``model.features``) and in init mode.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.autograd.graph import get_gradient_edge

from vafunc.core import tree as vtree

__all__ = ["plan", "block_paths", "run_block", "segment"]


def block_paths(family: Any, cfg: Any, scope: type) -> dict[str, bool]:
    """Every ``m.block`` of a kit family's declaration at ``cfg``: ``{module path: tapped}``, in call
    order (an init-mode run on meta tensors; ``scope``: :class:`vafunc.core.kit.Scope`, passed in
    by the kit, which imports this module)."""
    return dict(_block_paths(family, cfg, scope))


@lru_cache(maxsize=256)
def _block_paths(family: Any, cfg: Any, Scope: type) -> tuple[tuple[str, bool], ...]:  # noqa: N803
    from vafunc.core.init import Initializer
    from vafunc.core.probing import Recording

    seen: dict[str, bool] = {}

    class Recorder(Recording, Scope):
        __slots__ = ()

        def block(self, name, fn, x, *args, tap=True, **kw):
            seen[self.path + name] = tap
            return super().block(name, fn, x, *args, tap=tap, **kw)

        def record_segment(self, name):  # vafunc.core.remat.segment: selected by "blocks" too
            seen[self.path + name] = True

    if family.probe is None:
        raise ValueError(f"{family.name} is not a kit family: remat needs its declaration")
    family.probe(cfg, Initializer.from_key(0, device="meta"), scope=Recorder)
    return tuple(seen.items())


@lru_cache(maxsize=256)
def _plan(family: Any, cfg: Any, remat: str | tuple[str, ...], scope: type) -> frozenset[str]:
    paths = block_paths(family, cfg, scope)
    if remat == "blocks":
        tapped = [p for p, tap in paths.items() if tap]
        return frozenset(p for p in tapped if not any(q.startswith(p + ".") for q in tapped))
    unknown = [n for n in remat if n not in paths]
    if unknown:
        close = {n: difflib.get_close_matches(n, list(paths), n=3) for n in unknown}
        raise ValueError(f"{family.name}: remat names {unknown} are not blocks of the declaration; close: {close}")
    return frozenset(remat)


def plan(family: Any, cfg: Any, remat: str | Sequence[str], scope: type) -> frozenset[str]:
    """The module paths of the blocks that ``remat`` (``"blocks"`` or a list of block paths) selects
    (``scope``: :class:`vafunc.core.kit.Scope`)."""
    if isinstance(remat, str):
        if remat != "blocks":
            raise ValueError(f"remat must be 'blocks' or a list of block paths, got {remat!r}")
        return _plan(family, cfg, remat, scope)
    if not isinstance(remat, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in remat):
        raise TypeError(f"remat must be 'blocks' or a list of block paths (str), got {remat!r}")
    return _plan(family, cfg, tuple(sorted(remat)), scope)


class _Box:
    """What the block's first run learns (its output structure, its new state's names); a plain
    object, so that functorch passes it through as it is (a dict would be rebuilt by pytree)."""

    __slots__ = ("out", "new")


class _Remat(torch.autograd.Function):
    """``forward(run, box, *inputs)``: ``run(*inputs) -> (outputs, new_state)`` (tuples of
    tensors); only ``outputs`` are differentiable, and the backward recomputes them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(run, box, *inputs):
        outs, new = run(*inputs)
        return (*outs, *new)

    @staticmethod
    def setup_context(ctx, inputs, output):
        run, box, *ins = inputs
        ctx.run, ctx.n_out = run, len(output) - len(box.new)
        ctx.save_for_backward(*ins)
        ctx.mark_non_differentiable(*output[ctx.n_out :])
        ctx.wanted = [i for i, t in enumerate(ins) if t.is_floating_point() and ctx.needs_input_grad[2 + i]]

    @staticmethod
    def backward(ctx, *grads):
        ins = list(ctx.saved_tensors)
        wanted, n_out = ctx.wanted, ctx.n_out
        cot = tuple(torch.zeros_like(g) if g is None else g for g in grads[:n_out])

        def outputs(*diff):
            full = list(ins)
            for i, t in zip(wanted, diff):
                full[i] = t
            return ctx.run(*full)[0]

        got = [None] * len(ins)
        if not wanted:
            return (None, None, *got)
        if torch._C._functorch.peek_interpreter_stack() is None and not torch.is_grad_enabled():
            # plain autograd (loss.backward(), make_train_step's default): the engine's own path
            leaves = [ins[i].detach().requires_grad_(True) for i in wanted]
            with torch.enable_grad():
                outs = outputs(*leaves)
            # the outputs by their graph edges: the recomputed outputs are freed as soon as the
            # graph is done with them, not held until the whole block is differentiated
            pairs = [(get_gradient_edge(o), c) for o, c in zip(outs, cot) if o.requires_grad]
            del outs
            diff = torch.autograd.grad([e for e, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
        else:  # under a torch.func transform, or differentiated again: a functorch level of its own
            _, back = torch.func.vjp(outputs, *[ins[i] for i in wanted])
            diff = back(cot)
        for i, g in zip(wanted, diff):
            got[i] = g
        return (None, None, *got)


def segment(m: Any, name: str, fn: Callable, x: torch.Tensor, *args: Any, reads: Sequence[str], **kw: Any) -> Any:
    """``fn(m, x, *args, **kw)`` in ``m``'s own scope (no child scope: parameter paths stay as they
    are), a block for rematerialisation named ``m.path + name``: a declaration marks a stretch of
    layers that is not an ``m.block`` (ResNet's stem, ``"stem"``) so that ``remat`` can recompute
    it. ``reads``: the submodules of ``m`` that ``fn`` uses (their parameters and buffers are the
    block's inputs, their new BatchNorm buffers its outputs). Plain (no remat, init mode, taps),
    this is just ``fn(m, x, *args, **kw)``."""
    record = getattr(m, "record_segment", None)
    if record is not None:  # block_paths' init-mode run
        record(name)
    if m.ini is None and m.ctx.remat and m.taps is None and m.path + name in m.ctx.remat:
        return run_block(m, name, fn, x, args, kw, m.rng, reads=tuple(reads))
    return fn(m, x, *args, **kw)


def run_block(
    m: Any, name: str, fn: Callable, x: torch.Tensor, args: tuple, kw: dict, rng: Any, reads: tuple | None = None
) -> Any:
    """``Scope.block(name, fn, x, *args, rng=rng, **kw)`` rematerialised (see the module docstring):
    the block's new BatchNorm buffers are merged into ``m``'s as the plain block's would be.
    ``reads``: a :func:`segment` in ``m``'s own scope, over those submodules."""
    if reads is None:
        p, s = m.p.get(name, {}), (m.s or {}).get(name, {})
    else:
        p = {k: m.p[k] for k in reads if k in m.p}
        s = {k: m.s[k] for k in reads if k in (m.s or {})}
    p_names, s_names = list(vtree.flatten(p)), list(vtree.flatten(s))
    extra, spec = pytree.tree_flatten((args, kw))
    slots = [i for i, v in enumerate(extra) if isinstance(v, torch.Tensor)]
    tensors = [x, *vtree.flatten(p).values(), *vtree.flatten(s).values(), *(extra[i] for i in slots)]
    has_rng = isinstance(rng, torch.Tensor)
    if has_rng:
        tensors.append(rng)
    ctx = m.ctx._replace(remat=frozenset())
    path = f"{m.path}{name}." if reads is None else m.path
    np_, ns_ = len(p_names), len(s_names)
    box = _Box()

    def run(*ins):
        xi, rest = ins[0], list(ins[1:])
        pi = vtree.unflatten(dict(zip(p_names, rest[:np_])))
        si = vtree.unflatten(dict(zip(s_names, rest[np_ : np_ + ns_])))
        vals = list(extra)
        for j, i in enumerate(slots):
            vals[i] = rest[np_ + ns_ + j]
        a, k = pytree.tree_unflatten(vals, spec)
        c = type(m)(pi, si, train=m.train, rng=rest[-1] if has_rng else rng, path=path, defaults=m.defaults, ctx=ctx)
        y = fn(c, xi, *a, **k)
        outs, box.out = pytree.tree_flatten(y)
        new = vtree.flatten(c.new) if m.train else {}
        box.new = list(new)
        return tuple(outs), tuple(new.values())

    flat = _Remat.apply(run, box, *tensors)
    n_out = len(flat) - len(box.new)
    if m.train:
        new = vtree.unflatten(dict(zip(box.new, flat[n_out:])))
        if reads is None:
            m.new[name] = new
        else:
            m.new.update(new)
    return pytree.tree_unflatten(list(flat[:n_out]), box.out)
