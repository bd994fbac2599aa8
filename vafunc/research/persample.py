"""Per-sample gradients and their norms in one batched backward pass.

The weight gradient of a convolution or linear layer, for one sample, is a product of that
sample's layer input and its output gradient (Goodfellow 2015, "Efficient per-example gradient
computations"). The gradient of a normalisation layer's affine parameters is the output gradient
times the normalised input, summed over the positions. So one ordinary forward and one backward
over the whole batch carry everything needed: each parameterised layer only has to keep its input
and, in the backward pass, form the per-sample products instead of summing them over the batch.

This module does that with a *tape*: :func:`vafunc.per_sample_grads` and
:func:`per_sample_grad_norms` pass a :class:`Tape` to ``model.apply(..., backend=Taped(tape))``; the kit's
``conv`` / ``linear`` / ``batch_norm`` (eval) / ``group_norm`` / ``layer_norm`` /
``layer_norm2d`` then route through the autograd functions below instead of the plain aten op.
The tape gives every parameter a *ghost*: a tensor that enters the layer's autograd function as
an extra input and whose gradient is the per-sample result:

* ``mode="grads"``: a ghost ``[B, *param.shape]`` per parameter; its gradient is the parameter's
  per-sample gradient (accumulated by autograd when a parameter is used twice).
* ``mode="norms"``: one ghost ``[B]`` shared by every layer; each layer returns its per-sample
  squared gradient norm, and autograd's accumulation sums them into the total. Per layer it picks
  the cheaper of two ways (Bu et al. 2022, "mixed ghost clipping"): the ghost norm (Li et al.
  2022), ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` over the ``T`` output positions, cost ``O(T^2 (D +
  O))``; or the explicit per-sample gradient, cost ``O(T D O)`` (``D`` the unfolded input width,
  ``O`` the output channels of the group). Per-sample gradients are never stored.

The tape is an explicit argument and lives for one call: ``apply`` stays pure, and without a tape
the kit emits the plain aten ops (``vafunc.compile`` and inductor see exactly what they saw).
Bare parameters that broadcast over the batch (class, register and distillation tokens, position
embeddings, layer scales, a ViT's q/v biases: ``m.param(..., batched=)``) are given a real batch
axis (:meth:`Tape.expand`), whose gradient is the per-sample one. A model whose parameters are not
all reached through these (relative position tables: parameters a family uses directly) is not
covered by the tape; :func:`vafunc.per_sample_grads` then falls back to ``torch.vmap(grad)``,
which is exact for every model but slower (docs/research.md says which families take which path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import tree as vtree
from vafunc.core._pairs import pair
from vafunc.research.taped import Taped
from vafunc.serving.memory import reusable_empty

if TYPE_CHECKING:
    from vafunc.core.registry import ModelDef

__all__ = ["Tape", "per_sample_grads", "per_sample_grad_norms", "tape_covers", "empty_like_batched"]


# --------------------------------------------------------------------------- per-sample products


def _conv_cols(
    x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> Tensor:
    """The unfolded input of a conv, ``[B, Cin * kh * kw, T]`` (a view for a 1x1 stride-1 conv)."""
    if kernel == (1, 1) and padding == (0, 0) and dilation == (1, 1):
        if stride != (1, 1):
            x = x[:, :, :: stride[0], :: stride[1]]
        return x.reshape(x.shape[0], x.shape[1], -1)
    return F.unfold(x, kernel, dilation, padding, stride)


def _grouped(cols: Tensor, g: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """``cols [B, G*D, T]``, ``g [B, G*O, T]`` -> ``[B, G, D, T]``, ``[B, G, O, T]``."""
    t = cols.shape[2]  # the batches may differ: a tape may unfold only distinct samples (Tape.unfold)
    return cols.reshape(cols.shape[0], groups, -1, t), g.reshape(g.shape[0], groups, -1, t)


def _weight_grad(a: Tensor, g: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-sample weight gradient ``[B, G, O, D]`` from ``a [B, G, D, T]``, ``g [B, G, O, T]``
    (one batched matrix product over samples and groups; written into ``out`` if given)."""
    b, groups, d, t = a.shape
    o = g.shape[2]
    dest = None if out is None else out.view(b * groups, o, d)
    if t == 1:  # one position (a linear, a conv on a 1x1 output): an outer product, written in one pass
        # (faster than bmm with an inner dimension of 1; see benchmarks/README.md)
        res = torch.mul(g.reshape(b * groups, o, 1), a.reshape(b * groups, 1, d), out=dest)
    else:
        res = torch.bmm(g.reshape(b * groups, o, t), a.reshape(b * groups, d, t).transpose(1, 2), out=dest)
    return res.view(b, groups, o, d)


