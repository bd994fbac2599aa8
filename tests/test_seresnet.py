"""SE-ResNet / SE-ResNeXt (timm's ``seresnet50``, ``seresnext50_32x4d``) against timm: init
distributions tensor by tensor, feature taps at timm's module paths, the stochastic-depth rates
and keys, and torch.compile. (Names, shapes and outputs: the registry-driven oracle tests.)"""

import math

import pytest
import timm  # noqa: E402
import torch
from oracle import module_outputs, perturb

import vafunc

NAMES = ("seresnet50", "seresnext50_32x4d")


@pytest.mark.parametrize("name", NAMES)
def test_init_draws_timms_distributions_in_state_dict_order(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).state_dict()
    model = vafunc.get_model(name)
    params, state = model.init(1)
    got = vafunc.to_state_dict(params, state)
    assert list(got) == list(ref)
    for k, want in ref.items():
        have = got[k]
        assert have.shape == want.shape and have.dtype == want.dtype, k
        if (
            not want.is_floating_point()
            or k.endswith(("running_mean", "running_var"))
            or ".bn" in k
            or k.startswith("bn1")
            or ".downsample.1." in k
        ):
            assert torch.equal(have, want), k  # BatchNorm: constants (bn3 weight zero: zero_init_last)
            continue
        if k.endswith("bias"):  # SE conv biases (torch's default), fc bias: uniform in +-1/sqrt(fan_in)
            bound = 1 / math.sqrt(ref[k[: -len("bias")] + "weight"][0].numel())
            assert float(have.abs().max()) <= bound and float(want.abs().max()) <= bound, k
            assert float(have.abs().max()) > 0.5 * bound, k
            continue
        # weights: same law (kaiming normal fan_out for convs, torch default for fc)
        if want.numel() >= 1000:
            assert abs(float(have.std()) / float(want.std()) - 1) < 0.1, k
            assert abs(float(have.mean())) < 0.1 * float(want.std()) + 1e-3, k
        else:
            assert float(have.std()) == pytest.approx(float(want.std()), rel=0.5), k
    zeroed = [k for k in ref if k.endswith("bn3.weight")]
    assert zeroed and all(not got[k].any() for k in zeroed)


@pytest.mark.parametrize("name", NAMES)
def test_features_are_timm_module_outputs(name):
    torch.manual_seed(0)
    ref = perturb(timm.create_model(name, pretrained=False), seed=2).eval()
    model = vafunc.get_model(name)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    names = model.feature_names
    assert names[:3] == ["act1", "maxpool", "layer1.0"] and names[-1] == "layer4"
    x = torch.randn(2, 3, 72, 64)
    want = module_outputs(ref, names, x)
    with torch.no_grad():
        got, _ = model.features(params, state, x, names)
    for n in names:
        scale = max(float(want[n].abs().max()), 1e-6)
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n


def test_drop_path_rates_are_timms_and_keyed():
    from vafunc.models.resnet import plan

    ref = timm.create_model("seresnet50", pretrained=False, drop_path_rate=0.2)
    want = [
        0.0 if blk.drop_path is None else blk.drop_path.drop_prob
        for stage in (ref.layer1, ref.layer2, ref.layer3, ref.layer4)
        for blk in stage
    ]
    model = vafunc.get_model("seresnet50", drop_path_rate=0.2, drop_rate=0.3, num_classes=10)
    got = [b.drop_path for stage in plan(model.config) for b in stage]
    assert got == pytest.approx(want)
    params, state = model.init(0)
    x = torch.randn(4, 3, 32, 32)
    k1, k2 = vafunc.random.key(1), vafunc.random.key(2)
    y1, _ = model.apply(params, state, x, train=True, rng=k1)
    y1b, _ = model.apply(params, state, x, train=True, rng=k1)
    y2, _ = model.apply(params, state, x, train=True, rng=k2)
    assert torch.equal(y1, y1b) and not torch.equal(y1, y2)
    with pytest.raises(ValueError):
        model.apply(params, state, x, train=True)  # non-zero rates need a key
    e1, s1 = model.apply(params, state, x)
    e2, _ = model.apply(params, state, x, rng=k2)  # eval: deterministic, state untouched
    assert torch.equal(e1, e2) and s1 is state


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """Train mode with stochastic depth in float64 (the same key gives the same masks compiled),
    eval in float32; one block per stage (two in the last) keeps the compile short."""
    torch._dynamo.reset()
    model = vafunc.get_model("seresnext50_32x4d", layers=(1, 1, 1, 2), drop_path_rate=0.1, num_classes=10)
    key = vafunc.random.key(3)
    x = torch.randn(4, 3, 64, 66, dtype=torch.float64)
    params, state = model.init(0, dtype=torch.float64)
    f = torch.compile(lambda p, s, x, k: model.apply(p, s, x, train=True, rng=k), fullgraph=True)
    with torch.no_grad():
        got, gs = f(params, state, x, key)
        want, ws = model.apply(params, state, x, train=True, rng=key)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        for k, v in vafunc.flatten(ws).items():
            torch.testing.assert_close(vafunc.flatten(gs)[k], v, rtol=1e-6, atol=1e-6), k
        params, state = model.init(0)
        ev = torch.compile(lambda p, s, x: model.apply(p, s, x)[0], fullgraph=True)
        want = model.apply(params, state, x.float())[0]
        torch.testing.assert_close(ev(params, state, x.float()), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
