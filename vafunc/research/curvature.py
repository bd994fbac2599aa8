"""Curvature of a model's loss over its parameter pytree: Hessian, generalised Gauss-Newton and
Fisher products, and the Hessian's spectrum (public as ``vafunc.curvature``).

Every product is pytree-in, pytree-out (a params-shaped tree ``v`` gives a params-shaped tree),
exact, and works with BatchNorm in eval mode (running statistics) or in train mode (batch
statistics, ``train=True``; ``rng`` for dropout / stochastic depth). Over a list of batches the
curvatures of the batches are averaged with weights ``len(batch) / total``, which is the
curvature of the mean loss over all samples when ``loss`` is a mean (``F.cross_entropy``).

* Hessian ``H v``: reverse over reverse. The first backward (``create_graph=True``) is built once
  per batch and kept; each product is then one more backward through it. Forward over reverse
  (``torch.func.jvp`` of ``torch.func.grad``, ``method="forward"``) reruns the forward for every
  product and was slower on resnet18 (benchmarks/README.md, "Curvature").
* GGN ``J^T H_loss J v``: ``J v`` by forward mode (one forward with dual parameters and no
  backward graph, about a third of the cost of the double-vjp identity through a kept graph on
  resnet18), ``H_loss`` by a double backward of the loss alone at the logits, ``J^T`` by one
  backward through the batch's kept forward graph.
* True Fisher: the GGN with the categorical likelihood's Hessian ``(diag(p) - p p^T) / B`` at
  ``p = softmax(logits)``, its exact expectation over the predictive distribution (equal to the
  GGN of the mean cross-entropy). Empirical Fisher: ``(1/B) sum_i g_i g_i^T`` from per-sample
  gradients ``g_i`` of ``loss(logits[i:i+1], y[i:i+1])``, computed once per batch by the
  per-sample tape (:func:`vafunc.per_sample_grads`, eval mode).

:class:`CurvatureOperator` holds the batches and their graphs, so repeated products reuse the
forward; :meth:`CurvatureOperator.linear_operator` is a ``scipy.sparse.linalg.LinearOperator``
over the flattened parameters (scipy is imported only there). :func:`hessian_eigenvalues`
(Lanczos with full reorthogonalisation), :func:`hessian_trace` (Hutchinson with Rademacher probes
from a vafunc key) and :func:`hessian_density` (stochastic Lanczos quadrature) build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from vafunc.core import random as vrandom
from vafunc.core import tree as vtree
from vafunc.research.lanczos import lanczos
from vafunc.serving.memory import reusable_empty

if TYPE_CHECKING:
    from vafunc.core.registry import ModelDef

__all__ = [
    "CurvatureOperator",
    "hvp",
    "ggn_vp",
    "fisher_vp",
    "linear_operator",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_density",
    "Eigen",
    "Trace",
    "Spectrum",
]

Kind = Literal["hessian", "ggn", "fisher", "empirical_fisher"]
KINDS = ("hessian", "ggn", "fisher", "empirical_fisher")
Loss = Callable[[Tensor, Tensor], Tensor]


def _rebuild(params: dict, leaves: Sequence[Tensor]) -> dict:
    it = iter(leaves)
    return vtree.tree_map(lambda _: next(it), params)


def _batches(batches: Any) -> list[tuple[Tensor, Tensor]]:
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        batches = [batches]  # one (x, y) pair
    try:
        out = [tuple(b) for b in batches]
    except TypeError:
        raise TypeError(f"batches must be a list of (x, y) pairs, got {type(batches).__name__}") from None
    if not out or any(len(b) != 2 or not all(isinstance(t, Tensor) for t in b) for b in out):
        raise ValueError("batches must be a non-empty list of (x, y) tensor pairs")
    return out


class _Graph:
    """One batch's forward and what its products reuse (module docstring)."""

    def __init__(self, op: CurvatureOperator, x: Tensor, y: Tensor, rng: Tensor | None) -> None:
        self.kind = op.kind
        if op.kind == "empirical_fisher":
            from vafunc.research.persample import per_sample_grads

            g = per_sample_grads(op.model, op.params, op.state, x, y, op.loss)
            self.g = [t.reshape(t.shape[0], -1) for t in vtree.tree_leaves(g)]
            return
        if op.method == "forward":  # forward over reverse: nothing is kept
            self.fn = lambda p: op.loss(op.model.apply(p, op.state, x, train=op.train, rng=rng)[0], y)
            self.params = op.params
            return
        with torch.enable_grad():
            self.leaves = [t.detach().requires_grad_() for t in op.leaves]
            logits, _ = op.model.apply(_rebuild(op.params, self.leaves), op.state, x, train=op.train, rng=rng)
            if op.kind == "hessian":
                grads = torch.autograd.grad(op.loss(logits, y), self.leaves, create_graph=True, allow_unused=True)
                self.used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                self.grads = [grads[i] for i in self.used]
                return
            if logits.dim() != 2 and op.kind == "fisher":
                raise ValueError(f"the true Fisher needs logits [B, classes], got {list(logits.shape)}")
            self.f = logits  # kept for J^T; J v is a forward with dual parameters (_jvp)
            self.jvp_fn = lambda p: op.model.apply(p, op.state, x, train=op.train, rng=rng)[0]
            self.params, self.functorch = op.params, False
            self.used = list(range(len(self.leaves))) if logits.requires_grad else []
            self.fd = logits.detach().requires_grad_()
            if op.kind == "ggn":
                (self.gl,) = torch.autograd.grad(op.loss(self.fd, y), self.fd, create_graph=True)
            else:
                self.p = torch.softmax(self.fd.detach(), -1)

    def product(self, v: list[Tensor]) -> list[Tensor]:
        if self.kind == "empirical_fisher":
            c = sum(g @ t.reshape(-1) for g, t in zip(self.g, v))
            return [(c @ g).view_as(t) / len(c) for g, t in zip(self.g, v)]
        if hasattr(self, "fn"):
            vt = _rebuild(self.params, v)
            with torch.enable_grad():
                _, out = torch.func.jvp(torch.func.grad(self.fn), (self.params,), (vt,))
            return vtree.tree_leaves(out)
        if not self.used:
            return [torch.zeros_like(t) for t in v]
        if self.kind == "hessian":
            outs = torch.autograd.grad(
                self.grads, self.leaves, [v[i] for i in self.used], retain_graph=True, materialize_grads=True
            )
            return list(outs)
        jv = self._jvp(v)
        if self.kind == "ggn":
            (hjv,) = torch.autograd.grad(self.gl, self.fd, jv, retain_graph=True)
        else:
            pj = self.p * jv
            hjv = (pj - self.p * pj.sum(-1, keepdim=True)) / len(jv)
        return list(torch.autograd.grad(self.f, self.leaves, hjv, retain_graph=True, materialize_grads=True))

    def _jvp(self, v: list[Tensor]) -> Tensor:
        """``J v`` by forward mode: one forward with dual parameters (no backward graph), which
        costs about a forward and a half, against a double backward through the kept graph."""
        if not self.functorch:
            try:
                with torch.no_grad(), fwAD.dual_level():
                    duals = [fwAD.make_dual(t.detach(), u.to(t)) for t, u in zip(self.leaves, v)]
                    out = fwAD.unpack_dual(self.jvp_fn(_rebuild(self.params, duals))).tangent
                return torch.zeros_like(self.fd) if out is None else out
            except NotImplementedError:  # an op without a forward-mode formula: torch.func's rules
                self.functorch = True
        return torch.func.jvp(self.jvp_fn, (self.params,), (_rebuild(self.params, v),))[1]


