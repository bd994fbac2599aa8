"""The empirical neural tangent kernel of any model (public as ``vafunc.ntk``).

``ntk(model, params, state, x1, x2)[i, j, a, b] = <d f_a(x1_i) / d params, d f_b(x2_j) / d params>``,
BatchNorm in eval mode. The Jacobians are never stored. One backward pass over the samples of
both sides, each repeated once per output (the input of output ``a`` is the batch's copy ``a``:
eval mode makes the copies independent), goes through the per-sample tape
(:mod:`vafunc.research.persample`), and each layer contracts its per-sample, per-output
gradients into the kernel as the backward reaches it, then drops them: memory is one layer's
gradients for the items of one pass (chunked over samples) plus the activations, whatever the
parameter count. Per layer it picks the cheaper of two contractions, as the tape's norms do:
the explicit per-item gradient ``sum_t g_t a_t^T`` and its Gram matrix, or the ghost form
``sum_{t,s} (a_t . a'_s)(g_t . g'_s)`` over the output positions (a layer whose positions are
few: the last stages of a CNN at small inputs, the linear head); the input side ``a`` of the
ghost form is shared by the outputs and computed once per sample pair; a conv unfolds each
sample's input once, not once per output (:meth:`Tape.unfold`), and the explicit form is one
matrix product per sample over all its outputs.

A model whose parameters are not all reached exactly once through taped layers (class tokens,
shared weights: :func:`vafunc.research.persample.tape_covers` with ``"norms"``) falls back to
Jacobian contraction: ``torch.func.jacrev`` per sample chunk, contracted leaf by leaf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vafunc.core import tree as vtree
from vafunc.research.persample import Tape, tape_covers
from vafunc.research.taped import Taped

if TYPE_CHECKING:
    from vafunc.core.registry import ModelDef

__all__ = ["ntk"]

Mode = Literal["full", "trace", "diagonal"]
MODES = ("full", "trace", "diagonal")


class _KernelTape(Tape):
    """A tape whose layers add their share of the kernel block ``rows x cols`` instead of
    returning per-sample gradients (module docstring). Items are ``k * n + i``: output ``k``
    of sample ``i`` of the pass's ``n`` samples."""

    def __init__(self, params: dict, outputs: int, n: int, rows: slice, cols: slice, mode: str) -> None:
        super().__init__(params, outputs * n, "norms")
        self.k, self.n, self.rows, self.cols, self.kmode = outputs, n, rows, cols, mode
        r, c = rows.stop - rows.start, cols.stop - cols.start
        t = next(iter(self.leaves.values()))
        shape = {"full": (outputs, r, outputs, c), "trace": (outputs, r, c), "diagonal": (outputs, r, c)}[mode]
        self.acc = torch.zeros(shape, dtype=t.dtype, device=t.device)

    def _gram(self, u: Tensor, v: Tensor) -> None:
        """Add the kernel of per-item gradients ``u [K, r, P]``, ``v [K, c, P]``."""
        if self.kmode == "full":
            self.acc += (u.reshape(-1, u.shape[-1]) @ v.reshape(-1, v.shape[-1]).T).view(self.acc.shape)
        else:
            self.acc += torch.bmm(u, v.transpose(1, 2))

    def unfold(self, x: Tensor, kernel, stride, padding, dilation) -> Tensor:
        return super().unfold(x[: self.n], kernel, stride, padding, dilation)  # the K copies are equal

    def _split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.reshape(self.k, self.n, -1)
        return t[:, self.rows], t[:, self.cols]

    def results(self, a: Tensor, g: Tensor, kw: int, kb: int | None) -> tuple[None, None]:
        _, groups, d, t = a.shape
        o = g.shape[2]
        a0 = a[: self.n]  # the input side is the same for every output's copy (convs unfold only these)
        if t * t * (d + o) < d * o:  # ghost form
            ka = torch.einsum("igdt,jgds->gijts", a0[self.rows], a0[self.cols])  # [G, r, c, T, T]
            gk = g.reshape(self.k, self.n, groups, o, t)
            g1 = gk[:, self.rows].permute(2, 0, 1, 4, 3)  # [G, K, r, T, O]
            g2 = gk[:, self.cols].permute(2, 0, 1, 4, 3)  # [G, K, c, S, O]
            r, c = g1.shape[2], g2.shape[2]
            if self.kmode == "full":
                kg = torch.bmm(g1.reshape(groups, -1, o), g2.reshape(groups, -1, o).transpose(1, 2))
                kg = kg.view(groups, self.k, r, t, self.k, c, t)
                self.acc += torch.einsum("gaitbjs,gijts->aibj", kg, ka)
            else:
                kg = torch.einsum("gaito,gajso->gaijts", g1, g2)
                self.acc += torch.einsum("gaijts,gijts->aij", kg, ka)
        else:  # per-item gradients, one product per sample over its K outputs: [n*G, K*O, T] @ [n*G, T, D]
            gs = g.reshape(self.k, self.n, groups, o, t).permute(1, 2, 0, 3, 4).reshape(self.n * groups, -1, t)
            w = torch.bmm(gs, a0.reshape(self.n * groups, d, t).transpose(1, 2))
            self._gram(*self._split(w.view(self.n, groups, self.k, o * d).permute(2, 0, 1, 3)))
        if kb is not None:
            self._gram(*self._split(g.sum(3)))
        return None, None

    def reduced(self, gw, kw, gb, kb, dims) -> tuple[None, None]:
        for t in (gw, gb):
            if t is not None:
                self._gram(*self._split(t.sum(dims) if dims else t))
        return None, None


