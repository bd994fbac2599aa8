"""Properties every registered model must have (hypothesis; small inputs so the suite stays fast).
One representative per family by default (oracle.representatives), every model with ``-m slow``:

- output shape for random batch sizes and image sizes at or above the model's minimum;
- torch.vmap over a stacked ensemble equals a Python loop over the members, eval and train
  (each member its own BatchNorm statistics and dropout keys);
- torch.func.grad, vjp and jvp through apply agree (jvp = <grad, tangent>), and Hessian-vector
  products (forward-over-reverse) are symmetric: <u, H v> = <v, H u>;
- torch.compile(fullgraph=True) equals eager (a representative subset here; every model with -m slow).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import classes_config, fit, heavy_params, logits_shape, main_logits
from torch.func import grad, jvp, vjp

import vafunc

ALL = vafunc.list_models()
#: One model per family in the default suite's compile check; `pytest -m slow` compiles them all.
COMPILE_DEFAULT = ["resnet18"]

# Comparisons of two computation paths in train mode run in float64: at small sizes the last
# BatchNorms see a handful of values per channel, and in float32 rounding alone moves train-mode
# logits by up to 20% for some networks (measured on densenet201, inception_v2).
F64 = torch.float64
#: families whose float32 eval logits at init are already ~1e-5 (relative) from float64's, so that two
#: correct float32 lowerings differ by more than the eval tolerance: their eval ensembles run in float64
#: too (resattnet56: the loop alone is 9e-6 from float64; its activations grow through 56 pre-activation
#: units and (1 + mask) * trunk, and the logits cancel)
F64_EVAL = {"resattnet"}


#: families whose smallest input is this large or larger (MaxViT, CoAtNet: 224) run the property
#: battery under -m slow only: float64 ensembles and Hessian-vector products at 224 take minutes
PROPERTY_MAX_MIN_SIZE = 128


def _slow_if(params, big):
    out = []
    for p in params:
        (name,) = p.values
        out.append(pytest.param(name, marks=[*p.marks, *([pytest.mark.slow] if big(name) else [])], id=p.id))
    return out


def _large_input(name):
    return vafunc.get_model(name).min_size >= PROPERTY_MAX_MIN_SIZE


@pytest.fixture(scope="module", params=_slow_if(heavy_params(ALL, group=lambda n: f"properties-{n}"), _large_input))
def members(request):
    """The model (default config: dropout / stochastic depth on) and two members (float32)."""
    model = vafunc.get_model(request.param, **classes_config(request.param, 7))
    return model, [model.init(seed) for seed in range(2)]


def _size(model, extra: int = 0) -> int:
    return fit(model, max(model.min_size, 32) + extra)


def _allclose(a, b, rel=1e-5, floor=1e-6):
    scale = max(float(b.abs().max()), floor)
    return float((a - b).abs().max()) <= rel * scale


def _dot(a, b):
    return sum((u * v).sum() for u, v in zip(vafunc.tree.tree_leaves(a), vafunc.tree.tree_leaves(b)))


@given(data=st.data())
@settings(max_examples=3)
def test_output_shape(members, data):
    model, ms = members
    params, state = ms[0]
    lo = max(model.min_size, 32)
    b = data.draw(st.integers(1, 3), label="batch")
    h = fit(model, data.draw(st.integers(lo, lo + 24), label="height"))
    w = fit(model, data.draw(st.integers(lo, lo + 24), label="width"))
    x = torch.randn(b, 3, h, w)
    with torch.no_grad():
        logits, new_state = model.apply(params, state, x)
    logits = main_logits(logits)  # a segmentation model's dict: its "out"
    assert logits.shape == logits_shape(model, b, h, w, 7)
    assert torch.isfinite(logits).all()
    assert new_state is state


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ensemble_vmap_equals_loop(members, train):
    """vafunc.ensemble_apply lowered with torch.vmap equals the Python loop over the members, with
    per-member BatchNorm statistics and per-member dropout / stochastic-depth keys."""
    model, ms = members
    f64 = train or model.family.name in F64_EVAL

    def stack(trees):  # cast leaf by leaf: a giant's float32 stack and its float64 copy never coexist
        return vafunc.tree_map(
            lambda *ts: torch.stack(ts).to(F64 if f64 and ts[0].is_floating_point() else ts[0].dtype), *trees
        )

    # train: float64, and final maps of 2x2 or more (BN over a 1x1 map of 2 samples is sign(x1 - x2))
    params, state = stack([p for p, _ in ms]), stack([s for _, s in ms])
    if train:
        s, rel = fit(model, max(model.min_size, 64) + 3), 1e-6
    else:
        s, rel = _size(model, 3), 1e-5
    w = fit(model, s + 5)
    x = torch.randn(2, 3, s, w, dtype=F64 if f64 else torch.float32)
    rng = vafunc.random.key(3) if train else None
    with torch.no_grad():
        got, got_state = vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method="vmap")
        want, want_state = vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method="loop")
    got, want = main_logits(got), main_logits(want)
    assert got.shape == (2, *logits_shape(model, 2, s, w, 7))
    assert _allclose(got, want, rel), "vmapped ensemble logits differ from the loop"
    flat_got = vafunc.flatten(got_state)
    for k, v in vafunc.flatten(want_state).items():
        assert _allclose(flat_got[k].to(v.dtype), v, rel), f"state {k}"


def _eval_problem(model, ms):
    """The first member's parameters, an eval-mode loss of them on a fixed batch, and two random
    directions ``u``, ``v`` in parameter space (the derivative checks below share it)."""
    params, state = ms[0]
    s = _size(model)
    x = torch.randn(2, 3, s, s)
    gen = torch.Generator().manual_seed(3)
    u = vafunc.tree_map(lambda t: torch.randn(t.shape, generator=gen), params)
    v = vafunc.tree_map(lambda t: torch.randn(t.shape, generator=gen), params)

    def loss(p):
        return main_logits(model.apply(p, state, x)[0]).square().mean()

    return params, loss, u, v


def test_grad_vjp_jvp_agree(members):
    """Eval mode (well conditioned in float32): jvp = <grad, u>, vjp = grad."""
    params, loss, u, v = _eval_problem(*members)

    g = grad(loss)(params)
    assert all(torch.isfinite(t).all() for t in vafunc.tree.tree_leaves(g))
    _, directional = jvp(loss, (params,), (u,))
    assert torch.allclose(directional, _dot(g, u), rtol=1e-4, atol=1e-7)
    value, pullback = vjp(loss, params)
    (g_vjp,) = pullback(torch.ones_like(value))
    assert torch.allclose(_dot(g_vjp, v), _dot(g, v), rtol=1e-5, atol=1e-7)


#: Hessian-vector products cost a few copies of every parameter: representatives above this many
#: parameters (vgg11_bn, 133M, nearly all in its classifier) take the check under -m slow only
HVP_MAX_PARAMS = 100_000_000


def _hvp_params():
    return _slow_if(
        heavy_params(ALL, group=lambda n: f"properties-{n}"),
        lambda n: vafunc.get_entry(n).params > HVP_MAX_PARAMS or _large_input(n),
    )


@pytest.fixture(scope="module", params=_hvp_params())
def hvp_members(request):
    model = vafunc.get_model(request.param, **classes_config(request.param, 7))
    return model, [model.init(0)]


def test_hessian_vector_products_are_symmetric(hvp_members):
    """Eval mode, forward-over-reverse: <u, H v> = <v, H u>."""
    params, loss, u, v = _eval_problem(*hvp_members)

    hv = jvp(grad(loss), (params,), (v,))[1]
    hu = jvp(grad(loss), (params,), (u,))[1]
    a, b = _dot(u, hv), _dot(v, hu)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * (abs(float(a)) + 1)), (float(a), float(b))


def _check_compiled(name):
    """Compiled (fullgraph) equals eager: train mode in float64 with the default config, so
    dropout / stochastic-depth masks from the same key must agree too; eval mode in float32."""
    torch._dynamo.reset()
    model = vafunc.get_model(name, **classes_config(name, 7))
    s = _size(model, 1)
    key = vafunc.random.key(5)
    params, state = model.init(0, dtype=F64)
    x = torch.randn(4, 3, s, fit(model, s + 2), dtype=F64)  # non-square where the model allows it
    train_fn = torch.compile(lambda p, st_, x, k: model.apply(p, st_, x, train=True, rng=k), fullgraph=True)
    with torch.no_grad():
        got, got_state = train_fn(params, state, x, key)
        want, want_state = model.apply(params, state, x, train=True, rng=key)
        assert _allclose(got, want, 1e-6)
        for k, v in vafunc.flatten(want_state).items():
            assert _allclose(vafunc.flatten(got_state)[k].to(v.dtype), v, 1e-6), k
        params, state = model.init(0)
        x = x.float()
        ev = torch.compile(lambda p, st_, x: model.apply(p, st_, x)[0], fullgraph=True)
        assert _allclose(ev(params, state, x), model.apply(params, state, x)[0], 1e-4)


@pytest.mark.slow  # 45 s of inductor for resnet18 alone: the default suite's budget
@pytest.mark.parametrize("name", COMPILE_DEFAULT)
def test_compile_fullgraph_equals_eager(name):
    _check_compiled(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in COMPILE_DEFAULT])
def test_compile_fullgraph_equals_eager_all(name):
    _check_compiled(name)
