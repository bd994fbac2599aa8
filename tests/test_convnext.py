"""ConvNeXt specifics the registry-driven harness does not cover: timm checkpoints (through the
family's remap), the residual branches at a layer scale of order one, torchvision's
stochastic-depth schedule, and the block_setting config.

Layer scale starts at 1e-6, and the harness's perturbation is multiplicative for tensors of more
than one axis, so in its comparisons every block contributes about 1e-6 of its input: an error
inside a block would pass under a relative tolerance of 1e-5. The tests here set the layer scales
(torchvision's ``layer_scale [C, 1, 1]``, timm's ``gamma [C]``) to values of order one first."""

import warnings

import pytest
import timm
import torch
import torchvision
from oracle import build_reference, build_reference_meta, perturb
from oracle import convnext as tv_convnext
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.feature_extraction import create_feature_extractor

import vafunc
from vafunc.models import convnext

#: a small torchvision-layout network: two stages, two blocks each (cheap gradients)
SMALL = ((32, 64, 2), (64, None, 2))
#: timm's convnext_atto table (its MLP is 1x1 convs, conv_mlp=True)
ATTO = ((40, 80, 2), (80, 160, 2), (160, 320, 6), (320, None, 2))


@torch.no_grad()
def scale_up(module, seed=0):
    """Set every layer scale to uniform(0.3, 0.7): the residual branches then matter."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in module.named_parameters():
        if name.endswith((".layer_scale", ".gamma")):
            p.copy_(torch.empty(p.shape).uniform_(0.3, 0.7, generator=g))
            n += 1
    assert n > 0
    return module


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def depends_on_blocks(model, params, state, x):
    """The blocks change their stage's input by a visible fraction (not by 1e-6)."""
    f, _ = model.features(params, state, x, ["features.0", "features.1"])
    assert float((f["features.1"] - f["features.0"]).abs().max()) > 0.05 * float(f["features.0"].abs().max())


