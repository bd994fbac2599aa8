"""Members mode (``ensemble_apply(method="batched")``, :mod:`vafunc.research.members`): all members in one
forward pass. Every member's logits, new BatchNorm statistics, dropout / stochastic-depth masks and
gradients must equal the loop over members; families it does not cover fall back (``"auto"``) or
refuse (``"batched"``) with a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import logits_shape, main_logits, representatives

import vafunc
from vafunc.core import random as vr
from vafunc.core import tree as vtree
from vafunc.research.members import covers
from vafunc.training.train import make_train_step

REPS = representatives()
#: large inputs or large classifiers: the members battery runs on them under -m slow
HEAVY = {"vgg11_bn", "alexnet", "inception_v3", "xception", "inception_v2"}
HEAVY |= {"resattnet56"}  # 56 units in float64, 3 members, eval and train: ~3.5x resnet18's cost
HEAVY |= {"convnext_tiny"}  # (covered since layer scales became batch-broadcast parameters; default suite time)
#: not covered (bare parameters used directly: relative position tables, fused weights read by the family, the
#: U-Nets' up-convolutions); timm's ViTs are covered but EVA-02 tiny/small (their fused qkv weight is a bare
#: parameter), DeiT/DINOv2/SigLIP are checked in tests/test_vit_research.py
UNCOVERED = {"swin_t", "vit_b_32", "maxvit_t", "coatnet_0_224", "unet", "basic_unet"}
UNCOVERED |= {"eva02_tiny_patch14_224"}
F64 = torch.float64


def _params(names):
    return [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in HEAVY else []) for n in names]


def _size(model):
    m = model.size_multiple
    s = -(-max(model.min_size, 32) // m) * m
    return s, s + m * (-(-8 // m))  # non-square


def _ensemble(name, n=3, num_classes=6):
    """Members with running statistics away from their init values (so eval mode reads them)."""
    model = vafunc.get_model(name, num_classes=num_classes)
    params, state = vafunc.ensemble_init(model, n, key=0, dtype=F64)
    g = torch.Generator().manual_seed(5)

    def jitter(path, t):
        if path.endswith("running_mean"):
            return t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        if path.endswith("running_var"):
            return t * torch.empty(t.shape, dtype=t.dtype).uniform_(0.5, 1.5, generator=g)
        return t

    state = vtree.unflatten({k: jitter(k, v) for k, v in vtree.flatten(state).items()})
    return model, params, state


def _close(a, b, msg=""):
    """float64: different kernels sum in other orders (float32 would be off by ~1e-6)."""
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8 * max(1.0, float(b.abs().max())), msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("name", _params(sorted(set(REPS.values()) - UNCOVERED)))
def test_members_mode_equals_the_loop(name):
    """Eval and train mode (keyed dropout and stochastic depth, per-member batch statistics) on a
    shared batch, and eval on one batch per member, in float64."""
    model, params, state = _ensemble(name)
    assert covers(model)
    h, w = _size(model)
    x = torch.randn(4, 3, h, w, dtype=F64)  # 4: BatchNorm over 2 samples of a 1x1 map is ill-conditioned
    for train in (False, True):
        rng = vr.key(7) if train else None
        want, want_state = vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method="loop")
        got, got_state = vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method="batched")
        got, want = main_logits(got), main_logits(want)  # a segmentation model's dict: its "out"
        assert got.shape == want.shape == (3, *logits_shape(model, 4, h, w, 6))
        _close(got, want, f"{name} train={train}")
        want_flat = vtree.flatten(want_state)
        for k, v in vtree.flatten(got_state).items():
            _close(v.to(want_flat[k].dtype), want_flat[k], f"{name} state {k}")
    xs = torch.randn(3, 2, 3, h, w, dtype=F64)
    _close(
        main_logits(vafunc.ensemble_apply(model, params, state, xs, method="batched")[0]),
        main_logits(vafunc.ensemble_apply(model, params, state, xs, method="loop")[0]),
    )


@pytest.mark.parametrize("name", sorted(UNCOVERED & set(REPS.values())))
def test_uncovered_families_refuse_batched(name):
    model = vafunc.get_model(name)
    assert not covers(model)
    p, s = model.init(0, device="meta")
    params, state = vafunc.stack([p, p]), vafunc.stack([s, s])
    with pytest.raises(ValueError, match="no members-mode lowering.*method='loop'"):
        vafunc.ensemble_apply(model, params, state, torch.zeros(1, 3, 224, 224, device="meta"), method="batched")


def test_auto_falls_back_to_the_loop_where_not_covered():
    model = vafunc.get_model("eva02_tiny_patch14_224", depth=1, num_classes=4, img_size=28)
    params, state = vafunc.ensemble_init(model, 2, key=0)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(
        vafunc.ensemble_apply(model, params, state, x, method="auto")[0],
        vafunc.ensemble_apply(model, params, state, x, method="loop")[0],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_members_mode_gradients_equal_the_loop(name):
    """The gradient of the members' summed losses through one members-mode forward is, member by
    member, each member's own gradient (train mode, float64)."""
    model, params, state = _ensemble(name, n=2)
    h, w = _size(model)
    x, y = torch.randn(3, 3, h, w, dtype=F64), torch.tensor([0, 3, 5])
    rng = vr.key(3)

    def loss(p, method):
        logits, _ = vafunc.ensemble_apply(model, p, state, x, train=True, rng=rng, method=method)
        return sum(F.cross_entropy(logits[i], y) for i in range(2))

    want = torch.func.grad(lambda p: loss(p, "loop"))(params)
    got = torch.func.grad(lambda p: loss(p, "batched"))(params)
    want_flat = vtree.flatten(want)
    for k, v in vtree.flatten(got).items():
        _close(v, want_flat[k], f"{name} grad {k}")


