"""The explicit precision policy (vafunc.core.precision.Policy): validation, the dtype-mismatch error
of every model, bf16 compute against fp32 on real photographs, and the policy under grad, vmap,
compile and the train step."""

from __future__ import annotations

import pytest
import torch

import vafunc
from vafunc.core.precision import Policy
from vafunc.training.train import make_train_step

BF16 = Policy.bf16()


def test_policy_validates_its_dtypes():
    with pytest.raises(TypeError, match="compute"):
        Policy(compute=torch.int8)
    with pytest.raises(TypeError, match="Policy"):
        vafunc.get_model("resnet18").apply(
            *vafunc.get_model("resnet18").init(device="meta"), torch.empty(1, 3, 32, 32, device="meta"), policy="bf16"
        )
    assert str(BF16) == "Policy(param=float32, compute=bfloat16, output=float32)"


@pytest.mark.parametrize("name", vafunc.list_models())
def test_an_input_of_another_dtype_is_a_clear_type_error(name):
    """A float64 batch for float32 parameters: a TypeError naming both dtypes and the policy
    (checked on the meta device: no arithmetic)."""
    model = vafunc.get_model(name)
    p, s = model.init(device="meta")
    size = -(-max(model.min_size, 32) // model.size_multiple) * model.size_multiple
    if getattr(model.config, "image_size", None):
        size = model.config.image_size
    x = torch.empty(1, model.in_channels, size, size, device="meta", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float64.*float32.*Policy"):
        model.apply(p, s, x)


def _photos(size):
    from benchmarks.photos import photo_crops

    return photo_crops(size, flips=False)[:4]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny", "vit_b_32", "efficientnet_b0"])
def test_bf16_logits_within_two_percent_on_photographs(name):
    """bf16 compute against float32, same float32 parameters: every logit within 2% of the
    largest float32 logit (measured 0.2-1.8% over these families)."""
    model = vafunc.get_model(name)
    params, state = model.init(0)
    if name == "vit_b_32":  # its zero-initialised head would make every logit 0
        params["heads"]["head"]["weight"] = torch.randn(1000, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    x = _photos(224 if name == "vit_b_32" else 96)
    with torch.no_grad():
        want, _ = model.apply(params, state, x)
        got, _ = model.apply(params, state, x, policy=BF16)
    assert got.dtype == torch.float32
    err = float((got - want).abs().max()) / float(want.abs().max())
    print(f"{name}: bf16 max |error| {100 * err:.2f}% of the largest fp32 logit")
    assert err <= 0.02


def test_bf16_compute_really_runs_in_bf16():
    model = vafunc.get_model("resnet18")
    params, state = model.init(0)
    feats, _ = model.features(
        params,
        state,
        torch.randn(1, 3, 32, 32),
        ["layer1", "layer4"],
        policy=Policy(compute=torch.bfloat16, output=torch.bfloat16),
    )
    assert feats["layer1"].dtype == feats["layer4"].dtype == torch.bfloat16


def test_policy_under_grad_vmap_and_compile():
    model = vafunc.get_model("convnext_tiny", num_classes=5)
    params, state = model.init(0)
    x = torch.randn(2, 3, 32, 32)

    def loss(p, policy=None):
        return model.apply(p, state, x, **({} if policy is None else {"policy": policy}))[0].square().mean()

    g32 = vafunc.flatten(torch.func.grad(loss)(params))
    g16 = vafunc.flatten(torch.func.grad(lambda p: loss(p, BF16))(params))
    for k, v in g32.items():  # gradients reach the float32 parameters, in float32
        assert g16[k].dtype == torch.float32, k
    a = torch.cat([v.flatten() for v in g32.values()])
    b = torch.cat([v.flatten() for v in g16.values()])
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99

    stacked = vafunc.ensemble_init(model, 2, key=1)
    got, _ = vafunc.ensemble_apply(model, *stacked, x, method="vmap", policy=BF16)
    want, _ = vafunc.ensemble_apply(model, *stacked, x, method="loop", policy=BF16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_policy_under_compile():
    model = vafunc.get_model("squeezenet1_1", num_classes=5)
    params, state = model.init(0)
    x = torch.randn(2, 3, 64, 64)
    f = torch.compile(lambda p, s, x: model.apply(p, s, x, policy=BF16)[0], fullgraph=True)
    eager = model.apply(params, state, x, policy=BF16)[0]
    got = f(params, state, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eager, rtol=3e-2, atol=3e-2)


def test_train_step_with_a_bf16_policy():
    """float32 parameters and optimizer state, BatchNorm statistics kept in float32."""
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = model.init(0)
    opt = vafunc.optim.sgd(0.1, momentum=0.9)
    step = make_train_step(model, opt, policy=BF16)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    p2, s2, _, metrics = step(params, state, opt.init(params), x, y)
    assert all(v.dtype == torch.float32 for v in vafunc.tree.tree_leaves(p2))
    assert s2["bn1"]["running_mean"].dtype == torch.float32
    assert not torch.equal(s2["bn1"]["running_mean"], state["bn1"]["running_mean"])
    assert metrics["loss"].dtype == torch.float32 and torch.isfinite(metrics["loss"])


def _calibrated(model, seed=0):
    """Parameters with non-trivial BatchNorm statistics and affine terms (a fresh init has mean 0,
    var 1, weight 1, bias 0, which a wrong fold would pass)."""
    params, state = model.init(seed)
    g = torch.Generator().manual_seed(seed)
    flat_p, flat_s = vafunc.flatten(params), vafunc.flatten(state)
    for k, v in flat_s.items():
        if k.endswith("running_var"):
            flat_s[k] = torch.rand(v.shape, generator=g) * 1.5 + 0.25
        elif k.endswith("running_mean"):
            flat_s[k] = torch.randn(v.shape, generator=g) * 0.2
    for k, v in flat_p.items():
        if v.dim() == 1:
            flat_p[k] = v + 0.2 * torch.randn(v.shape, generator=g)
    return vafunc.unflatten(flat_p), vafunc.unflatten(flat_s)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_fold_norm_folds_every_conv_batchnorm_exactly(name):
    """``Policy(fold_norm=True)``: float64 parameters folded, then computed in float32, match the
    float64 network to float32 rounding (a wrong scale, shift or eps would be off by far more),
    and the eval forward runs no BatchNorm at all; the default policy keeps them."""
    model = vafunc.get_model(name, num_classes=10)
    params, state = _calibrated(model)
    f64 = lambda t: vafunc.tree_map(lambda v: v.double() if v.is_floating_point() else v, t)  # noqa: E731
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want, _ = model.apply(f64(params), f64(state), x.double())
    policy = Policy(torch.float64, torch.float32, torch.float64, fold_norm=True)
    with _OpNames() as ops:
        got, _ = model.apply(f64(params), f64(state), x.double(), policy=policy)
    assert not any("batch_norm" in n for n in ops.names), sorted(ops.names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with _OpNames() as ops:
        model.apply(params, state, x, policy=BF16)
    assert any("batch_norm" in n for n in ops.names)
    # in bf16 the fold's error is of the unfolded path's order (measured 1.0x and 1.45x of it)
    want32, _ = model.apply(params, state, x)
    err = {
        f: float((model.apply(params, state, x, policy=Policy.bf16(fold_norm=f))[0] - want32).abs().max())
        for f in (True, False)
    }
    print(f"{name}: bf16 max |error| folded {err[True]:.3f}, unfolded {err[False]:.3f}")
    assert err[True] <= 2 * err[False]


def test_fold_norm_keeps_gradients_and_leaves_train_mode_alone():
    """Folding is differentiable (gradients reach the BatchNorm's weight and bias and match the
    unfolded float64 ones) and train mode, which normalises with batch statistics, never folds."""
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = _calibrated(model)
    f64 = lambda t: vafunc.tree_map(lambda v: v.double() if v.is_floating_point() else v, t)  # noqa: E731
    p64, s64 = f64(params), f64(state)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fold = Policy(torch.float64, torch.float32, torch.float64, fold_norm=True)
    g_fold = torch.func.grad(lambda p: model.apply(p, s64, x, policy=fold)[0].square().sum())(p64)
    g_ref = torch.func.grad(lambda p: model.apply(p, s64, x)[0].square().sum())(p64)
    for k in ("bn1.weight", "bn1.bias", "layer4.1.bn2.weight", "conv1.weight"):
        a, b = vafunc.flatten(g_fold)[k], vafunc.flatten(g_ref)[k]
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()), msg=lambda m, k=k: f"{k}: {m}")
    with _OpNames() as ops:
        _, new = model.apply(params, state, x.float(), train=True, policy=Policy.bf16(fold_norm=True))
    assert any("batch_norm" in n for n in ops.names)
    assert not torch.equal(new["bn1"]["running_mean"], state["bn1"]["running_mean"])


def test_fold_norm_is_validated():
    with pytest.raises(TypeError, match="fold_norm"):
        Policy.bf16(fold_norm="yes")
    assert str(Policy.bf16(fold_norm=True)).endswith("fold_norm=True)")
    model = vafunc.get_model("resnet18")
    p, s = model.init(device="meta")
    with pytest.raises(ValueError, match="dtype"):
        vafunc.compile(model, p, s, fold_norm=True)
    with pytest.raises(TypeError, match="fold_norm"):
        vafunc.compile(model, p, s, dtype=torch.bfloat16, fold_norm=1)
