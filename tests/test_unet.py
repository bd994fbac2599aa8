"""U-Net (vafunc/models/unet.py) against a plain torch.nn U-Net written out here (there is no package
oracle): same state_dict names and order, same outputs in eval and train mode, the paper's
parameter counts and the 572 -> 388 tile of Fig. 1."""

from __future__ import annotations

import pytest
import torch
from oracle import module_tree_problems
from torch import nn

import torch_compat
import vafunc
from benchmarks.segmentation import TorchUNet
from vafunc.models.unet import output_size, valid_size

PAPER_WIDTHS = (64, 128, 256, 512, 1024)
SMALL = (8, 16, 32, 64, 128)  # the same network, narrower: cheap equality checks on two cores


def _pair(widths=SMALL, variant=False, in_channels=1, num_classes=2, seed=0):
    """vafunc's model and params (every tensor randomised, BN statistics too) and the torch U-Net
    holding the same values."""
    kw = {"padding": "same", "norm": "batch"} if variant else {}
    model = vafunc.get_model("unet", widths=widths, in_channels=in_channels, num_classes=num_classes, **kw)
    params, state = model.init(seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for k, v in vafunc.to_state_dict(params, state).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:  # weights at their init scale, biases and BN affine/means made non-trivial
            scale = float(v.std()) if v.numel() > 1 and float(v.std()) > 0 else 0.1
            sd[k] = torch.randn(v.shape, generator=g) * scale + (1.0 if v.dim() == 1 and float(v.mean()) == 1 else 0.0)
    ref = TorchUNet(in_channels, num_classes, widths, padding=1 if variant else 0, batch_norm=variant)
    assert list(ref.state_dict()) == list(sd), "state_dict names or order differ from the torch U-Net"
    ref.load_state_dict(sd, strict=True)
    params, state = vafunc.from_state_dict(model, sd)
    return model, params, state, ref


def test_output_size_formula():
    assert output_size(572) == 388 and valid_size(28) == 572
    assert [valid_size(b) for b in range(4, 7)] == [188, 204, 220]
    assert [output_size(valid_size(b)) for b in range(4, 7)] == [4, 20, 36]
    assert output_size(valid_size(3)) < 1  # b = 3 (172): the decoder runs out of pixels


def test_parameter_counts_and_names():
    model = vafunc.get_model("unet")
    assert model.num_params() == 31_030_658 == model.metadata["params"]
    assert model.config.in_channels == 1 and model.config.num_classes == 2
    assert model.metadata["reference"] is None and "Ronneberger" in model.metadata["paper"]
    variant = vafunc.get_model("unet", padding="same", norm="batch", in_channels=3, num_classes=1)
    assert variant.num_params() == 31_037_633
    for m, kw in [(model, {}), (variant, {"padding": 1, "batch_norm": True, "in_channels": 3, "num_classes": 1})]:
        with torch.device("meta"):
            ref = TorchUNet(**kw)
        assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == m.state_dict_shapes()
        assert list(ref.state_dict()) == list(m.state_dict_shapes())
        assert sum(p.numel() for p in ref.parameters()) == m.num_params()


def test_the_paper_tile_on_meta():
    model = vafunc.get_model("unet")
    p, s = model.init(device="meta")
    y, _ = model.apply(p, s, torch.empty(1, 1, 572, 572, device="meta"))
    assert y.shape == (1, 2, 388, 388)
    assert model.min_size == 188 and model.size_multiple == 1
    assert model.feature_shapes(572)["enc5"] == (1, 1024, 28, 28)
    variant = vafunc.get_model("unet", padding="same", norm="batch", in_channels=3, num_classes=1)
    p, s = variant.init(device="meta")
    assert variant.apply(p, s, torch.empty(2, 3, 573, 401, device="meta"))[0].shape == (2, 1, 573, 401)
    assert variant.min_size == 16


def test_config_errors():
    with pytest.raises(ValueError, match="padding"):
        vafunc.get_model("unet", padding="reflect")
    with pytest.raises(ValueError, match="norm"):
        vafunc.get_model("unet", norm="group")
    with pytest.raises(ValueError, match="widths"):
        vafunc.get_model("unet", widths=(64,))
    with pytest.raises(ValueError, match="at least 188x188"):
        model = vafunc.get_model("unet")
        model.check_input(torch.empty(1, 1, 172, 172, device="meta"))


def test_paper_network_matches_torch_at_full_width():
    model, params, state, ref = _pair(widths=PAPER_WIDTHS)
    x = torch.randn(1, 1, 188, 188, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.eval()(x)
        got, new_state = model.apply(params, state, x)
    assert got.shape == want.shape == (1, 2, 4, 4)
    assert new_state is state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(188, 204), (205, 190)])  # a valid tile; sizes off the tiling (floors)