def _sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """Per-sample squared Frobenius norm of ``sum_t g_t a_t^T`` per sample, summed over groups,
    by the cheaper of the ghost norm and the explicit gradient."""
    b, groups, d, t = a.shape
    o = g.shape[2]
    if t * (d + o) < d * o:  # ghost norm: Gram matrices over positions
        a2, g2 = a.reshape(b * groups, d, t), g.reshape(b * groups, o, t)
        ka = torch.bmm(a2.transpose(1, 2), a2)
        kg = torch.bmm(g2.transpose(1, 2), g2)
        return (ka * kg).reshape(b, -1).sum(1)
    return _weight_grad(a, g).reshape(b, -1).square().sum(1)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, ghost_w, ghost_b, tape, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.conf = (tape, id(w), None if b is None else id(b), stride, padding, dilation, groups)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        tape, kw, kb, stride, padding, dilation, groups = ctx.conf
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                g, x, w, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
            )[0]
        bsz, cout = g.shape[:2]
        cols = tape.unfold(x, tuple(w.shape[2:]), stride, padding, dilation)
        a, gg = _grouped(cols, g.reshape(bsz, cout, -1), groups)
        return (gx, None, None) + tape.results(a, gg, kw, kb) + (None,) * 5


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, ghost_w, ghost_b, tape):
        ctx.save_for_backward(x, w)
        ctx.conf = (tape, id(w), None if b is None else id(b))
        y = F.linear(x, w, b)
        return y if y._base is None else y.clone()  # a view (of a 3-D matmul) cannot leave a Function

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        tape, kw, kb = ctx.conf
        gx = g @ w if ctx.needs_input_grad[0] else None
        bsz = g.shape[0]
        a = x.reshape(bsz, -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)  # [B, 1, Fin, T]
        gg = g.reshape(bsz, -1, g.shape[-1]).transpose(1, 2).unsqueeze(1)  # [B, 1, Fout, T]
        return (gx, None, None) + tape.results(a, gg, kw, kb) + (None,)


class _Affine(torch.autograd.Function):
    """``xhat * w + b`` with ``w``/``b`` over axis ``axis`` of ``xhat`` (a normalisation's affine
    part); per-sample results sum over every other non-batch axis."""

    @staticmethod
    def forward(ctx, xhat, w, b, ghost_w, ghost_b, tape, axis):
        ctx.save_for_backward(xhat, w)
        ctx.conf = (tape, None if w is None else id(w), None if b is None else id(b), axis)
        shape = [1] * xhat.dim()
        shape[axis] = -1
        y = xhat * w.reshape(shape) if w is not None else xhat.clone()
        return y + b.reshape(shape) if b is not None else y

    @staticmethod
    def backward(ctx, g):
        xhat, w = ctx.saved_tensors
        tape, kw, kb, axis = ctx.conf
        axis = axis % g.dim()
        shape = [1] * g.dim()
        shape[axis] = -1
        gx = (g * w.reshape(shape) if w is not None else g) if ctx.needs_input_grad[0] else None
        dims = [d for d in range(1, g.dim()) if d != axis]
        return (gx, None, None) + tape.reduced((g * xhat) if w is not None else None, kw, g, kb, dims) + (None, None)


