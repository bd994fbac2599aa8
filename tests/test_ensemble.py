"""Ensembles, per-sample gradients and features through the research transforms."""

import pytest
import torch

import vafunc
from vafunc.core import random as vr


@pytest.fixture(scope="module")
def r18_ensemble():
    model = vafunc.get_model("resnet18", num_classes=5)
    return model, *vafunc.ensemble_init(model, 3, key=0)


def test_ensemble_init_members_are_independent(r18_ensemble):
    model, params, state = r18_ensemble
    w = params["conv1"]["weight"]
    assert w.shape == (3, 64, 3, 7, 7)
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert state["bn1"]["running_var"].shape == (3, 64)
    with pytest.raises(ValueError, match="positive int"):
        vafunc.ensemble_init(model, 0)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_per_member_inputs(r18_ensemble, method):
    model, params, state = r18_ensemble
    x = torch.randn(3, 2, 3, 32, 40)
    logits, _ = vafunc.ensemble_apply(model, params, state, x, method=method)
    for i, (p, s) in enumerate(zip(vafunc.unstack(params), vafunc.unstack(state))):
        want, _ = model.apply(p, s, x[i])
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)


def test_ensemble_input_errors(r18_ensemble):
    model, params, state = r18_ensemble
    with pytest.raises(ValueError, match=r"\[N, B, C, H, W\]"):
        vafunc.ensemble_apply(model, params, state, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="must have 3 on axis 0"):
        vafunc.ensemble_apply(model, params, state, torch.randn(2, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="3 member keys"):
        vafunc.ensemble_apply(model, params, state, torch.randn(1, 3, 32, 32), rng=vr.split(vr.key(0), 2))
    with pytest.raises(ValueError, match="'loop' or 'vmap'"):
        vafunc.ensemble_apply(model, params, state, torch.randn(1, 3, 32, 32), method="fold")
    with pytest.raises(ValueError, match="not a stacked ensemble"):
        p, s = model.init(0)
        vafunc.ensemble_apply(model, p, s, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["efficientnet_b0", pytest.param("alexnet", marks=pytest.mark.slow)])  # alexnet: 10 s
def test_members_draw_their_own_dropout_masks(name):
    """Each member gets its own key: with identical weights, train-mode outputs differ only
    through the masks, so members must differ; the same key gives the same output again (float64:
    vmap's convolutions sum in another order than the loop's, which train-mode BatchNorm amplifies)."""
    model = vafunc.get_model(name, num_classes=4)
    p, s = model.init(0, dtype=torch.float64)
    params, state = vafunc.stack([p, p, p]), vafunc.stack([s, s, s])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out, _ = vafunc.ensemble_apply(model, params, state, x, train=True, rng=vr.key(1), method="vmap")
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    again, _ = vafunc.ensemble_apply(model, params, state, x, train=True, rng=vr.key(1), method="loop")
    torch.testing.assert_close(out, again, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs randomness"):
        vafunc.ensemble_apply(model, params, state, x, train=True)


@pytest.mark.slow
def test_compiled_vmapped_ensemble_train_step():
    """The documented compiled combination: compile outside the vmap, train mode, with keys."""
    model = vafunc.get_model("resnet18", num_classes=5)
    params, state = vafunc.ensemble_init(model, 2, key=0)
    x = torch.randn(4, 3, 48, 48)
    f = lambda p, s, k: vafunc.ensemble_apply(model, p, s, x, train=True, rng=k, method="vmap")
    compiled = torch.compile(f, fullgraph=True)
    got, got_state = compiled(params, state, vr.key(2))
    want, want_state = f(params, state, vr.key(2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state["bn1"]["running_var"], want_state["bn1"]["running_var"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, method, per_member",
    [
        pytest.param("resnet18", "auto", False, marks=pytest.mark.slow),
        pytest.param("mobilenet_v3_small", "auto", True, marks=pytest.mark.slow),
        pytest.param("mobilenet_v3_small", "loop", True, marks=pytest.mark.slow),
    ],
)
def test_compiled_frozen_ensemble_equals_eager(name, method, per_member):
    """``auto`` takes members mode here (2 x 3 @64 is a small stacked batch); ``loop`` compiles
    the members as modules. Shared inputs, and (slow) one batch per member."""
    import torch_compat

    model = vafunc.get_model(name, num_classes=5)
    params, state = vafunc.ensemble_init(model, 2, key=1)
    f = torch_compat.compile_ensemble(model, params, state, method=method)
    x = torch.randn(3, 3, 64, 64)
    want, _ = vafunc.ensemble_apply(model, params, state, x, method="loop")
    torch.testing.assert_close(f(x), want, rtol=1e-4, atol=1e-4)
    assert f.method() == ("batched" if method == "auto" else "loop")
    if per_member:
        xs = torch.randn(2, 3, 3, 64, 64)
        want, _ = vafunc.ensemble_apply(model, params, state, xs, method="loop")
        torch.testing.assert_close(f(xs), want, rtol=1e-4, atol=1e-4)
