"""Functional optimizers equal torch.optim step for step."""

import pytest
import torch

import vafunc
from vafunc.training import optim


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "a": {"weight": torch.randn(5, 4, generator=g), "bias": torch.randn(5, generator=g)},
        "b": torch.randn(3, generator=g),
    }
    grads = [vafunc.tree_map(lambda t: torch.randn(t.shape, generator=g), params) for _ in range(20)]
    return params, grads


def _run_torch(params, grads, make):
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in vafunc.flatten(params).items()}
    opt = make(list(leaves.values()))
    for gr in grads:
        for k, v in vafunc.flatten(gr).items():
            leaves[k].grad = v.clone()
        opt.step()
    return {k: v.detach() for k, v in leaves.items()}


def _run_vafunc(params, grads, opt, donate=False):
    if donate:  # donated trees are overwritten: hand over copies
        params = vafunc.tree_map(torch.clone, params)
        grads = [vafunc.tree_map(torch.clone, g) for g in grads]
    state = opt.init(params)
    for gr in grads:
        params, state = opt.update(gr, state, params, donate=donate)
    return vafunc.flatten(params)


@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.0),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
        dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
    ],
)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
def test_sgd_matches_torch(kw, donate):
    params, grads = _problem()
    before = vafunc.tree_map(torch.clone, params)
    want = _run_torch(params, grads, lambda ps: torch.optim.SGD(ps, lr=0.05, **kw))
    got = _run_vafunc(params, grads, optim.sgd(0.05, **kw), donate=donate)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    for k, v in vafunc.flatten(before).items():
        assert torch.equal(vafunc.flatten(params)[k], v), "update mutated the caller's params"


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=5e-4), dict()])
def test_sgd_donated_fused_pass_equals_the_pure_update(kw, monkeypatch):
    """A donated update hands contiguous CPU tensors to torch's fused kernel and the rest (here a
    transposed gradient, which that kernel would read in the wrong order) to the _foreach path;
    with a schedule and 20 steps the parameters and buffers equal the pure update's."""
    calls = []
    fused = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda p, *a, **k: (calls.append(len(p)), fused(p, *a, **k))[1])
    params, grads = _problem(2)
    grads = [{**g, "b": g["b"], "a": {**g["a"], "weight": g["a"]["weight"].t().contiguous().t()}} for g in grads]
    assert not grads[0]["a"]["weight"].is_contiguous()
    opt = optim.sgd(optim.cosine_schedule(0.1, 20), **kw)
    pure = _run_vafunc(params, grads, opt)
    donated = _run_vafunc(params, grads, opt, donate=True)
    assert calls == [2] * 20  # bias and b fused, the transposed weight not
    for k in pure:
        torch.testing.assert_close(donated[k], pure[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(), dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
def test_adamw_matches_torch(kw, donate):
    params, grads = _problem(1)
    want = _run_torch(params, grads, lambda ps: torch.optim.AdamW(ps, **kw))
    got = _run_vafunc(params, grads, optim.adamw(**kw), donate=donate)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_schedules_match_torch_schedulers():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    ours = optim.cosine_schedule(0.1, 10, 0.01)
    for step in range(10):
        assert abs(float(ours(torch.tensor(step))) - opt.param_groups[0]["lr"]) < 1e-9
        opt.step()
        sched.step()
    warm = optim.warmup_cosine_schedule(1.0, 4, 14)
    assert [round(float(warm(torch.tensor(s))), 6) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert float(warm(torch.tensor(14))) == pytest.approx(0.0)


def test_schedule_drives_sgd_like_torch_scheduler():
    params, grads = _problem(2)
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in vafunc.flatten(params).items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for gr in grads:
        for k, v in vafunc.flatten(gr).items():
            leaves[k].grad = v.clone()
        opt.step()
        sched.step()
    got = _run_vafunc(params, grads, optim.sgd(optim.cosine_schedule(0.1, 20), momentum=0.9))
    for k, v in leaves.items():
        torch.testing.assert_close(got[k], v.detach(), rtol=1e-6, atol=1e-6)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="lr must be"):
        optim.sgd(-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.sgd(0.1, nesterov=True)
    opt = optim.sgd(0.1)
    params, _ = _problem()
    with pytest.raises(ValueError, match="do not match params"):
        opt.update({"a": params["a"]}, opt.init(params), params)