class CurvatureOperator:
    """A curvature matrix of ``loss`` over ``batches`` as a linear map on parameter trees.

    ``kind``: ``"hessian"``, ``"ggn"``, ``"fisher"`` (true Fisher, categorical) or
    ``"empirical_fisher"`` (module docstring). ``train``: BatchNorm with batch statistics (the
    Fisher from per-sample gradients is eval-mode only); ``rng``: the key for dropout /
    stochastic depth, folded with the batch's index when there are several. ``keep_graphs``:
    keep every batch's graph between products (fast; memory grows with the number of batches);
    default: keep it when there is one batch, else rebuild it for each pass over the batches.
    ``method``: ``"reverse"`` (double backward through the kept graph, the default) or
    ``"forward"`` (forward over reverse; Hessian only). Call it on a tree, or use
    :meth:`matvec` on flat vectors; :attr:`products` counts the products so far (per batch).
    """

    def __init__(
        self,
        model: ModelDef,
        params: dict,
        state: dict,
        batches: Sequence[tuple[Tensor, Tensor]],
        loss: Loss,
        *,
        kind: Kind = "hessian",
        train: bool = False,
        rng: Tensor | None = None,
        keep_graphs: bool | None = None,
        method: Literal["reverse", "forward"] = "reverse",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if method not in ("reverse", "forward"):
            raise ValueError(f"method must be 'reverse' or 'forward', got {method!r}")
        if method == "forward" and kind != "hessian":
            raise ValueError(f"method='forward' is for the Hessian, got kind={kind!r}")
        if not isinstance(train, bool):
            raise TypeError(f"train must be a bool, got {type(train).__name__}")
        if kind == "empirical_fisher" and train:
            raise ValueError("the empirical Fisher comes from per-sample gradients, which need eval mode (train=False)")
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss(logits, y) -> scalar, got {type(loss).__name__}")
        self.model, self.params, self.state, self.loss = model, params, state, loss
        self.kind, self.train, self.rng, self.method = kind, train, rng, method
        self.batches = _batches(batches)
        self.leaves = vtree.tree_leaves(params)
        bad = [k for k, t in vtree.flatten(params).items() if not (isinstance(t, Tensor) and t.is_floating_point())]
        if bad:
            raise TypeError(f"params must be a tree of floating tensors; not floating: {bad[:5]}")
        self.shapes = [t.shape for t in self.leaves]
        self.sizes = [t.numel() for t in self.leaves]
        self.dim = sum(self.sizes)
        self.dtype, self.device = self.leaves[0].dtype, self.leaves[0].device
        total = sum(len(x) for x, _ in self.batches)
        self.weights = [len(x) / total for x, _ in self.batches]
        self.keep = len(self.batches) == 1 if keep_graphs is None else bool(keep_graphs)
        self._graphs: dict[int, _Graph] = {}
        self.products = 0

    def _graph(self, b: int) -> _Graph:
        if b in self._graphs:
            return self._graphs[b]
        x, y = self.batches[b]
        rng = self.rng if self.rng is None or len(self.batches) == 1 else vrandom.fold_in(self.rng, b)
        g = _Graph(self, x, y, rng)
        if self.keep:
            self._graphs[b] = g
        return g

    def _leaves_of(self, v: Tensor) -> list[Tensor]:
        return [t.view(s) for t, s in zip(v.split(self.sizes), self.shapes)]

    def apply_many(
        self, vs: Sequence[Tensor], progress: Callable[[int], None] | None = None, out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """``[M v for v in vs]`` on flat vectors ``[dim]``: one pass over the batches, each batch's
        graph built once for all of ``vs``; written into ``out`` (flat vectors, none of them one
        of ``vs``) when given."""
        vs = [self._leaves_of(v.to(self.dtype)) for v in vs]
        if out is None:
            out = [reusable_empty(self.dim, self.dtype, self.device) for _ in vs]  # resident pages if dropped
        elif len(out) != len(vs) or any(o.shape != (self.dim,) or o.dtype != self.dtype for o in out):
            raise ValueError(f"out must hold {len(vs)} flat {self.dtype} vectors of {self.dim} entries")
        self._products(vs, [self._leaves_of(o) for o in out], progress)  # into each one's slices of out
        return out

    def _products(
        self, vs: list[list[Tensor]], slots: list | None = None, progress: Callable[[int], None] | None = None
    ) -> list[list[Tensor]]:
        """``M v`` per parameter for each leaf list of ``vs``, one pass over the batches (each
        batch's graph serves every ``v``), weighted by the batches' sizes: written into ``slots``
        (a leaf list per ``v``) when given, else the products autograd hands back for the first
        batch (a copy where one passes its ``v`` through unchanged: later batches add to it)."""
        acc = list(slots) if slots is not None else [None] * len(vs)
        for b, w in enumerate(self.weights):
            graph = self._graph(b)
            for i, v in enumerate(vs):
                prods = graph.product(v)
                if acc[i] is None:
                    mine = {t.data_ptr() for t in v}
                    acc[i] = [t * w if w != 1.0 else t.clone() if t.data_ptr() in mine else t for t in prods]
                elif b == 0:
                    for slot, t in zip(acc[i], prods):
                        slot.copy_(t) if w == 1.0 else torch.mul(t, w, out=slot)
                else:
                    for slot, t in zip(acc[i], prods):
                        slot.add_(t, alpha=w)
                self.products += 1
                if progress is not None:
                    progress(1)
        return acc

    def matvec(self, v: Tensor) -> Tensor:
        """``M v`` for a flat vector ``v [dim]`` (the leaves of a params tree, concatenated)."""
        return self.apply_many([v])[0]

    def flatten(self, tree: dict) -> Tensor:
        """A params-shaped tree -> the flat vector ``[dim]`` the operator works on."""
        leaves = vtree.tree_leaves(tree)
        if [t.shape for t in leaves] != self.shapes:
            raise ValueError("expected a tree shaped like params (same leaves, same shapes)")
        return torch.cat([t.reshape(-1).to(self.dtype) for t in leaves])

    def unflatten(self, v: Tensor) -> dict:
        """A flat vector ``[dim]`` -> a params-shaped tree (views of ``v``)."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of {self.dim} entries, got {list(v.shape)}")
        return _rebuild(self.params, self._leaves_of(v))

    def __call__(self, v: dict) -> dict:
        """``M v`` for a params-shaped tree ``v``: the products stay per parameter (no flat copy;
        with one batch the leaves are the products autograd hands back)."""
        leaves = vtree.tree_leaves(v)
        if [t.shape for t in leaves] != self.shapes:
            raise ValueError("expected a tree shaped like params (same leaves, same shapes)")
        (acc,) = self._products([[t.to(self.dtype) for t in leaves]])
        return _rebuild(self.params, acc)

    def linear_operator(self):
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(dim, dim)`` over
        the flattened parameters (numpy in, numpy out, in the parameters' dtype; symmetric)."""
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError:
            raise ImportError("linear_operator needs scipy: pip install scipy") from None
        import numpy as np

        def mv(a):
            v = torch.as_tensor(np.asarray(a).reshape(-1)).to(device=self.device, dtype=self.dtype)
            return self.matvec(v).cpu().numpy()

        dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=dtype)


def _one(model, params, state, x, y, loss, v, kind, train, rng, method="reverse") -> dict:
    return CurvatureOperator(model, params, state, [(x, y)], loss, kind=kind, train=train, rng=rng, method=method)(v)


def hvp(
    model: ModelDef,
    params: dict,
    state: dict,
    x: Tensor,
    y: Tensor,
    loss: Loss,
    v: dict,
    *,
    train: bool = False,
    rng: Tensor | None = None,
    method: Literal["reverse", "forward"] = "reverse",
) -> dict:
    """The Hessian of ``loss(model.apply(params, state, x)[0], y)`` with respect to ``params``
    times the params-shaped tree ``v``; ``train=True``: BatchNorm with batch statistics. For
    several products of one batch use :class:`CurvatureOperator` (it keeps the graph)."""
    return _one(model, params, state, x, y, loss, v, "hessian", train, rng, method)


def ggn_vp(
    model: ModelDef,
    params: dict,
    state: dict,
    x: Tensor,
    y: Tensor,
    loss: Loss,
    v: dict,
    *,
    train: bool = False,
    rng: Tensor | None = None,
) -> dict:
    """The generalised Gauss-Newton matrix ``J^T H_loss J`` (``J``: the Jacobian of the logits with
    respect to ``params``, ``H_loss``: the Hessian of ``loss`` at the logits) times the tree ``v``."""
    return _one(model, params, state, x, y, loss, v, "ggn", train, rng)


def fisher_vp(
    model: ModelDef,
    params: dict,
    state: dict,
    x: Tensor,
    y: Tensor,
    v: dict,
    *,
    kind: Literal["true", "empirical"] = "true",
    loss: Loss | None = None,
    train: bool = False,
    rng: Tensor | None = None,
) -> dict:
    """The Fisher information times the tree ``v``, averaged over the batch. ``kind="true"``: under
    the model's categorical predictive distribution (softmax of the logits; ``y`` is not used);
    ``"empirical"``: ``(1/B) sum_i g_i g_i^T`` with ``g_i`` the gradient of ``loss`` (default
    ``F.cross_entropy``) on sample ``i`` alone, eval mode."""
    if kind not in ("true", "empirical"):
        raise ValueError(f"kind must be 'true' or 'empirical', got {kind!r}")
    loss = loss or torch.nn.functional.cross_entropy
    return _one(model, params, state, x, y, loss, v, "fisher" if kind == "true" else "empirical_fisher", train, rng)


def linear_operator(
    model: ModelDef,
    params: dict,
    state: dict,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss: Loss,
    *,
    kind: Kind = "hessian",
    train: bool = False,
    rng: Tensor | None = None,
    keep_graphs: bool | None = None,
):
    """A ``scipy.sparse.linalg.LinearOperator`` over the flattened parameters for the curvature
    ``kind`` of ``loss`` over ``batches`` (:class:`CurvatureOperator`; scipy needed)."""
    op = CurvatureOperator(
        model, params, state, batches, loss, kind=kind, train=train, rng=rng, keep_graphs=keep_graphs
    )
    return op.linear_operator()


# --------------------------------------------------------------------------- spectra


class Eigen(NamedTuple):
    """Eigenvalues (descending, float64) and, if asked for, eigenvectors as params-shaped trees;
    ``products``: Hessian-vector products used (per batch); ``converged``: residual bounds met."""

    values: Tensor
    vectors: list[dict] | None
    products: int
    converged: bool


class Trace(NamedTuple):
    """A Hutchinson estimate: ``value`` and its standard error, ``samples`` (``v^T H v`` per probe)."""

    value: float
    stderr: float
    samples: Tensor
    products: int


class Spectrum(NamedTuple):
    """Stochastic Lanczos quadrature: per probe, Ritz values ``nodes [probes, steps]`` and weights
    ``weights [probes, steps]`` (each row sums to 1)."""

    nodes: Tensor
    weights: Tensor

    def density(self, points: int = 1000, sigma: float | None = None) -> tuple[Tensor, Tensor]:
        """``(grid, density)``: the spectral density smoothed by Gaussians of width ``sigma``
        (default: 1% of the spread of the nodes), averaged over the probes; integrates to ~1."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        s = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-12 + 1e-6 * abs(hi))
        grid = torch.linspace(lo - 5 * s, hi + 5 * s, points, dtype=torch.float64)
        z = (grid[:, None, None] - self.nodes[None]) / s
        dens = (self.weights[None] * torch.exp(-0.5 * z**2)).sum(-1).mean(-1) / (s * math.sqrt(2 * math.pi))
        return grid, dens


def _progress(total: int, label: str, enabled: bool) -> Callable[[int], None] | None:
    if not enabled:
        return None
    from vafunc.core.progress import Progress

    bar = Progress(total, label=label, unit="products")
    every = max(1, total // 20) if not bar.tty else 1  # a log gets ~20 lines, a terminal every step
    state = {"n": 0}

    def step(n: int) -> None:  # step(total) at the end closes a bar whose loop stopped early
        if state["n"] >= total:
            return
        state["n"] = min(total, state["n"] + n)
        if state["n"] % every == 0 or state["n"] >= total:
            bar.update(state["n"] - bar.done)
        if state["n"] >= total:
            bar.close()

    return step


def _operator(model, params, state, batches, loss, train, rng, keep_graphs) -> CurvatureOperator:
    return CurvatureOperator(
        model, params, state, batches, loss, kind="hessian", train=train, rng=rng, keep_graphs=keep_graphs
    )


def hessian_eigenvalues(
    model: ModelDef,
    params: dict,
    state: dict,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss: Loss,
    *,
    k: int = 1,
    key: Tensor | int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    vectors: bool = False,
    train: bool = False,
    rng: Tensor | None = None,
    keep_graphs: bool | None = None,
    progress: bool = True,
) -> Eigen:
    """The ``k`` largest (algebraic) eigenvalues of the Hessian of ``loss`` over ``batches``, by
    Lanczos with full reorthogonalisation from a Rademacher start drawn from ``key``. Stops when each
    has a residual bound below ``tol`` relative (so the eigenvalue is within ``tol`` relative) or
    after ``max_iter`` products per batch; memory: ``max_iter + 1`` parameter vectors."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    op = _operator(model, params, state, batches, loss, train, rng, keep_graphs)
    v0 = _rademacher(vrandom.as_key(key), 0, op.dim, op.leaves[0])
    bar = _progress(max_iter * len(op.batches), "hessian_eigenvalues", progress)
    t, q, converged = lanczos(op, v0[None], max_iter, k=k, tol=tol, progress=bar)
    theta, s = torch.linalg.eigh(t[0])
    k = min(k, len(theta))
    values = theta[-k:].flip(0)
    vecs = None
    if vectors:
        ritz = s[:, -k:].flip(1).T.to(q) @ q[0]
        vecs = [op.unflatten(r.clone()) for r in ritz]
    if bar is not None:
        bar(max_iter * len(op.batches))  # close the bar when Lanczos stopped early
    return Eigen(values, vecs, op.products, converged)


def _rademacher(key: Tensor, i: int, dim: int, like: Tensor) -> Tensor:
    return (vrandom.bits(vrandom.fold_in(key, i), [dim]) & 1).to(like.dtype).mul_(2).sub_(1).to(like.device)


def hessian_trace(
    model: ModelDef,
    params: dict,
    state: dict,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss: Loss,
    *,
    key: Tensor | int = 0,
    probes: int = 64,
    vectors: Sequence[Tensor | dict] | None = None,
    train: bool = False,
    rng: Tensor | None = None,
    progress: bool = True,
) -> Trace:
    """Hutchinson's estimate of the Hessian's trace, ``mean_i v_i^T H v_i`` over ``probes``
    Rademacher vectors (``v_i`` from ``fold_in(key, i)``), or over the given ``vectors`` (flat
    ``[dim]`` tensors or params-shaped trees). Batches are the outer loop: each batch's graph is
    built once for all probes and only one probe is held at a time."""
    op = _operator(model, params, state, batches, loss, train, rng, False)
    k = vrandom.as_key(key)
    if vectors is not None:
        vecs = [op.flatten(v) if isinstance(v, dict) else v.reshape(-1).to(op.dtype) for v in vectors]
        if any(v.numel() != op.dim for v in vecs):
            raise ValueError(f"each probe vector must have {op.dim} entries (the parameters')")
        get, n = (lambda i: vecs[i]), len(vecs)
    else:
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        get, n = (lambda i: _rademacher(k, i, op.dim, op.leaves[0])), probes
    bar = _progress(n * len(op.batches), "hessian_trace", progress)
    samples = torch.zeros(n, dtype=torch.float64)
    for b, w in enumerate(op.weights):
        graph = op._graph(b)
        for i in range(n):
            v = get(i).to(op.device)
            hv = graph.product(op._leaves_of(v))
            samples[i] += w * float(
                sum((h.reshape(-1) * t).sum(dtype=torch.float64) for h, t in zip(hv, v.split(op.sizes)))
            )
            op.products += 1
            if bar is not None:
                bar(1)
    stderr = float(samples.std() / math.sqrt(n)) if n > 1 else float("nan")
    return Trace(float(samples.mean()), stderr, samples, op.products)


def hessian_density(
    model: ModelDef,
    params: dict,
    state: dict,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss: Loss,
    *,
    key: Tensor | int = 0,
    probes: int = 2,
    steps: int = 40,
    train: bool = False,
    rng: Tensor | None = None,
    keep_graphs: bool | None = None,
    progress: bool = True,
) -> Spectrum:
    """The Hessian's spectral density by stochastic Lanczos quadrature (Ubaru et al. 2017):
    ``steps`` Lanczos steps (full reorthogonalisation) from each of ``probes`` Rademacher vectors,
    run side by side (one pass over the batches per step). Memory: ``probes * (steps + 1)``
    parameter vectors. :meth:`Spectrum.density` smooths it onto a grid."""
    if not isinstance(probes, int) or probes < 1 or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"probes and steps must be positive ints, got {probes!r}, {steps!r}")
    op = _operator(model, params, state, batches, loss, train, rng, keep_graphs)
    k = vrandom.as_key(key)
    v0 = torch.stack([_rademacher(k, i, op.dim, op.leaves[0]) for i in range(probes)])
    bar = _progress(probes * steps * len(op.batches), "hessian_density", progress)
    t, _, _ = lanczos(op, v0, steps, progress=bar)
    theta, s = torch.linalg.eigh(t)
    if bar is not None:
        bar(probes * steps * len(op.batches))
    return Spectrum(theta, s[:, 0, :] ** 2)
