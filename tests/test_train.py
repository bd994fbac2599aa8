"""The functional train step equals torch's nn.Module training; ensembles equal a loop."""

import pytest
import torch
from oracle import build_reference, perturb

import vafunc
from vafunc.training import optim
from vafunc.training.train import make_train_step


def _data(n=6, size=36, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("grad, donate", [("autograd", False), ("func", False), ("autograd", True)])
def test_train_step_matches_module_training(grad, donate):
    torch.manual_seed(0)
    ref = perturb(build_reference("resnet18", num_classes=10), seed=1).train()
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    opt = optim.sgd(0.05, momentum=0.9, weight_decay=1e-4)
    opt_state = opt.init(params)
    step = make_train_step(model, opt, grad=grad, donate=donate)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for i in range(3):
        x, y = _data(seed=i)
        params, state, opt_state, metrics = step(params, state, opt_state, x, y)
        torch_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        torch_opt.step()
        assert abs(float(metrics["loss"]) - float(loss.detach())) < 1e-4 * max(1.0, float(loss.detach()))
    want = ref.state_dict()
    for k, v in vafunc.to_state_dict(params, state).items():
        assert not v.requires_grad, k
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_compiled_train_step_matches_eager():
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = model.init(0)
    # (SGD: Adam's first step is ~lr * sign(grad), which flips for near-zero gradients under any
    # reordering of floating-point sums, so it would compare compiled and eager rounding noise)
    opt = optim.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    step = make_train_step(model, opt, grad="func")
    compiled = torch.compile(step, fullgraph=True)
    x, y = _data()
    a = step(params, state, opt_state, x, y)
    b = compiled(params, state, opt_state, x, y)
    for u, v in zip(vafunc.tree.tree_leaves(a[0]), vafunc.tree.tree_leaves(b[0])):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[3]["loss"], b[3]["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18"])
def test_ensemble_train_step_equals_loop(name):
    model = vafunc.get_model(name, num_classes=10)
    params, state = vafunc.research.ensemble.ensemble_init(model, 3, key=0)
    opt = optim.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    # the loop lowering runs the single step's kernels (float32 here); members mode ("auto" picks it
    # for resnet18) sums in other orders, which train-mode BatchNorm on 1x1 maps amplifies: it is
    # checked against the loop in float64 (test_members.py)
    step = make_train_step(model, opt, ensemble=True, ensemble_method="loop")
    single = make_train_step(model, opt)
    x, y = _data()
    new_p, new_s, new_o, metrics = step(params, state, opt_state, x, y, vafunc.random.key(0))
    assert metrics["loss"].shape == (3,)
    for i in range(3):
        p_i, s_i = vafunc.unstack(params)[i], vafunc.unstack(state)[i]
        want_p, want_s, _, m = single(p_i, s_i, opt.init(p_i), x, y)
        got_p, got_s = vafunc.unstack(new_p)[i], vafunc.unstack(new_s)[i]
        for k, v in vafunc.to_state_dict(want_p, want_s).items():
            torch.testing.assert_close(
                vafunc.to_state_dict(got_p, got_s)[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
            )
        torch.testing.assert_close(metrics["loss"][i], m["loss"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_ensemble_train_step_equals_eager():
    model = vafunc.get_model("resnet18", num_classes=10)
    # float64: train-mode BN over small maps amplifies float32 reordering noise (see test_properties)
    params, state = vafunc.research.ensemble.ensemble_init(model, 2, key=0, dtype=torch.float64)
    opt = optim.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    step = make_train_step(model, opt, ensemble=True, ensemble_method="vmap")  # vmap(grad) over the members
    # dynamic=False: with symbolic shapes, BatchNorm's backward under vmap(grad) fails inside dynamo
    # (torch 2.14: "Cannot call sizes() on tensor with symbolic sizes"); static shapes compile.
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x, y = _data(n=8, size=48)
    x = x.double()
    a = step(params, state, opt_state, x, y, vafunc.random.key(0))
    b = compiled(params, state, opt_state, x, y, vafunc.random.key(0))
    for u, v in zip(
        vafunc.tree.tree_leaves(a[0]) + vafunc.tree.tree_leaves(a[1]),
        vafunc.tree.tree_leaves(b[0]) + vafunc.tree.tree_leaves(b[1]),
    ):
        torch.testing.assert_close(u, v, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(a[3]["loss"], b[3]["loss"], rtol=1e-7, atol=1e-9)
