"""vafunc.curvature against explicit float64 matrices of a small BatchNorm CNN (``torch.func.hessian``
and ``jacrev``, column by column, eval and train mode), against ``jvp(grad)`` and double backward on
resnet18, and (``-m slow``) against curvlinops-for-pytorch and PyHessian on torchvision's resnet18
with the same weights."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch
from torch.nn.functional import cross_entropy

import vafunc
from vafunc import curvature
from vafunc.core import tree as vtree
from vafunc.core.kit import family
from vafunc.core.registry import ModelDef


@dataclass(frozen=True)
class TinyConfig:
    num_classes: int = 3


def _tiny_forward(m, cfg, x):
    x = m.conv_norm_act(x, 2, 3, conv="conv1", norm="bn1", act="relu", stride=2, padding=1)
    x = m.conv_norm_act(x, 2, 3, conv="conv2", norm="bn2", act="silu", padding=1)
    return m.head(x, cfg.num_classes)


TINY = ModelDef("tiny_bn_cnn", TinyConfig(), family("tiny_bn_cnn", TinyConfig, _tiny_forward, init_size=8))


def _problem(batch=5, seed=0, model=TINY, size=8, classes=3):
    params, state = model.init(seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    params = vafunc.tree_map(lambda t: t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    state = vafunc.tree_map(lambda t: t.abs() + 0.5 if t.is_floating_point() else t, state)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return params, state, x, y


def _flat_fn(params, fn):
    """``fn(tree)`` as a function of the flat parameter vector."""
    names = list(vafunc.flatten(params))
    shapes = [t.shape for t in vafunc.flatten(params).values()]
    sizes = [s.numel() for s in shapes]

    def f(flat):
        leaves = [t.view(s) for t, s in zip(flat.split(sizes), shapes)]
        return fn(vafunc.unflatten(dict(zip(names, leaves))))

    return f, torch.cat([t.reshape(-1) for t in vafunc.flatten(params).values()])


def _hessian_columns(f, p0):
    """The explicit Hessian, column by column: ``jvp(grad(f))`` at every basis vector (vmapped over
    the basis). ``torch.func.hessian`` itself (``jacfwd(jacrev)``, rows batched) is only used in eval
    mode: with BatchNorm in train mode, torch 2.14's batched Hessians (jacfwd/jacrev of jacrev/jacfwd)
    disagree with finite differences (checked in the test below), the column loop does not."""
    eye = torch.eye(p0.numel(), dtype=p0.dtype)
    return torch.func.vmap(lambda e: torch.func.jvp(torch.func.grad(f), (p0,), (e,))[1])(eye).T


def _explicit(params, state, x, y, train):
    """Hessian, GGN, true Fisher and empirical Fisher of the mean cross-entropy, as dense matrices."""
    f_loss, p0 = _flat_fn(params, lambda p: cross_entropy(TINY.apply(p, state, x, train=train)[0], y))
    f_logits, _ = _flat_fn(params, lambda p: TINY.apply(p, state, x, train=train)[0])
    h = _hessian_columns(f_loss, p0)
    logits = f_logits(p0)
    j = torch.func.jacfwd(f_logits)(p0).reshape(-1, p0.numel())  # [B*K, P], columns by forward mode
    hl = torch.func.hessian(lambda z: cross_entropy(z.view_as(logits), y))(logits.reshape(-1))
    ggn = j.T @ hl @ j
    p = torch.softmax(logits, -1)
    blocks = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p]) / len(p)
    fisher = j.T @ blocks @ j
    out = {"hessian": h, "ggn": ggn, "fisher": fisher, "f": f_loss, "p0": p0}
    if not train:
        per = []
        for i in range(len(x)):
            fi, _ = _flat_fn(params, lambda q, i=i: cross_entropy(TINY.apply(q, state, x[i : i + 1])[0], y[i : i + 1]))
            per.append(torch.func.grad(fi)(p0))
        g = torch.stack(per)
        out["empirical_fisher"] = g.T @ g / len(x)
    return out


def _columns(op):
    eye = torch.eye(op.dim, dtype=torch.float64)
    return torch.stack(op.apply_many(list(eye)), 1)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_products_equal_the_explicit_matrices_column_by_column(train):
    params, state, x, y = _problem()
    want = _explicit(params, state, x, y, train)
    kinds = ["hessian", "ggn", "fisher"] + ([] if train else ["empirical_fisher"])
    for kind in kinds:
        op = curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy, kind=kind, train=train)
        got = _columns(op)
        torch.testing.assert_close(got, want[kind], rtol=1e-9, atol=1e-11, msg=kind)
        assert op.products == op.dim  # one forward kept for all of them
    assert not torch.allclose(want["hessian"], want["ggn"])  # the two really differ here
    torch.testing.assert_close(want["ggn"], want["fisher"], rtol=1e-9, atol=1e-12)  # softmax + CE: GGN = Fisher
    f, p0 = want["f"], want["p0"]
    if not train:
        torch.testing.assert_close(torch.func.hessian(f)(p0), want["hessian"], rtol=1e-9, atol=1e-12)
    # central differences of the gradient, a third independent reference, on a few columns
    for i in (0, p0.numel() // 2, p0.numel() - 5):
        e = torch.zeros_like(p0)
        e[i] = 1e-5
        fd = (torch.func.grad(f)(p0 + e) - torch.func.grad(f)(p0 - e)) / 2e-5
        torch.testing.assert_close(fd, want["hessian"][:, i], rtol=1e-6, atol=1e-8)
    # forward over reverse gives the same products
    fwd = curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy, train=train, method="forward")
    v = torch.randn(p0.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(fwd.matvec(v), want["hessian"] @ v, rtol=1e-9, atol=1e-11)


def test_ggn_falls_back_to_torch_func_where_forward_mode_has_no_formula(monkeypatch):
    """``J v`` runs forward mode with dual parameters; an op without a forward-mode formula raises
    NotImplementedError there, and the operator then takes ``torch.func.jvp`` for good: the same
    products (the failure is simulated at the dual level, which every forward-mode ``J v`` enters)."""
    params, state, x, y = _problem()
    want = _explicit(params, state, x, y, False)
    calls = []

    class NoForwardFormula:
        def __enter__(self):
            calls.append(1)
            raise NotImplementedError("trying to use forward AD with an op that does not support it")

        def __exit__(self, *exc):
            return False

    shim = types.SimpleNamespace(**{**vars(curvature.fwAD), "dual_level": NoForwardFormula})
    monkeypatch.setattr(curvature, "fwAD", shim)  # vafunc's forward mode only: torch.func keeps its own
    for kind in ("ggn", "fisher"):
        op = curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy, kind=kind)
        torch.testing.assert_close(_columns(op), want[kind], rtol=1e-9, atol=1e-11, msg=kind)
    assert len(calls) == 2  # tried once per operator, then torch.func for every later product


def test_pytree_functions_and_scipy_operator():
    params, state, x, y = _problem()
    want = _explicit(params, state, x, y, False)
    g = torch.Generator().manual_seed(7)
    v = vafunc.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    op = curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy)
    vf = op.flatten(v)
    cases = {
        "hessian": curvature.hvp(TINY, params, state, x, y, cross_entropy, v),
        "ggn": curvature.ggn_vp(TINY, params, state, x, y, cross_entropy, v),
        "fisher": curvature.fisher_vp(TINY, params, state, x, y, v),
        "empirical_fisher": curvature.fisher_vp(TINY, params, state, x, y, v, kind="empirical"),
    }
    for kind, got in cases.items():
        assert list(vafunc.flatten(got)) == list(vafunc.flatten(params))
        torch.testing.assert_close(op.flatten(got), want[kind] @ vf, rtol=1e-9, atol=1e-11, msg=kind)
    lin = curvature.linear_operator(TINY, params, state, [(x, y)], cross_entropy, kind="ggn")
    assert lin.shape == (op.dim, op.dim)
    torch.testing.assert_close(torch.from_numpy(lin.matvec(vf.numpy())), want["ggn"] @ vf, rtol=1e-9, atol=1e-11)


def test_several_batches_average_by_size_and_spectra_equal_the_explicit_ones():
    params, state, x, y = _problem(batch=7)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    h = sum(len(b[0]) / 7 * _explicit(params, state, *b, False)["hessian"] for b in batches)
    op = curvature.CurvatureOperator(TINY, params, state, batches, cross_entropy)
    torch.testing.assert_close(_columns(op), h, rtol=1e-9, atol=1e-11)
    v = torch.randn(op.dim, dtype=h.dtype)  # on a tree: the per-parameter products, weighted and summed alike
    torch.testing.assert_close(op.flatten(op(op.unflatten(v))), h @ v, rtol=1e-9, atol=1e-11)
    exact = torch.linalg.eigvalsh(h)

    top = curvature.hessian_eigenvalues(TINY, params, state, batches, cross_entropy, k=3, tol=1e-10, vectors=True)
    assert top.converged and top.products < 2 * op.dim
    torch.testing.assert_close(top.values, exact[-3:].flip(0), rtol=1e-8, atol=1e-10)
    for lam, vec in zip(top.values, top.vectors):
        u = op.flatten(vec)
        torch.testing.assert_close(h @ u, lam * u, rtol=1e-6, atol=1e-8)

    # Hutchinson: the estimate is the mean of v^T H v over the key's Rademacher probes, exactly
    tr = curvature.hessian_trace(TINY, params, state, batches, cross_entropy, key=3, probes=200, progress=False)
    key = vafunc.random.as_key(3)
    probes = torch.stack([curvature._rademacher(key, i, op.dim, x) for i in range(200)])
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(tr.samples, torch.einsum("np,pq,nq->n", probes, h, probes), rtol=1e-9, atol=1e-10)
    assert abs(tr.value - float(h.trace())) < 5 * tr.stderr  # an unbiased estimate of the exact trace
    given = curvature.hessian_trace(TINY, params, state, batches, cross_entropy, vectors=list(probes[:3]))
    torch.testing.assert_close(given.samples, tr.samples[:3])

    # stochastic Lanczos quadrature: the moments of each probe's quadrature are v^T H^k v / v^T v
    spec = curvature.hessian_density(TINY, params, state, batches, cross_entropy, key=3, probes=2, steps=6)
    torch.testing.assert_close(spec.weights.sum(1), torch.ones(2, dtype=torch.float64))
    for i in range(2):
        v = probes[i]
        for k in (1, 2, 3):
            moment = v @ torch.linalg.matrix_power(h, k) @ v / (v @ v)
            torch.testing.assert_close((spec.weights[i] * spec.nodes[i] ** k).sum(), moment, rtol=1e-7, atol=1e-9)
    grid, dens = spec.density(points=2000)
    assert abs(float(torch.trapezoid(dens, grid)) - 1) < 1e-3


def test_resnet18_products_equal_jvp_of_grad_and_double_backward_in_both_modes():
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state, x, y = _problem(batch=4, model=model, size=32, classes=10)
    g = torch.Generator().manual_seed(3)
    v = vafunc.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    for train in (False, True):

        def loss(p, train=train):
            return cross_entropy(model.apply(p, state, x, train=train)[0], y)

        _, want = torch.func.jvp(torch.func.grad(loss), (params,), (v,))
        got = curvature.hvp(model, params, state, x, y, cross_entropy, v, train=train)
        leaves = [t.detach().requires_grad_() for t in vtree.tree_leaves(params)]
        it = iter(leaves)
        (gr,) = [torch.autograd.grad(loss(vafunc.tree_map(lambda _: next(it), params)), leaves, create_graph=True)]
        again = torch.autograd.grad(gr, leaves, vtree.tree_leaves(v))
        for a, b, c in zip(vtree.tree_leaves(got), vtree.tree_leaves(want), again):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)


def test_bad_input_is_a_clear_error():
    params, state, x, y = _problem()
    with pytest.raises(ValueError, match="kind must be one of"):
        curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy, kind="hess")
    with pytest.raises(ValueError, match="need eval mode"):
        curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy, kind="empirical_fisher", train=True)
    with pytest.raises(ValueError, match="list of \\(x, y\\)"):
        curvature.CurvatureOperator(TINY, params, state, [], cross_entropy)
    with pytest.raises(TypeError, match="loss must be a callable"):
        curvature.CurvatureOperator(TINY, params, state, [(x, y)], "ce")
    op = curvature.CurvatureOperator(TINY, params, state, [(x, y)], cross_entropy)
    with pytest.raises(ValueError, match="flat vector of"):
        op.unflatten(torch.zeros(3))
    with pytest.raises(ValueError, match="k must be a positive int"):
        curvature.hessian_eigenvalues(TINY, params, state, [(x, y)], cross_entropy, k=0)


# --------------------------------------------------------------------------- -m slow: the established tools


def _torchvision_resnet18(dtype, batch, seed=0):
    import torchvision

    torch.manual_seed(seed)
    module = torchvision.models.resnet18(num_classes=10).to(dtype).eval()
    for mod in module.modules():  # calibrated-looking statistics instead of the init's 0 / 1
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = vafunc.from_state_dict(model, module.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    return module, model, params, state, x, y


@pytest.mark.slow
def test_resnet18_products_equal_curvlinops():
    """curvlinops-for-pytorch's HessianLinearOperator and GGNLinearOperator on torchvision's module
    with the same weights and data, eval mode, float64."""
    curvlinops = pytest.importorskip("curvlinops")
    module, model, params, state, x, y = _torchvision_resnet18(torch.float64, 8)
    names = [n for n, _ in module.named_parameters()]
    assert names == list(vafunc.flatten(params))
    data = [(x, y)]
    plist = list(module.parameters())
    g = torch.Generator().manual_seed(5)
    v = torch.randn(sum(p.numel() for p in plist), generator=g, dtype=torch.float64)
    for kind, cls in (("hessian", curvlinops.HessianLinearOperator), ("ggn", curvlinops.GGNLinearOperator)):
        ref = cls(module, torch.nn.CrossEntropyLoss(), plist, data, check_deterministic=False)
        want = ref @ v
        op = curvature.CurvatureOperator(model, params, state, data, cross_entropy, kind=kind)
        torch.testing.assert_close(op.matvec(v), want, rtol=1e-8, atol=1e-10, msg=kind)


def _pyhessian_probes(params, seed, n):
    """PyHessian's trace probes: ``randint_like(p, high=2)`` per parameter, zeros set to -1, in
    its order, from the global generator seeded with ``seed``."""
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        v = [torch.randint_like(p, high=2) for p in params]
        for t in v:
            t[t == 0] = -1
        out.append(torch.cat([t.reshape(-1) for t in v]))
    return out


@pytest.mark.slow
def test_resnet18_top_eigenvalue_and_trace_agree_with_pyhessian():
    """PyHessian (float32, eval; ``cuda=False`` on a CPU): its power iteration's top eigenvalue
    within 1e-3 relative of Lanczos', and its Hutchinson samples equal ours on the same probes."""
    pyhessian = pytest.importorskip("pyhessian")
    module, model, params, state, x, y = _torchvision_resnet18(torch.float32, 16)
    ref = pyhessian.hessian(module, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    torch.manual_seed(0)
    (top_ref,), _ = ref.eigenvalues(maxIter=200, tol=1e-5)
    top = curvature.hessian_eigenvalues(model, params, state, [(x, y)], cross_entropy, k=1, tol=1e-4, progress=False)
    assert abs(float(top.values[0]) - top_ref) <= 1e-3 * abs(top_ref), (float(top.values[0]), top_ref)

    torch.manual_seed(11)
    samples = ref.trace(maxIter=6, tol=0.0)
    probes = _pyhessian_probes(list(module.parameters()), 11, len(samples))
    ours = curvature.hessian_trace(model, params, state, [(x, y)], cross_entropy, vectors=probes, progress=False)
    torch.testing.assert_close(ours.samples, torch.tensor(samples, dtype=torch.float64), rtol=2e-4, atol=0)
