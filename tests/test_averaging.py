"""Weight averaging and BatchNorm recalibration: ``vafunc.tree.interpolate`` / ``average`` against the
arithmetic written out leaf by leaf, and ``recalibrate_batch_norm`` against
``torch.optim.swa_utils.update_bn`` on torchvision's module and on the torch_compat module with the
same weights (one model, a stacked ensemble member by member, per-member batches)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.optim.swa_utils import update_bn

import torch_compat
import vafunc
from vafunc.tree import average, interpolate


@pytest.fixture(scope="module")
def resnet():
    model = vafunc.get_model("resnet18", num_classes=10)
    (p0, s0), (p1, s1) = model.init(0), model.init(1)
    s1 = vafunc.tree_map(lambda t: t + 3 if t.dtype == torch.int64 else t * 2 + 0.5, s1)
    return model, (p0, s0), (p1, s1)


def _batches(n=3, b=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) * (1 + i) + i for i in range(n)]


def test_interpolate_is_the_line_and_keeps_integers_of_the_first(resnet):
    _, (p0, s0), (p1, s1) = resnet
    for t in (0.0, 0.3, 1.0, 1.5):
        got = vafunc.flatten(interpolate(p0, p1, t))
        for k, v in got.items():
            a, b = vafunc.flatten(p0)[k], vafunc.flatten(p1)[k]
            torch.testing.assert_close(v, a + t * (b - a), rtol=1e-6, atol=1e-6)
    at0 = vafunc.tree.tree_leaves(interpolate(p0, p1, 0.0))
    assert all(torch.equal(a, b) for a, b in zip(at0, vafunc.tree.tree_leaves(p0)))
    mid = vafunc.flatten(interpolate(s0, s1, 0.5))
    for k, v in mid.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and torch.equal(v, vafunc.flatten(s0)[k])  # from the first tree
        else:
            torch.testing.assert_close(v, (vafunc.flatten(s0)[k] + vafunc.flatten(s1)[k]) / 2)
    # a tensor t (differentiable): d/dt of the path is b - a
    t = torch.tensor(0.25)
    d = torch.func.grad(lambda t: interpolate(p0, p1, t)["fc"]["weight"].sum())(t)
    torch.testing.assert_close(d, (p1["fc"]["weight"] - p0["fc"]["weight"]).sum())


def test_average_is_the_weighted_mean(resnet):
    _, (p0, s0), (p1, s1) = resnet
    trees = [p0, p1, interpolate(p0, p1, 2.0)]
    for w in (None, [1.0, 2.0, 1.0]):
        ws = torch.tensor([1.0, 1.0, 1.0] if w is None else w, dtype=torch.float64)
        ws = ws / ws.sum()
        got = vafunc.flatten(average(trees, w))
        for k, v in got.items():
            want = sum(wi * vafunc.flatten(t)[k].double() for wi, t in zip(ws.tolist(), trees))
            assert v.dtype == torch.float32
            torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-6)
    avg_s = vafunc.flatten(average([s1, s0]))
    assert torch.equal(avg_s["bn1.num_batches_tracked"], s1["bn1"]["num_batches_tracked"])
    for a, b in zip(vafunc.tree.tree_leaves(average([p0])), vafunc.tree.tree_leaves(p0)):
        assert torch.equal(a, b)


def test_bad_trees_and_weights_are_refused(resnet):
    _, (p0, _), (p1, _) = resnet
    with pytest.raises(ValueError, match="missing"):
        interpolate(p0, {k: v for k, v in p1.items() if k != "fc"}, 0.5)
    with pytest.raises(ValueError, match="fc.weight"):
        interpolate(p0, {**p1, "fc": {**p1["fc"], "weight": p1["fc"]["weight"][:5]}}, 0.5)
    with pytest.raises(ValueError, match="2 weights"):
        average([p0, p1], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        average([p0, p1], [1.0, -1.0])
    with pytest.raises(ValueError, match="at least one"):
        average([])


def _torchvision(params, state):
    ref = torchvision.models.resnet18(num_classes=10)
    ref.load_state_dict(vafunc.to_state_dict(params, state))
    return ref


def _assert_state_equal(state, module, atol=1e-6):
    sd = module.state_dict()
    for k, v in vafunc.flatten(state).items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k
        else:
            torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=atol, msg=k)


def test_recalibrate_equals_update_bn_on_torchvision_and_compat_modules(resnet):
    model, (p0, s0), (p1, s1) = resnet
    params = average([p0, p1])  # an averaged network, whose stored statistics are stale
    batches = _batches()
    before = vafunc.tree_map(torch.clone, s1)
    new = vafunc.recalibrate_batch_norm(model, params, s1, [(x, None) for x in batches])
    assert all(torch.equal(a, b) for a, b in zip(vafunc.tree.tree_leaves(s1), vafunc.tree.tree_leaves(before)))
    assert int(new["bn1"]["num_batches_tracked"]) == len(batches)
    ref = _torchvision(params, s1)
    update_bn(batches, ref)
    _assert_state_equal(new, ref)
    compat = torch_compat.create("resnet18", num_classes=10)
    compat.load_state_dict(vafunc.to_state_dict(params, s1))
    update_bn(batches, compat)  # update_bn itself on the compat module
    _assert_state_equal(new, compat)
    # the recalibrated network predicts what the recalibrated module predicts
    with torch.no_grad():
        got = model.apply(params, new, batches[0])[0]
        torch.testing.assert_close(got, ref.eval()(batches[0]), rtol=1e-4, atol=1e-4)


def test_recalibrate_a_stacked_ensemble_member_by_member(resnet):
    model, (p0, s0), (p1, s1) = resnet
    P, S = vafunc.stack([p0, p1]), vafunc.stack([s0, s1])
    shared = _batches(2)
    per_member = [torch.stack([x, x.flip(0) * 0.5]) for x in shared]  # [N, B, C, H, W]
    for batches, member_batches in ((shared, lambda i: shared), (per_member, lambda i: [x[i] for x in per_member])):
        new = vafunc.unstack(vafunc.recalibrate_batch_norm(model, P, S, batches))
        for i, (p, s) in enumerate(((p0, s0), (p1, s1))):
            ref = _torchvision(p, s)
            update_bn(member_batches(i), ref)
            _assert_state_equal(new[i], ref)


def test_recalibrate_errors_and_models_without_batch_norm(resnet):
    model, (p0, s0), _ = resnet
    with pytest.raises(ValueError, match="at least one batch"):
        vafunc.recalibrate_batch_norm(model, p0, s0, [])
    with pytest.raises(TypeError, match="image tensors"):
        vafunc.recalibrate_batch_norm(model, p0, s0, [("not", "a tensor")])
    gn = vafunc.get_model("resnet50_gn", num_classes=10)
    p, s = gn.init(0, device="meta")
    assert vafunc.recalibrate_batch_norm(gn, p, s, _batches(1)) is s