@pytest.mark.parametrize("method", ["batched", "auto"])
def test_ensemble_train_step_in_members_mode_equals_the_loop(method):
    model, params, state = _ensemble("resnet18", n=2, num_classes=5)
    from vafunc.training import optim

    opt = optim.sgd(0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 40, dtype=F64), torch.tensor([0, 1, 4, 2])
    want = make_train_step(model, opt, ensemble=True, ensemble_method="loop")(params, state, opt.init(params), x, y)
    got = make_train_step(model, opt, ensemble=True, ensemble_method=method)(params, state, opt.init(params), x, y)
    for tree_got, tree_want in zip(got[:3], want[:3]):
        for a, b in zip(vtree.tree_leaves(tree_got), vtree.tree_leaves(tree_want)):
            _close(a, b)
    for k in ("loss", "accuracy"):
        assert got[3][k].shape == (2,)
        _close(got[3][k], want[3][k])


def _ops(fn) -> set:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_a_users_vmap_takes_the_member_conv_operator():
    """``torch.vmap(model.apply)`` over stacked weights lowers its convolutions like members mode
    (``vafunc::member_conv2d``, :mod:`vafunc.research.vmap_rules`) and equals the loop; where a gradient
    is recorded (``vmap(grad)``) and for a single model the plain aten convolution stays."""
    model, params, state = _ensemble("resnet18", n=2)
    x = torch.randn(3, 3, 32, 40, dtype=F64)
    user = torch.vmap(lambda p, s: model.apply(p, s, x)[0])
    with torch.no_grad():
        assert "vafunc::member_conv2d" in _ops(lambda: user(params, state))
        _close(user(params, state), vafunc.ensemble_apply(model, params, state, x, method="loop")[0])
        one = vtree.tree_map(lambda t: t[0], params), vtree.tree_map(lambda t: t[0], state)
        assert "vafunc::member_conv2d" not in _ops(lambda: model.apply(*one, x))
    y = torch.tensor([0, 1, 2])
    g = torch.vmap(torch.func.grad(lambda p, s: F.cross_entropy(model.apply(p, s, x)[0], y)))
    assert "vafunc::member_conv2d" not in _ops(lambda: g(params, state))


def test_centre_tap_gradient_in_every_mode():
    """The centre-tap gather of a 1x1 map (``members._Tap``): its one-pass backward, forward-mode
    derivative and generated vmap rule equal those of plain indexing (float64)."""
    from vafunc.research.members import _Tap

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 5, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    plain = lambda w: (w[:, :, :, 1, 1] * t).sum()  # noqa: E731
    ours = lambda w: (_Tap.apply(w, 4) * t).sum()  # noqa: E731
    assert torch.autograd.gradcheck(lambda w: _Tap.apply(w, 4), (w.clone().requires_grad_(),))
    want = torch.func.grad(plain)(w)
    got = torch.func.grad(ours)(w)
    assert got.is_contiguous() and torch.equal(got, want)
    v = torch.randn_like(w)
    assert torch.equal(torch.func.jvp(ours, (w,), (v,))[1], torch.func.jvp(plain, (w,), (v,))[1])
    ws = torch.stack([w, 2 * w])
    assert torch.equal(torch.vmap(torch.func.grad(ours))(ws), torch.vmap(torch.func.grad(plain))(ws))
    # a transposed incoming gradient (what bmm's backward hands over) still gives a contiguous one
    w2 = w.clone().requires_grad_()
    (_Tap.apply(w2, 4).transpose(1, 2).contiguous() * t.transpose(1, 2)).sum().backward()
    assert w2.grad.is_contiguous() and torch.equal(w2.grad, want)