class _Expand(torch.autograd.Function):
    """A bare parameter given a real batch axis ``[B, ...]`` (it was broadcast over the batch):
    the gradient of the expanded tensor is the per-sample gradient."""

    @staticmethod
    def forward(ctx, t, ghost, tape, shape, key):
        ctx.conf = (tape, key)
        return t.expand(shape).clone()

    @staticmethod
    def backward(ctx, g):
        tape, key = ctx.conf
        return (None,) + tape.reduced(g, key, None, None, []) + (None, None, None)


# --------------------------------------------------------------------------- the tape


def empty_like_batched(params: dict, batch: int) -> dict:
    """A params-shaped tree of ``[batch, *shape]`` leaves, views of one flat buffer per dtype and
    device (:func:`vafunc.serving.memory.reusable_empty`: the previous call's buffer once its result
    was dropped, else a fresh one with huge pages where Linux grants them): where per-sample
    gradients go."""
    leaves = vtree.tree_leaves(params)
    groups: dict = {}
    for t in leaves:
        groups.setdefault((t.dtype, t.device), []).append(t)
    views = {}
    for (dtype, device), ts in groups.items():
        buf = reusable_empty(batch * sum(t.numel() for t in ts), dtype, device)
        off = 0
        for t in ts:
            n = batch * t.numel()
            views[id(t)] = buf[off : off + n].view(batch, *t.shape)
            off += n
    return vtree.tree_map(lambda t: views[id(t)], params)