def test_paper_network_matches_torch(size):
    model, params, state, ref = _pair()
    x = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.eval()(x)
        got, _ = model.apply(params, state, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (37, 50)])  # odd sides: the up-sampled map is padded
def test_batchnorm_variant_matches_torch_in_eval_and_train(size):
    model, params, state, ref = _pair(variant=True, in_channels=3, num_classes=1)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref.eval()(x)
        got, _ = model.apply(params, state, x)
        assert got.shape == (2, 1, *size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        want = ref.train()(x)
        got, new_state = model.apply(params, state, x, train=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    theirs = ref.state_dict()
    for k, v in vafunc.to_state_dict(params, new_state).items():
        torch.testing.assert_close(v, theirs[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("variant", [False, True])
def test_torch_compat_tree_is_the_torch_unet(variant):
    model, params, state, ref = _pair(variant=variant)
    compat = torch_compat.from_model(model, params, state)
    assert list(compat.state_dict()) == list(ref.state_dict())
    assert not module_tree_problems(compat, ref)
    assert isinstance(compat.up1, nn.ConvTranspose2d) and isinstance(compat.enc1, nn.Sequential)
    x = torch.randn(1, 1, *((40, 44) if variant else (188, 188)), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(compat.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)


def test_init_follows_the_paper():
    """Normal with std sqrt(2 / N) (N: the incoming nodes of one output), zero biases."""
    model = vafunc.get_model("unet", widths=SMALL)
    sd = vafunc.to_state_dict(*model.init(0))
    for name, fan_in in [("enc2.0.weight", 9 * 8), ("dec1.2.weight", 9 * 8), ("up4.weight", 128)]:
        assert abs(float(sd[name].std()) / (2.0 / fan_in) ** 0.5 - 1) < 0.1, name
    assert all(float(v.abs().max()) == 0 for k, v in sd.items() if k.endswith("bias"))


@pytest.mark.parametrize("variant", [False, True], ids=["paper", "padded_batchnorm"])
def test_gradients_equal_the_torch_unets_in_float64(variant):
    """The gradient of a weighted sum of the class scores, for every parameter and for the input,
    equals autograd's through the torch.nn U-Net: the paper's network and the padded BatchNorm
    variant (train mode: batch statistics), three levels of small widths, at odd sides (floors,
    crops and pads on the way), in float64 so that every gradient is compared to 1e-9."""
    f64, c = torch.float64, 3 if variant else 1
    model, params, state, ref = _pair(widths=(4, 8, 16), variant=variant, in_channels=c)
    ref = ref.double().train()
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(8)
    size = (21, 26) if variant else (model.min_size + 3, model.min_size + 10)  # odd sides: pads, floors and crops
    x = torch.randn(2, c, *size, dtype=f64, generator=g)
    xr = x.clone().requires_grad_()
    out = ref(xr)
    weights = torch.randn(out.shape, dtype=f64, generator=g)
    (out * weights).sum().backward()

    def loss(p, x):
        return (model.apply(p, state, x, train=True)[0] * weights).sum()

    got, got_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    want = {k: v.grad for k, v in ref.named_parameters()}
    got = vafunc.flatten(got)
    assert set(got) == set(want)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-9, atol=1e-11 * float(want[k].abs().max()), msg=k)
    torch.testing.assert_close(got_x, xr.grad, rtol=1e-9, atol=1e-11 * float(xr.grad.abs().max()))