@pytest.mark.parametrize("timm_name,block_setting", [("convnext_tiny", None), ("convnext_atto", ATTO)])
def test_timm_checkpoint_loads_with_timm_outputs(tmp_path, timm_name, block_setting):
    torch.manual_seed(0)
    ref = scale_up(perturb(timm.create_model(timm_name, pretrained=False), seed=3)).eval()
    path = tmp_path / f"{timm_name}_timm.pth"
    torch.save(ref.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert "stages.0.blocks.0.gamma" in sd and sd["stages.0.blocks.0.gamma"].dim() == 1
    model = vafunc.get_model("convnext_tiny", **({} if block_setting is None else {"block_setting": block_setting}))
    with pytest.warns(UserWarning, match="timm ConvNeXt keys"):
        params, state = vafunc.from_state_dict(model, sd)
    assert state == {}
    flat = vafunc.to_state_dict(params, state)
    c = model.config.block_setting[0][0]
    assert flat["features.1.0.layer_scale"].shape == (c, 1, 1)
    assert flat["features.1.0.block.3.weight"].shape == (4 * c, c)
    assert torch.equal(flat["features.1.0.layer_scale"].flatten(), sd["stages.0.blocks.0.gamma"])
    x = torch.randn(2, 3, 45, 64)
    with torch.no_grad():
        want = ref(x)
        got, _ = model.apply(params, state, x)
        depends_on_blocks(model, params, state, x)
    assert float((want - want.mean(0)).abs().max()) > 1e-3 * float(want.abs().max())  # depends on x
    close(got, want)


def test_torchvision_names_pass_the_remap_untouched():
    model = vafunc.get_model("convnext_tiny")
    sd = vafunc.to_state_dict(*model.init(0))
    flat, notes = convnext.remap(model.config, dict(sd))
    assert notes == [] and list(flat) == list(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vafunc.from_state_dict(model, sd)


def test_timm_keys_without_a_rule_are_listed():
    model = vafunc.get_model("convnext_tiny")
    with torch.device("meta"):
        sd = timm.create_model("convnext_tiny", pretrained=False).state_dict()
    sd["head.pre_logits.fc.weight"] = torch.zeros(3)
    with pytest.warns(UserWarning), pytest.raises(vafunc.StateDictMismatch, match="head.pre_logits"):
        vafunc.from_state_dict(model, sd)


def test_blocks_match_torchvision_at_unit_layer_scale():
    """Eval and train outputs and every parameter gradient equal torchvision's, with the
    residual branches weighing in (layer scales of order one)."""
    torch.manual_seed(0)
    ref = scale_up(perturb(tv_convnext(SMALL, num_classes=7), seed=4), seed=1)
    model = vafunc.get_model("convnext_tiny", block_setting=SMALL, num_classes=7, stochastic_depth_prob=0.0)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    x = torch.randn(3, 3, 40, 48)
    with torch.no_grad():
        depends_on_blocks(model, params, state, x)
        close(model.apply(params, state, x)[0], ref.eval()(x))
    ref.train()
    want = ref(x)
    want.square().sum().backward()
    grads = dict(ref.named_parameters())

    def loss(p):
        y, _ = model.apply(p, state, x, train=True)
        return y.square().sum(), y

    g, got = torch.func.grad(loss, has_aux=True)(params)
    close(got, want.detach())
    flat = vafunc.to_state_dict(g, {})
    assert list(flat) == list(grads)
    for k, v in flat.items():
        close(v, grads[k].grad, tol=1e-4)


def test_stochastic_depth_is_keyed_per_block():
    """Train mode with a key: with ``stochastic_depth_prob=1`` the last block drops its branch
    (rate 1: identity) and the first keeps it (rate 0); the same key gives the same output."""
    model = vafunc.get_model("convnext_tiny", block_setting=SMALL, stochastic_depth_prob=1.0)
    assert [b.drop_path for s in convnext.plan(model.config) for b in s] == [0.0, 1 / 3, 2 / 3, 1.0]
    params, state = vafunc.from_state_dict(model, scale_up(tv_convnext(SMALL)).state_dict())
    x = torch.randn(4, 3, 32, 32)
    names = ["features.1.0", "features.3.0", "features.3.1"]
    key = vafunc.random.key(5)
    with torch.no_grad():
        ev, _ = model.features(params, state, x, names)
        tr, _ = model.features(params, state, x, names, train=True, rng=key)
        again, _ = model.features(params, state, x, names, train=True, rng=key)
        with pytest.raises(ValueError, match="needs randomness"):
            model.apply(params, state, x, train=True)
    close(tr["features.1.0"], ev["features.1.0"])
    torch.testing.assert_close(tr["features.3.1"], tr["features.3.0"], rtol=0, atol=0)
    for n in names:
        assert torch.equal(tr[n], again[n])


@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_small", "convnext_xlarge"])
def test_stochastic_depth_schedule_is_torchvisions(name):
    ref = build_reference_meta(name, stochastic_depth_prob=0.3)
    want = [m.p for m in ref.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    cfg = vafunc.get_model(name, stochastic_depth_prob=0.3).config
    assert [b.drop_path for s in convnext.plan(cfg) for b in s] == want


def test_registered_rates_are_torchvisions():
    for name, p in [
        ("convnext_tiny", 0.1),
        ("convnext_small", 0.4),
        ("convnext_base", 0.5),
        ("convnext_large", 0.5),
        ("convnext_xlarge", 0.0),
    ]:
        ref = build_reference_meta(name)
        want = max(m.p for m in ref.modules() if isinstance(m, torchvision.ops.StochasticDepth))
        assert vafunc.get_model(name).config.stochastic_depth_prob == p == pytest.approx(want)


def test_block_setting_accepts_cnblockconfig_and_checks_channels():
    tv = [CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 2)]
    cfg = vafunc.get_model("convnext_tiny", block_setting=tv).config
    assert cfg.block_setting == ((32, 64, 1), (64, None, 2))
    assert vafunc.get_model("convnext_tiny", block_setting=[[32, 64, 1], [64, None, 2]]).config == cfg
    with pytest.raises(ValueError, match="starts with 48"):
        vafunc.get_model("convnext_tiny", block_setting=((32, 64, 1), (48, None, 2)))
    with pytest.raises(ValueError, match="empty"):
        vafunc.get_model("convnext_tiny", block_setting=())
    with pytest.raises(ValueError, match="num_layers"):
        vafunc.get_model("convnext_tiny", block_setting=((32, None, 0),))
    with pytest.raises(ValueError, match="stochastic_depth_prob"):
        vafunc.get_model("convnext_tiny", stochastic_depth_prob=1.5)
    with pytest.raises(TypeError, match="layer_scale"):
        vafunc.get_model("convnext_tiny", layer_scale="1e-6")


def test_init_matches_torchvision_scheme():
    """torchvision's ``trunc_normal_(std=0.02)`` conv/linear weights (its bounds are the absolute
    +-2, so in effect a plain normal), zero biases, LayerNorm 1/0, layer scale at its value."""
    model = vafunc.get_model("convnext_tiny", block_setting=SMALL, layer_scale=0.25)
    flat = vafunc.to_state_dict(*model.init(1))
    assert list(flat) == list(tv_convnext(SMALL).state_dict())
    for k in ("features.1.0.block.3.weight", "features.3.1.block.5.weight", "features.1.0.block.0.weight"):
        assert abs(float(flat[k].std()) - 0.02) < 0.0015, k
    assert torch.equal(flat["features.1.0.block.3.bias"], torch.zeros(128))
    assert torch.equal(flat["features.1.0.layer_scale"], torch.full((32, 1, 1), 0.25))
    assert torch.equal(flat["features.0.1.weight"], torch.ones(32))
    assert torch.equal(flat["classifier.0.bias"], torch.zeros(64))


def test_features_equal_the_torchvision_module_outputs():
    """Every feature name is a torchvision module path (create_feature_extractor accepts them all)
    whose output (a forward hook's) it equals; the stages have strides 4, 8, 16, 32. Values come
    from hooks: torchvision's FX extractor returns, for a stage, a node before CNBlock's in-place
    ``result += input`` (the layer-scaled branch of the last block alone)."""
    torch.manual_seed(0)
    ref = scale_up(perturb(build_reference("convnext_tiny"), seed=2)).eval()
    model = vafunc.get_model("convnext_tiny")
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    names = model.feature_names
    assert names[:5] == ["features.0", "features.1.0", "features.1.1", "features.1.2", "features.1"]
    assert [n for n in names if n.count(".") == 1] == [f"features.{i}" for i in range(8)]
    create_feature_extractor(ref, names)
    want, modules = {}, dict(ref.named_modules())
    for n in names:
        modules[n].register_forward_hook(lambda mod, args, out, n=n: want.__setitem__(n, out.clone()))
    x = torch.randn(2, 3, 72, 64)
    with torch.no_grad():
        ref(x)
        got, _ = model.features(params, state, x, names)
        depends_on_blocks(model, params, state, x)
    assert list(got) == names == list(want)
    for n in names:
        close(got[n], want[n])
    shapes = model.feature_shapes(224)
    assert [shapes[f"features.{i}"][-1] for i in (1, 3, 5, 7)] == [56, 28, 14, 7]