class Tape:
    """Per-sample bookkeeping for one forward/backward over a batch of ``batch`` samples (see the
    module docstring). ``mode``: ``"grads"`` or ``"norms"``; ``out``: for ``"grads"``, a map from
    ``id(parameter)`` to the ``[batch, *shape]`` tensor its per-sample gradient is written into."""

    def __init__(
        self, params: dict, batch: int, mode: Literal["grads", "norms"] = "grads", out: dict | None = None
    ) -> None:
        if mode not in ("grads", "norms"):
            raise ValueError(f"mode must be 'grads' or 'norms', got {mode!r}")
        self.mode = mode
        self.batch = int(batch)
        self.leaves = {id(t): t for t in vtree.tree_leaves(params)}
        self.ghosts: dict[int, torch.Tensor] = {}
        self.uses: dict[int, int] = {}
        self.out = out or {}
        self.norm = None
        if mode == "norms":
            t = next(iter(self.leaves.values()))
            self.norm = torch.zeros(self.batch, dtype=t.dtype, device=t.device, requires_grad=True)

    # the ghost of one parameter: its gradient is the per-sample result
    def _ghost(self, t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        k = id(t)
        if k not in self.leaves:
            raise KeyError(k)
        self.uses[k] = self.uses.get(k, 0) + 1
        if self.mode == "norms":
            return self.norm
        if k not in self.ghosts:
            base = torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
            self.ghosts[k] = base.expand(self.batch, *t.shape)
        return self.ghosts[k]

    def _dest(self, key: int) -> Tensor | None:
        """Where the per-sample gradient of parameter ``key`` is written: its ``out`` tensor if it
        is used once (a second use would overwrite the first before autograd adds them)."""
        return self.out.get(key) if self.uses.get(key) == 1 else None

    def unfold(self, x: Tensor, kernel, stride, padding, dilation) -> Tensor:
        """The unfolded input of a conv for :meth:`results` (a subclass whose samples repeat may
        unfold only the distinct ones)."""
        return _conv_cols(x, kernel, stride, padding, dilation)

    def results(self, a: Tensor, g: Tensor, kw: int, kb: int | None) -> tuple[Tensor, Tensor | None]:
        """Ghost gradients ``(weight, bias)`` of a conv/linear from ``a [B, G, D, T]`` and ``g
        [B, G, O, T]``."""
        bsz = g.shape[0]
        if self.mode == "norms":
            n = _sq_norm(a, g)
            return (n + g.sum(3).reshape(bsz, -1).square().sum(1) if kb is not None else n), None
        w = self.leaves[kw]
        gw = _weight_grad(a, g, self._dest(kw)).view(bsz, *w.shape)
        gb = None
        if kb is not None:
            dest = self._dest(kb)
            gb = torch.sum(g, 3, out=None if dest is None else dest.view(bsz, *g.shape[1:3])).view(bsz, -1)
        return gw, gb

    def reduced(
        self, gw: Tensor | None, kw: int | None, gb: Tensor | None, kb: int | None, dims: list[int]
    ) -> tuple[Tensor | None, ...]:
        """Ghost gradients of parameters whose per-sample gradient is ``gw`` (``gb``) summed over
        ``dims`` (normalisation affine parameters, bare parameters)."""
        res = []
        for t, k in ((gw, kw), (gb, kb)):
            if t is None or k is None:
                res.append(None)
                continue
            if self.mode == "norms":
                r = t.sum(dims) if dims else t
                res.append(r.reshape(r.shape[0], -1).square().sum(1))
                continue
            dest = self._dest(k)
            shape = self.leaves[k].shape
            if dims:
                r = torch.sum(t, dims, out=None if dest is None else dest.view(t.shape[0], -1))
            else:
                r = t if dest is None else dest.view(t.shape).copy_(t)
            res.append(r.reshape(t.shape[0], *shape))
        if self.mode == "norms":
            parts = [r for r in res if r is not None]
            return (sum(parts) if parts else None), None
        return tuple(res)

    # ------------------------------------------------------------------ layers (called by the kit)
    def conv(
        self,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] | str,
        dilation: int | tuple[int, int],
        groups: int,
    ) -> Tensor:
        stride, dilation = pair(stride), pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:  # "same" at stride 1: pad explicitly (possibly asymmetric), as torch does
                tot = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
                x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
                padding = 0
        padding = pair(padding)
        return _Conv.apply(x, w, b, self._ghost(w), self._ghost(b), self, stride, padding, dilation, groups)

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return _Linear.apply(x, w, b, self._ghost(w), self._ghost(b), self)

    def expand(self, t: Tensor, ndim: int) -> Tensor:
        """Bare parameter ``t`` as a batched ``[B, ...]`` tensor of ``ndim`` axes that broadcasts
        where ``t`` did: with ``t.dim() == ndim`` its leading axis (of size 1) becomes the batch
        axis, else the batch axis and size-1 axes are put in front."""
        if t.dim() == ndim:
            if t.shape[0] != 1:
                raise ValueError(f"a batch-broadcast parameter needs a leading axis of 1, got {list(t.shape)}")
            view, shape = t, (self.batch, *t.shape[1:])
        else:
            view = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
            shape = (self.batch, *view.shape[1:])
        return _Expand.apply(view, self._ghost(t), self, shape, id(t))

    def affine(self, xhat: Tensor, w: Tensor | None, b: Tensor | None, axis: int = 1) -> Tensor:
        if w is None and b is None:
            return xhat
        return _Affine.apply(xhat, w, b, self._ghost(w), self._ghost(b), self, axis)

    # ------------------------------------------------------------------ results
    def covered(self, unused: frozenset[int] = frozenset()) -> bool:
        """Whether the forward reached every parameter (but the ``unused`` positions of the
        leaves, which the output does not depend on) through a taped layer, and, for norms, each
        exactly once (squared norms of a shared parameter's parts do not add up)."""
        ids = [k for i, k in enumerate(self.leaves) if i not in unused]
        if any(k not in self.uses for k in ids):
            return False
        return self.mode == "grads" or max(self.uses.values(), default=0) <= 1


def _per_sample_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, y: Tensor) -> Tensor:
    """``[loss_fn(logits[i:i+1], y[i:i+1]) for i]`` as one ``[B]`` tensor."""
    if isinstance(logits, dict):  # a segmentation model's {"out", "aux"}
        return torch.vmap(lambda o, t: loss_fn({k: v[None] for k, v in o.items()}, t[None]))(logits, y)
    return torch.vmap(lambda o, t: loss_fn(o[None], t[None]))(logits, y)


