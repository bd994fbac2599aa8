"""basic_unet (vafunc/models/basic_unet.py) against MONAI's BasicUNet beyond the registry batteries:
float64 gradients (the conv biases in front of instance norms have exactly cancelling gradients,
float32 noise on both sides in tests/test_oracle.py), narrow configs, the smallest input, keyed
dropout, and the shared InstanceNorm layer against torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import perturb

import torch_compat
import vafunc
from vafunc.core import layers as L

pytest.importorskip("monai", reason="the oracle of basic_unet (pip install -e '.[test]')")
from monai.networks.nets import BasicUNet  # noqa: E402

NARROW = (8, 8, 16, 16, 32, 8)  # the same network, narrower: cheap float64 checks


def _pair(features=NARROW, dtype=torch.float32, **kw):
    """MONAI's network with perturbed weights (instance norms away from 1 / 0) and vafunc's on them."""
    torch.manual_seed(0)
    ref = perturb(BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=features, **kw), seed=3)
    ref = ref.to(dtype)
    model = vafunc.get_model("basic_unet", features=features, **kw)
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    return model, params, state, ref


def test_float64_gradients_of_parameters_and_input_equal_monais():
    """Train mode, at odd sides (every level's up-sampled map padded by a replicated edge)."""
    model, params, state, ref = _pair(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 35, 41, dtype=torch.float64, generator=g)
    xr = x.clone().requires_grad_()
    out = ref.train()(xr)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (out * weights).sum().backward()

    def loss(p, x):
        return (model.apply(p, state, x, train=True)[0] * weights).sum()

    got, got_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    got = vafunc.flatten(got)
    want = {k: v.grad for k, v in ref.named_parameters()}
    assert set(got) == set(want)
    scale = max(float(v.abs().max()) for v in want.values())
    for k, v in got.items():  # the pre-norm biases: exactly 0 in exact arithmetic, ~1e-13 here
        torch.testing.assert_close(v, want[k], rtol=1e-9, atol=1e-12 * scale, msg=k)
    torch.testing.assert_close(got_x, xr.grad, rtol=1e-9, atol=1e-12 * float(xr.grad.abs().max()))


def test_smallest_input_is_monais():
    """32: below it the bottom level is 1x1, where an instance norm has no statistics (MONAI raises too;
    vafunc's input check asks for the probed square minimum on each side)."""
    model, params, state, ref = _pair()
    assert model.min_size == 32 and model.size_multiple == 1
    with torch.no_grad():
        with pytest.raises(ValueError):
            ref(torch.randn(1, 3, 31, 31))
        with pytest.raises(ValueError, match="at least 32x32, got 31x31"):
            model.apply(params, state, torch.randn(1, 3, 31, 31))
        x = torch.randn(1, 3, 32, 33)
        torch.testing.assert_close(model.apply(params, state, x)[0], ref(x), rtol=1e-5, atol=1e-5)


def test_dropout_is_keyed_and_eval_ignores_it():
    model, params, state, ref = _pair(dropout=0.3)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, state, x)[0], ref.eval()(x), rtol=1e-5, atol=1e-5)
        k1, k2 = vafunc.random.key(1), vafunc.random.key(2)
        a = model.apply(params, state, x, train=True, rng=k1)[0]
        assert torch.equal(a, model.apply(params, state, x, train=True, rng=k1)[0])
        assert not torch.allclose(a, model.apply(params, state, x, train=True, rng=k2)[0])
        compat = torch_compat.from_model(model, params, state).train()
        assert torch.equal(compat(x, rng=k1), a)  # the compat tree's nn.Dropout modules take the same keys
    with pytest.raises(ValueError, match="rate 0.3"):
        model.apply(params, state, x, train=True)


def test_config_errors():
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        vafunc.get_model("basic_unet", spatial_dims=3)
    with pytest.raises(ValueError, match="upsample must be 'deconv'"):
        vafunc.get_model("basic_unet", upsample="pixelshuffle")
    with pytest.raises(ValueError, match="six positive ints"):
        vafunc.get_model("basic_unet", features=(32, 64, 128, 256, 512))
    with pytest.raises(ValueError, match="dropout"):
        vafunc.get_model("basic_unet", dropout=1.5)
    with pytest.raises(ValueError, match="out_channels"):
        vafunc.get_model("basic_unet", out_channels=0)


def test_instance_norm_layer_is_torchs():
    """The kit's InstanceNorm (GroupNorm of one channel per group) equals ``F.instance_norm`` and
    ``nn.InstanceNorm2d(C, affine=True)`` in float64, and refuses a single pixel as torch does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64, generator=g) * 3 + 1
    w, b = torch.randn(5, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g)
    want = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    torch.testing.assert_close(L.instance_norm(x, w, b, 1e-5), want, rtol=1e-12, atol=1e-12)
    module = torch_compat.layers.InstanceNorm2d(5, affine=True, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(w), module.bias.copy_(b)
        assert isinstance(module, torch.nn.InstanceNorm2d)
        torch.testing.assert_close(module(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="more than one spatial element"):
        L.instance_norm(x[..., :1, :1], w, b)
    with pytest.raises(ValueError):
        F.instance_norm(x[..., :1, :1], weight=w, bias=b)
