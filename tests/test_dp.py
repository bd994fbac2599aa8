"""DP-SGD (vafunc.training.train.make_dp_train_step) and the GroupNorm ResNets it needs."""

import math

import pytest
import torch
from torch.nn.functional import cross_entropy

import vafunc
from vafunc.core import random as vr
from vafunc.training import optim
from vafunc.training.train import gaussian_noise, make_dp_train_step, make_train_step


@pytest.fixture(scope="module")
def gn_problem():
    """A GroupNorm ResNet-18 (norm="group") in float64 with stochastic depth, so train mode
    draws keyed masks, and a batch of 4."""
    model = vafunc.get_model("resnet18", num_classes=5, norm="group", norm_groups=32, drop_path_rate=0.2)
    params, state = model.init(0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    params = vafunc.tree_map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 4, 2])
    return model, params, state, x, y


def _grad_of(step, params, state, x, y, rng):
    """The gradient a step applied, read back through plain SGD with lr 1: ``p - p_new``."""
    new, _, _, metrics = step(params, state, optim.sgd(1.0).init(params), x, y, rng)
    return vafunc.tree_map(torch.sub, params, new), metrics


def test_no_noise_no_clipping_is_the_plain_step(gn_problem):
    model, params, state, x, y = gn_problem
    sgd = optim.sgd(1.0)
    dp = make_dp_train_step(model, sgd, clip_norm=math.inf, noise_multiplier=0.0)
    plain = make_train_step(model, sgd)
    key = vr.key(3)
    got, metrics = _grad_of(dp, params, state, x, y, key)
    want, _ = _grad_of(lambda p, s, o, xx, yy, k: plain(p, s, o, xx, yy, vr.fold_in(k, 0)), params, state, x, y, key)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert float(metrics["clipped"]) == 0.0


def test_clipping_equals_a_loop_reference(gn_problem):
    """Clip every sample's gradient (from a loop of one-sample gradients) to norm C, average:
    what the step applies with zero noise."""
    model, params, state, x, y = gn_problem
    loops = []
    for i in range(len(x)):

        def loss(p):
            return cross_entropy(model.apply(p, state, x[i : i + 1])[0], y[i : i + 1])

        loops.append(torch.func.grad(loss)(params))
    norms = torch.stack([torch.cat([t.flatten() for t in vafunc.tree.tree_leaves(g)]).norm() for g in loops])
    s = norms.sort().values  # some samples clipped, some not; no norm at the boundary (the median's own
    clip = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # ghost norm may round either side of it)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    want = vafunc.tree_map(lambda *ts: sum(f * t for f, t in zip(factors, ts)) / len(x), *loops)
    dp = make_dp_train_step(model, optim.sgd(1.0), clip_norm=clip, noise_multiplier=0.0, train=False)
    got, metrics = _grad_of(dp, params, state, x, y, vr.key(0))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert float(metrics["clipped"]) == pytest.approx(float((norms > clip).double().mean()))
    torch.testing.assert_close(metrics["grad_norm"], norms.mean())


@pytest.mark.slow  # 11M draws, two extra steps (default suite time)
def test_noise_has_the_stated_scale_and_follows_the_key(gn_problem):
    model, params, state, x, y = gn_problem
    sigma, clip = 0.7, 0.5
    quiet = make_dp_train_step(model, optim.sgd(1.0), clip_norm=clip, noise_multiplier=0.0)
    noisy = make_dp_train_step(model, optim.sgd(1.0), clip_norm=clip, noise_multiplier=sigma)
    base, _ = _grad_of(quiet, params, state, x, y, vr.key(5))
    a, _ = _grad_of(noisy, params, state, x, y, vr.key(5))
    again, _ = _grad_of(noisy, params, state, x, y, vr.key(5))
    other, _ = _grad_of(noisy, params, state, x, y, vr.key(6))
    torch.testing.assert_close(a, again, rtol=0, atol=0)  # the same key: the same noise
    z = torch.cat([(u - v).flatten() for u, v in zip(vafunc.tree.tree_leaves(a), vafunc.tree.tree_leaves(base))])
    z2 = torch.cat([(u - v).flatten() for u, v in zip(vafunc.tree.tree_leaves(other), vafunc.tree.tree_leaves(base))])
    want = sigma * clip / len(x)  # noise std on the averaged gradient
    n = z.numel()  # 11M draws: the sample std is within 1e-3 of the truth (its spread is 2e-4)
    assert abs(float(z.std()) / want - 1) < 1e-3 and abs(float(z.mean())) < 5 * want / math.sqrt(n)
    assert abs(float(torch.corrcoef(torch.stack([z, z2]))[0, 1])) < 5 / math.sqrt(n)  # another key: independent


def test_refuses_train_mode_batch_norm_and_bad_arguments():
    model = vafunc.get_model("resnet18", num_classes=3)
    params, state = model.init(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    step = make_dp_train_step(model, optim.sgd(0.1), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="BatchNorm mixes the samples"):
        step(params, state, optim.sgd(0.1).init(params), x, y, vr.key(0))
    eval_step = make_dp_train_step(model, optim.sgd(0.1), clip_norm=1.0, noise_multiplier=1.0, train=False)
    new, _, _, m = eval_step(params, state, optim.sgd(0.1).init(params), x, y, vr.key(0))
    assert torch.isfinite(m["loss"]) and not torch.equal(new["fc"]["weight"], params["fc"]["weight"])
    with pytest.raises(TypeError, match="fresh vafunc.core.random key"):
        eval_step(params, state, optim.sgd(0.1).init(params), x, y, None)
    with pytest.raises(ValueError, match="clip_norm"):
        make_dp_train_step(model, optim.sgd(0.1), clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make_dp_train_step(model, optim.sgd(0.1), clip_norm=1.0, noise_multiplier=-1)


def test_gaussian_noise_shapes_and_determinism():
    tree = {"a": torch.zeros(3, 4), "b": {"c": torch.zeros(5, dtype=torch.float64)}}
    n1, n2 = gaussian_noise(vr.key(1), tree, 2.0), gaussian_noise(vr.key(1), tree, 2.0)
    assert n1["b"]["c"].dtype == torch.float64 and n1["a"].shape == (3, 4)
    torch.testing.assert_close(n1, n2, rtol=0, atol=0)
    assert not torch.equal(gaussian_noise(vr.key(2), tree, 2.0)["a"], n1["a"])


def test_group_norm_config_errors_and_state():
    with pytest.raises(ValueError, match="'batch' or 'group'"):
        vafunc.get_model("resnet18", norm="layer")
    model = vafunc.get_model("resnet18", norm="group", norm_groups=48, num_classes=3)
    with pytest.raises(ValueError, match="48 groups do not divide 64 channels"):
        model.init(0)
    p, s = vafunc.get_model("resnet50_gn").init(0, device="meta")
    assert s == {} and p["bn1"]["weight"].shape == (64,)  # GroupNorm keeps no running statistics