def _check(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected an image batch x [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"expected targets y [B, ...] with B = {x.shape[0]}, got {getattr(y, 'shape', y)}")


def _chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None:
        return [(0, n)]
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return [(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]


def _taped(
    model: ModelDef,
    params: dict,
    state: dict,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    mode: Literal["grads", "norms"],
    unused: frozenset[int],
    out: dict | None = None,
    train: bool = False,
    rng: Tensor | None = None,
) -> Tensor | None:
    """One taped forward/backward: per-sample squared norms ``[B]``, or (``"grads"``) the
    per-sample gradients written into ``out`` (``{id(param): [B, *shape]}``)."""
    tape = Tape(params, x.shape[0], mode, out)
    with torch.enable_grad():
        logits, _ = model.apply(params, state, x, train=train, rng=rng, backend=Taped(tape))
        if not tape.covered(unused):
            raise RuntimeError(f"{model.name}: the per-sample tape does not cover every parameter")
        total = _per_sample_losses(loss_fn, logits, y).sum()
        if mode == "norms":
            (n,) = torch.autograd.grad(total, [tape.norm])
            return n
        keys = list(tape.ghosts)
        grads = torch.autograd.grad(total, [tape.ghosts[k] for k in keys])
    for k, g in zip(keys, grads):
        if g.data_ptr() != out[k].data_ptr():  # shared parameters: autograd's sum
            out[k].copy_(g)
    for i, (k, t) in enumerate(tape.leaves.items()):
        if k not in tape.ghosts:
            out[k].zero_()


_COVER: dict = {}


def _probe(model: ModelDef) -> tuple[bool, bool, frozenset[int]]:
    """``(covers grads, covers norms, unused leaf positions)``, from one taped forward on the
    meta device; parameters not reached by a taped layer are unused if no gradient reaches them
    (GoogLeNet's auxiliary heads in eval mode)."""
    key = (model.name, model.config)
    if key not in _COVER:
        params, state = model.init(0, device="meta")
        params = vtree.tree_map(lambda t: t.requires_grad_() if t.is_floating_point() else t, params)
        leaves = vtree.tree_leaves(params)
        mult = model.size_multiple
        size = -(-max(model.min_size, 32) // mult) * mult
        tape = Tape(params, 2, "grads")
        try:
            out, _ = model.apply(
                params,
                state,
                torch.zeros(2, model.in_channels, size, size, device="meta"),
                train=False,
                backend=Taped(tape),
            )
            rest = [i for i, t in enumerate(leaves) if id(t) not in tape.uses]
            grads = torch.autograd.grad(out.sum(), [leaves[i] for i in rest], allow_unused=True) if rest else []
            unused = frozenset(i for i, g in zip(rest, grads) if g is None)
        except (RuntimeError, NotImplementedError):
            _COVER[key] = (False, False, frozenset())
            return _COVER[key]
        grads_ok = tape.covered(unused)
        tape.mode = "norms"
        _COVER[key] = (grads_ok, grads_ok and tape.covered(unused), unused)
    return _COVER[key]


def tape_covers(model: ModelDef, mode: Literal["grads", "norms"] = "grads") -> bool:
    """Whether every parameter of ``model`` is reached through a taped layer, i.e. whether
    :func:`per_sample_grads` (``mode="grads"``) or :func:`per_sample_grad_norms` (``"norms"``)
    take the batched path for it (probed once per model on the meta device)."""
    return _probe(model)[0 if mode == "grads" else 1]


def per_sample_grads(
    model: ModelDef,
    params: dict,
    state: dict,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int | None = None,
    method: Literal["auto", "tape", "vmap"] = "auto",
    out: dict | None = None,
) -> dict:
    """Gradient of ``loss_fn(logits [1, K], y [1])`` for every sample separately, BatchNorm in eval
    mode: a params-shaped tree whose leaves have a leading batch axis ``[B, ...]``.

    ``method="auto"``: the taped batched backward (module docstring) where it covers the model
    (:func:`tape_covers`), else ``"vmap"``: ``torch.vmap(torch.func.grad(...))`` over the samples.
    ``chunk_size`` bounds memory: the batch is processed ``chunk_size`` samples at a time.
    ``out``: a tree returned by an earlier call with the same shapes, overwritten with the new
    gradients (the taped path writes into it directly: a fresh result of a ResNet-18 at batch 32
    is 1.4 GB, and touching fresh memory can cost as much as computing it). Without ``out`` the
    taped path writes into :func:`vafunc.serving.memory.reusable_empty`: a loop that drops each
    result before the next call reuses the same resident memory.
    """
    _check(x, y)
    if method not in ("auto", "tape", "vmap"):
        raise ValueError(f"method must be 'auto', 'tape' or 'vmap', got {method!r}")
    b = x.shape[0]
    if out is not None:
        _check_out(out, params, b)
    if method != "vmap" and tape_covers(model):
        unused = _probe(model)[2]
        result = empty_like_batched(params, b) if out is None else out
        flat = {id(t): r for t, r in zip(vtree.tree_leaves(params), vtree.tree_leaves(result))}
        for i, j in _chunks(b, chunk_size):
            _taped(model, params, state, x[i:j], y[i:j], loss_fn, "grads", unused, {k: v[i:j] for k, v in flat.items()})
        return result
    if method == "tape":
        raise ValueError(f"{model.name}: some parameters are not reached through taped layers; use method='vmap'")

    def loss_one(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        logits, _ = model.apply(p, state, xi[None], train=False)
        return loss_fn(logits, yi[None])

    g = torch.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    if out is None:
        return g
    for o, t in zip(vtree.tree_leaves(out), vtree.tree_leaves(g)):
        o.copy_(t)
    return out


def _check_out(out: dict, params: dict, b: int) -> None:
    ps, os_ = vtree.flatten(params), vtree.flatten(out) if isinstance(out, dict) else None
    if os_ is None or list(os_) != list(ps):
        raise ValueError("out must be a tree returned by per_sample_grads for the same parameters")
    for k, t in ps.items():
        o = os_[k]
        if tuple(o.shape) != (b, *t.shape) or o.dtype != t.dtype or o.device != t.device:
            raise ValueError(
                f"out[{k!r}] must be {[b, *t.shape]} {t.dtype} on {t.device}, "
                f"got {list(o.shape)} {o.dtype} on {o.device}"
            )


def per_sample_grad_norms(
    model: ModelDef,
    params: dict,
    state: dict,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int | None = None,
    train: bool = False,
    rng: Tensor | None = None,
) -> Tensor:
    """``[B]``: the L2 norm, over all parameters, of each sample's gradient of ``loss_fn(logits
    [1, K], y [1])``, without storing per-sample gradients where the tape covers the model (mixed
    ghost norms, module docstring); else the norms of :func:`per_sample_grads`. BatchNorm in eval
    mode; ``train=True`` (with ``rng`` for dropout / stochastic depth) is for models without
    BatchNorm (DP-SGD). ``chunk_size`` bounds memory as there."""
    _check(x, y)
    if tape_covers(model, "norms"):
        unused = _probe(model)[2]
        parts = [
            _taped(model, params, state, x[i:j], y[i:j], loss_fn, "norms", unused, train=train, rng=rng)
            for i, j in _chunks(len(x), chunk_size)
        ]
        return torch.cat(parts).sqrt()
    if train:
        raise ValueError(f"{model.name}: train-mode per-sample norms need the taped path, which does not cover it")
    g = per_sample_grads(model, params, state, x, y, loss_fn, chunk_size=chunk_size)
    return torch.stack([t.reshape(t.shape[0], -1).square().sum(1) for t in vtree.tree_leaves(g)]).sum(0).sqrt()
