"""Properties every registered model must have (hypothesis; small inputs so the suite stays fast).

- output shape for random batch sizes and image sizes at or above the model's minimum;
- torch.vmap over a stacked ensemble equals a Python loop over the members, eval and train
  (each member its own BatchNorm statistics);
- torch.func.grad and torch.func.jvp through apply agree (jvp = <grad, tangent>);
- torch.compile(fullgraph=True) equals eager (a representative subset here; every model with -m slow).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jvp

import vafunc

ALL = vafunc.list_models()
#: One model per family in the default suite's compile check; `pytest -m slow` compiles them all.
COMPILE_DEFAULT = ["resnet18"]


@functools.lru_cache(maxsize=1)
def _model_and_members(name: str, n: int = 2):
    model = vafunc.get_model(name, num_classes=7, **dict(vafunc.get_entry(name).deterministic_train))
    members = [model.init(seed) for seed in range(n)]
    return model, members


def _size(model, extra: int = 0) -> int:
    return max(model.min_size, 32) + extra


def _allclose(a, b, rel=1e-5):
    scale = max(float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= rel * scale


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
@settings(max_examples=3)
def test_output_shape(name, data):
    model, members = _model_and_members(name)
    params, state = members[0]
    lo = max(model.min_size, 32)
    b = data.draw(st.integers(1, 3), label="batch")
    h = data.draw(st.integers(lo, lo + 24), label="height")
    w = data.draw(st.integers(lo, lo + 24), label="width")
    x = torch.randn(b, 3, h, w)
    with torch.no_grad():
        logits, new_state = model.apply(params, state, x)
    assert logits.shape == (b, 7)
    assert torch.isfinite(logits).all()
    assert new_state is state


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_vmap_ensemble_equals_loop(name, train):
    model, members = _model_and_members(name)
    params = vafunc.stack([p for p, _ in members])
    state = vafunc.stack([s for _, s in members])
    s = _size(model, 3)
    x = torch.randn(2, 3, s, s + 5)
    with torch.no_grad():
        out, new_state = torch.vmap(lambda p, st_: model.apply(p, st_, x, train=train))(params, state)
        for i, (p, st_) in enumerate(members):
            want, want_state = model.apply(p, st_, x, train=train)
            assert _allclose(out[i], want, 1e-4), f"member {i} logits differ"
            got_state = vafunc.flatten(vafunc.unstack(new_state)[i])
            for k, v in vafunc.flatten(want_state).items():
                assert _allclose(got_state[k].to(v.dtype), v, 1e-4), f"member {i} state {k}"


@pytest.mark.parametrize("name", ALL)
def test_grad_and_jvp_agree(name):
    model, members = _model_and_members(name)
    params, state = members[0]
    s = _size(model)
    x = torch.randn(2, 3, s, s)
    gen = torch.Generator().manual_seed(3)
    tangent = vafunc.tree_map(lambda t: torch.randn(t.shape, generator=gen), params)

    def loss(p):
        return model.apply(p, state, x, train=True)[0].square().mean()

    g = grad(loss)(params)
    _, directional = jvp(loss, (params,), (tangent,))
    dot = sum((a * b).sum() for a, b in zip(vafunc.tree.tree_leaves(g), vafunc.tree.tree_leaves(tangent)))
    assert all(torch.isfinite(t).all() for t in vafunc.tree.tree_leaves(g))
    assert torch.allclose(directional, dot, rtol=1e-3, atol=1e-6), (float(directional), float(dot))


def _check_compiled(name):
    torch._dynamo.reset()
    model, members = _model_and_members(name)
    params, state = members[0]
    s = _size(model, 1)
    x = torch.randn(2, 3, s, s + 2)
    key = vafunc.random.key(5)
    compiled = torch.compile(
        lambda p, st_, x, k: model.apply(p, st_, x, train=True, rng=k), fullgraph=True
    )
    with torch.no_grad():
        for train_fn in (compiled,):
            got, got_state = train_fn(params, state, x, key)
            want, want_state = model.apply(params, state, x, train=True, rng=key)
            assert _allclose(got, want, 1e-4)
            for k, v in vafunc.flatten(want_state).items():
                assert _allclose(vafunc.flatten(got_state)[k].to(v.dtype), v, 1e-4), k
        ev = torch.compile(lambda p, st_, x: model.apply(p, st_, x)[0], fullgraph=True)
        assert _allclose(ev(params, state, x), model.apply(params, state, x)[0], 1e-4)


@pytest.mark.parametrize("name", COMPILE_DEFAULT)
def test_compile_fullgraph_equals_eager(name):
    _check_compiled(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in COMPILE_DEFAULT])
def test_compile_fullgraph_equals_eager_all(name):
    _check_compiled(name)
