"""The explicit precision policy (vafunc.precision.Policy): validation, the dtype-mismatch error
of every model, bf16 compute against fp32 on real photographs, and the policy under grad, vmap,
compile and the train step."""

from __future__ import annotations

import pytest
import torch

import vafunc
from vafunc.precision import Policy
from vafunc.train import make_train_step

BF16 = Policy.bf16()


def test_policy_validates_its_dtypes():
    with pytest.raises(TypeError, match="compute"):
        Policy(compute=torch.int8)
    with pytest.raises(TypeError, match="Policy"):
        vafunc.get_model("resnet18").apply(*vafunc.get_model("resnet18").init(device="meta"),
                                           torch.empty(1, 3, 32, 32, device="meta"), policy="bf16")
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
    feats, _ = model.features(params, state, torch.randn(1, 3, 32, 32), ["layer1", "layer4"],
                              policy=Policy(compute=torch.bfloat16, output=torch.bfloat16))
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