def _taped_block(model, params, state, xs: Tensor, rows: slice, cols: slice, outputs: int, mode: str) -> Tensor:
    tape = _KernelTape(params, outputs, len(xs), rows, cols, mode)
    rep = xs.repeat(outputs, *([1] * (xs.dim() - 1)))  # [K * n, ...]: copy k feeds output k
    with torch.enable_grad():
        logits, _ = model.apply(params, state, rep, train=False, backend=Taped(tape))
        total = logits.view(outputs, len(xs), outputs).diagonal(dim1=0, dim2=2).sum()
        torch.autograd.grad(total, [tape.norm], allow_unused=True)
    acc = tape.acc
    if mode == "full":
        return acc.permute(1, 3, 0, 2)  # [r, c, K, K]
    return acc.permute(1, 2, 0) if mode == "diagonal" else acc.sum(0)


def _jacobian(model, params, state, x: Tensor) -> list[Tensor]:
    """Per-leaf Jacobians ``[n, K, numel]`` of the logits of each sample (eval mode)."""

    def one(p, xi):
        return model.apply(p, state, xi[None], train=False)[0][0]

    jac = torch.vmap(torch.func.jacrev(one), in_dims=(None, 0))(params, x)
    return [t.reshape(t.shape[0], t.shape[1], -1) for t in vtree.tree_leaves(jac)]


def _jacobian_block(model, params, state, x1: Tensor, x2: Tensor, mode: str) -> Tensor:
    eq = {"full": "iap,jbp->ijab", "trace": "iap,jap->ij", "diagonal": "iap,jap->ija"}[mode]
    j2 = _jacobian(model, params, state, x2)
    return sum(torch.einsum(eq, a, b) for a, b in zip(_jacobian(model, params, state, x1), j2))


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _check_x(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating image batch [N, C, H, W], got {getattr(x, 'shape', type(x))}")


def ntk(
    model: ModelDef,
    params: dict,
    state: dict,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    mode: Mode = "full",
    chunk: int | None = None,
    memory: float = 2.0,
    method: Literal["auto", "tape", "jacobian"] = "auto",
) -> Tensor:
    """The empirical NTK between ``x1 [N1, ...]`` and ``x2 [N2, ...]`` (default ``x1``), eval mode.

    ``mode="full"``: ``[N1, N2, K, K]`` over every pair of outputs; ``"trace"``: ``[N1, N2]``,
    summed over the outputs; ``"diagonal"``: ``[N1, N2, K]``, each output with itself.
    ``chunk``: samples of each side per pass (default: from ``memory``, a budget in GiB for
    what one pass holds, estimated from the parameter count and the activations of one sample).
    ``method``: ``"tape"`` (the module docstring), ``"jacobian"`` (``jacrev`` per chunk, which
    stores one chunk's Jacobians of both sides), or ``"auto"`` (the tape where it covers the
    model).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in ("auto", "tape", "jacobian"):
        raise ValueError(f"method must be 'auto', 'tape' or 'jacobian', got {method!r}")
    same = x2 is None or x2 is x1
    x2 = x1 if x2 is None else x2
    _check_x(x1, "x1")
    _check_x(x2, "x2")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    taped = method != "jacobian" and tape_covers(model, "norms")
    if method == "tape" and not taped:
        raise ValueError(f"{model.name}: the tape does not reach every parameter exactly once; use method='jacobian'")
    with torch.no_grad():
        outputs = model.apply(params, state, x1[:1], train=False)[0]
    if outputs.dim() != 2:
        raise ValueError(f"ntk needs logits [N, K], got {list(outputs.shape)} for {model.name}")
    k = outputs.shape[1]
    if chunk is None:
        chunk = _auto_chunk(model, params, x1, k, memory, taped)
    tail = {"full": (k, k), "trace": (), "diagonal": (k,)}[mode]
    out = torch.empty(len(x1), len(x2), *tail, dtype=outputs.dtype, device=outputs.device)
    for r in _chunks(len(x1), chunk):
        for c in _chunks(len(x2), chunk):
            if same and c.start < r.start:  # the lower blocks mirror the upper ones
                block = out[c, r].transpose(0, 1)
                out[r, c] = block.transpose(2, 3) if mode == "full" else block
                continue
            if not taped:
                out[r, c] = _jacobian_block(model, params, state, x1[r], x2[c], mode)
            elif same and r == c:
                whole = slice(0, r.stop - r.start)
                out[r, c] = _taped_block(model, params, state, x1[r], whole, whole, k, mode)
            else:
                xs = torch.cat([x1[r], x2[c]])
                n1 = r.stop - r.start
                out[r, c] = _taped_block(model, params, state, xs, slice(0, n1), slice(n1, len(xs)), k, mode)
    return out


def _auto_chunk(model, params, x: Tensor, outputs: int, memory: float, taped: bool) -> int:
    """Samples per side so that a pass stays within ``memory`` GiB: per item, the activations
    autograd keeps (about 4 floats per element of the named intermediate outputs) and, for the
    tape, the largest layer's explicit per-item gradient; for the Jacobian path, the Jacobian."""
    leaves = vtree.tree_leaves(params)
    size = leaves[0].element_size()
    shapes = model.feature_shapes(max(x.shape[-2:]))
    act = 4 * sum(int(torch.Size(s[1:]).numel()) for s in shapes.values())
    per = act + (max(t.numel() for t in leaves) if taped else vtree.count_params(params))
    items = max(1, int(memory * 2**30 / (size * per)))
    return max(1, items // (2 * outputs))
