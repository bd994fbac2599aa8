"""Mobile / efficient CNNs (MobileNet V1-V3, MNASNet, EfficientNet B0-B7 and V2): what the
registry-driven oracle harness does not cover.

- config keywords (width/depth multipliers, custom stage tables, MobileNetV3's reduced tail and
  dilation, other MNASNet alphas) build the same network as torchvision / timm;
- the shared blocks: make_divisible against the three reference roundings;
- feature taps equal the reference's module outputs under the same names;
- initialisation follows the reference's scheme (distribution per layer type);
- stochastic depth and dropout: torchvision's schedule, per-sample masks, the drop rate and the
  1/(1-p) rescaling, distinct masks per vmapped member, same key -> same output eager and
  compiled;
- MNASNet checkpoint versions 1 and 2.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torchvision
from oracle import perturb

import vafunc
from vafunc.core import blocks as B
from vafunc.core import layers as L
from vafunc.core import random as vr
from vafunc.models import efficientnet as E

tvm = torchvision.models


def _close(a, b, rel=1e-5, floor=1e-6):
    scale = max(float(b.abs().max()), floor)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x {scale:.3g}"


def _load(model, ref):
    return vafunc.from_state_dict(model, {k: v.detach().clone() for k, v in ref.state_dict().items()})


def _eval_parity(model, ref, size=(35, 42), batch=2, seed=0):
    """Same state_dict names/shapes and eval logits as the (perturbed) reference."""
    ref = perturb(ref.eval(), seed=seed)
    assert model.state_dict_shapes() == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    params, state = _load(model, ref)
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        _close(model.apply(params, state, x)[0], ref(x))
    return params, state, ref


# --------------------------------------------------------------------------- config keywords


@pytest.mark.parametrize(
    "kw",
    [
        dict(width_mult=0.75, num_classes=10),
        dict(width_mult=1.4, round_nearest=4),
        dict(inverted_residual_setting=[[1, 16, 1, 1], [2, 24, 2, 2], [1.5, 40, 1, 2], [4, 48, 2, 1]]),
    ],
)
def test_mobilenet_v2_keywords_match_torchvision(kw):
    _eval_parity(vafunc.get_model("mobilenet_v2", **kw), tvm.mobilenet_v2(**kw))


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
@pytest.mark.parametrize(
    "kw", [dict(width_mult=0.75), dict(reduced_tail=True, dilated=True, num_classes=5)], ids=["width", "tail"]
)
def test_mobilenet_v3_keywords_match_torchvision(name, kw):
    model = vafunc.get_model(name, **kw)
    params, state, ref = _eval_parity(model, getattr(tvm, name)(**kw))
    if kw.get("dilated"):
        # the dilated tail keeps stride 16 (segmentation backbone) and train mode still agrees
        ref.train()
        x = torch.randn(2, 3, 40, 40)
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            want = ref(x)
        got, _ = vafunc.get_model(name, dropout=0.0, **kw).apply(params, state, x, train=True)
        _close(got, want)
        feats, _ = model.features(params, state, x, [model.feature_names[-1]])
        assert feats[model.feature_names[-1]].shape[-1] == 40 // 16 + (40 % 16 > 0)


@pytest.mark.parametrize("alpha", [0.35, 1.1])
def test_mnasnet_other_alpha_matches_torchvision(alpha):
    from torchvision.models.mnasnet import MNASNet

    ref = MNASNet(alpha, num_classes=11)
    model = vafunc.get_model("mnasnet1_0", alpha=alpha, num_classes=11)
    _eval_parity(model, ref)


@pytest.mark.parametrize("width, depth", [(0.5, 0.6), (1.3, 1.0)])
def test_efficientnet_width_depth_match_torchvision(width, depth):
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=width, depth_mult=depth)
    ref = EfficientNet(setting, 0.2, last_channel=last, num_classes=9)
    model = vafunc.get_model("efficientnet_b0", width_mult=width, depth_mult=depth, num_classes=9)
    _eval_parity(model, ref, size=(33, 37))


def test_mobilenet_v1_width_matches_timm():
    import timm

    ref = timm.create_model("mobilenetv1_125", pretrained=False, num_classes=13)
    _eval_parity(vafunc.get_model("mobilenet_v1", width_mult=1.25, num_classes=13), ref)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="EfficientNetV2"):
        vafunc.get_model("efficientnet_v2_s", width_mult=1.2)
    with pytest.raises(ValueError, match="stochastic_depth_prob"):
        vafunc.get_model("efficientnet_b0", stochastic_depth_prob=1.5)
    with pytest.raises(ValueError, match="inverted_residual_setting"):
        vafunc.get_model("mobilenet_v2", inverted_residual_setting=[[1, 16, 1]])
    with pytest.raises(ValueError, match="arch"):
        vafunc.get_model("mobilenet_v3_small", arch="medium")
    with pytest.raises(ValueError, match="alpha"):
        vafunc.get_model("mnasnet1_0", alpha=0.0)
    m = vafunc.get_model("efficientnet_v2_s")  # torchvision's minimum for V2 is 33x33
    p, s = m.init(0)
    with pytest.raises(ValueError, match="at least 33x33"):
        m.apply(p, s, torch.randn(1, 3, 32, 40))


# --------------------------------------------------------------------------- shared blocks


def test_make_divisible_matches_every_reference_rounding():
    import timm
    from torchvision.models._utils import _make_divisible
    from torchvision.models.mnasnet import _round_to_multiple_of

    for v10 in range(10, 30000, 7):
        v = v10 / 10
        for d in (4, 8, 16):
            want = _make_divisible(v, d)
            assert B.make_divisible(v, d) == want == timm.layers.make_divisible(v, d)
            assert B.make_divisible(v, d) == _round_to_multiple_of(v, d)


def test_one_block_implementation_serves_every_layout():
    """The same mbconv placed in the four layouts gives the four reference key sets."""
    args = dict(expanded=96, kernel=3, stride=1, act="relu")

    def paths(block, cin, cout, **kw):  # the block's module paths, in init (state_dict) order
        ini = vafunc.core.init.Initializer.from_key(0, device="meta")
        m = vafunc.core.kit.Scope({}, None, ini=ini, defaults={"conv": "kaiming_fan_out"})
        block(m, torch.empty(1, cin, 8, 8, device="meta"), cout, **kw)
        return list(dict.fromkeys(tuple(k.split(".")[:-1]) for k in vafunc.flatten(m.p)))

    assert paths(B.mbconv, 16, 16, names=B.TORCHVISION, se=24, **args) == [
        ("block", "0", "0"),
        ("block", "0", "1"),
        ("block", "1", "0"),
        ("block", "1", "1"),
        ("block", "2", "fc1"),
        ("block", "2", "fc2"),
        ("block", "3", "0"),
        ("block", "3", "1"),
    ]
    assert paths(B.mbconv, 16, 16, names=B.MOBILENET_V2, **args) == [
        ("conv", "0", "0"),
        ("conv", "0", "1"),
        ("conv", "1", "0"),
        ("conv", "1", "1"),
        ("conv", "2"),
        ("conv", "3"),
    ]
    assert paths(B.mbconv, 16, 16, names=B.MNASNET, **args) == [
        ("layers", "0"),
        ("layers", "1"),
        ("layers", "3"),
        ("layers", "4"),
        ("layers", "6"),
        ("layers", "7"),
    ]
    assert paths(B.depthwise_separable, 16, 32, act="relu6", names=B.TIMM_DS) == [
        ("conv_dw",),
        ("bn1",),
        ("conv_pw",),
        ("bn2",),
    ]


# --------------------------------------------------------------------------- feature taps


def _hooked(ref, names):
    got = {}
    mods = dict(ref.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone())) for n in names]
    return got, hs


@pytest.mark.parametrize(
    "name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s"]
)
def test_feature_taps_are_the_reference_module_outputs(name):
    from oracle import build_reference

    model = vafunc.get_model(name)
    ref = perturb(build_reference(name), seed=3)
    params, state = _load(model, ref)
    names = model.feature_names
    assert len(names) == len(set(names)) and len(names) > 10
    x = torch.randn(2, 3, 40, 45)
    got_ref, hooks = _hooked(ref, names)
    try:
        with torch.no_grad():
            ref(x)
            feats, _ = model.features(params, state, x, names)
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        _close(feats[n], got_ref[n])
    # asking for an early feature stops before the head
    taps = L.Taps([names[1]])
    logits, _ = model.family.apply(model.config, params, state, x, train=False, taps=taps)
    assert logits is None and set(taps.got) == {names[1]}


# --------------------------------------------------------------------------- init schemes


@pytest.mark.parametrize(
    "name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0"]
)
def test_init_follows_the_reference_scheme(name):
    from oracle import build_reference

    torch.manual_seed(0)
    ref = {k: v for k, v in build_reference(name).state_dict().items()}
    mine = vafunc.to_state_dict(*vafunc.get_model(name).init(1))
    for k, want in ref.items():
        got = mine[k]
        if not want.is_floating_point() or want.numel() == 1 or float(want.std()) == 0.0:
            assert torch.equal(got, want), k  # constants: BN 1/0, running stats, zero biases
        elif want.numel() >= 2000:
            ratio = float(got.std()) / float(want.std())
            assert 0.9 < ratio < 1.1, f"{k}: std {float(got.std()):.4g} vs reference {float(want.std()):.4g}"
            # E|x| / std tells the distributions apart: uniform 0.866, normal 0.798
            shape = lambda t: float(t.abs().mean() / t.std())  # noqa: E731
            assert abs(shape(got) - shape(want)) < 0.03, f"{k}: not the reference's distribution"


# --------------------------------------------------------------------------- stochastic depth / dropout


def test_stochastic_depth_schedule_is_torchvisions():
    for name in ["efficientnet_b3", "efficientnet_v2_s"]:
        ref = getattr(tvm, name)(stochastic_depth_prob=0.3)
        want = [m.p for m in ref.modules() if type(m).__name__ == "StochasticDepth"]
        _, stages, _ = E.plan(vafunc.get_model(name, stochastic_depth_prob=0.3).config)
        got = [b.drop_path for stage in stages for b in stage]
        assert len(got) == len(want)
        assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in zip(got, want))


def _block_and_params(p_drop: float):
    """A real residual MBConv of efficientnet_b0 (features.2.1) with its weights."""
    model = vafunc.get_model("efficientnet_b0", stochastic_depth_prob=0.0)
    _, stages, _ = E.plan(model.config)
    blk = stages[1][1]
    assert blk.residual
    params, state = model.init(0)
    return blk._replace(drop_path=p_drop), params["features"]["2"]["1"], state["features"]["2"]["1"]


def test_drop_path_rate_and_rescaling_per_sample():
    p = 0.3
    blk, bp, bs = _block_and_params(p)
    x = torch.randn(4000, 24, 3, 3)
    with torch.no_grad():
        full = E.block(vafunc.core.kit.Scope(bp, bs, train=True), x, blk._replace(drop_path=0.0))
        y = E.block(vafunc.core.kit.Scope(bp, bs, train=True, rng=vr.key(11)), x, blk)
    branch, out = full - x, y - x
    kept = out.flatten(1).abs().amax(1) > 0
    dropped = ~kept
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))  # whole samples, not elements
    _close(out[kept], branch[kept] / (1 - p), 1e-5)  # survivors rescaled by 1/(1-p)
    frac, sd = float(kept.float().mean()), math.sqrt(p * (1 - p) / 4000)
    assert abs(frac - (1 - p)) < 4 * sd, f"survival {frac:.4f}, expected {1 - p} +- {4 * sd:.4f}"


def test_head_dropout_rate_and_rescaling():
    p = 0.4
    model = vafunc.get_model("mobilenet_v3_small", num_classes=1024, dropout=p)
    params, state = model.init(0)
    params = dict(params, classifier=dict(params["classifier"]))
    params["classifier"]["3"] = {"weight": torch.eye(1024), "bias": torch.zeros(1024)}
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        y, _ = model.apply(params, state, x, train=True, rng=vr.key(3))
        clean, _ = vafunc.get_model("mobilenet_v3_small", num_classes=1024, dropout=0.0).apply(
            params, state, x, train=True
        )
    kept = y != 0
    frac, sd = float(kept.float().mean()), math.sqrt(p * (1 - p) / y.numel())
    assert abs(frac - (1 - p)) < 4 * sd
    _close(y[kept], clean[kept] / (1 - p), 1e-5)


def test_train_without_rng_raises_when_rates_are_nonzero():
    model = vafunc.get_model("efficientnet_b0", num_classes=3)
    params, state = model.init(0)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, state, x, train=True)
    model.apply(params, state, x, train=False)  # eval needs no key


def test_vmapped_keys_draw_their_own_masks():
    model = vafunc.get_model("efficientnet_b0", num_classes=5, stochastic_depth_prob=0.8, dropout=0.5)
    params, state = model.init(0)
    x = torch.randn(4, 3, 32, 32)
    keys = vr.split(vr.key(7), 4)
    run = torch.vmap(lambda k, s: model.apply(params, s, x, train=True, rng=k)[0])
    with torch.no_grad():
        out = run(keys, vafunc.stack([state] * 4))
        for i in range(4):
            # (1e-3: train-mode BN at 1x1 spatial size amplifies vmap's rounding differences;
            # a different mask would differ by O(1))
            _close(out[i], model.apply(params, state, x, train=True, rng=keys[i])[0], 1e-3)
        same = run(keys[:1].expand(3, 2), vafunc.stack([state] * 3))
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(out[i], out[j]), f"members {i} and {j} drew the same masks"
    _close(same[1], same[0], 1e-3)  # same key: same masks (up to rounding, as above)
    _close(same[2], same[0], 1e-3)
    # stochastic depth alone (no dropout) also differs per member, per sample
    sd_only = vafunc.get_model("efficientnet_b0", num_classes=5, stochastic_depth_prob=0.8, dropout=0.0)
    with torch.no_grad():
        o = torch.vmap(lambda k, s: sd_only.apply(params, s, x, train=True, rng=k)[0])(keys, vafunc.stack([state] * 4))
    assert not torch.allclose(o[0], o[1])


@pytest.mark.slow
def test_same_key_same_output_eager_and_compiled():
    torch._dynamo.reset()
    model = vafunc.get_model("efficientnet_b0", num_classes=6, stochastic_depth_prob=0.5, dropout=0.3)
    params, state = model.init(0)
    x = torch.randn(3, 3, 33, 35)
    fn = torch.compile(lambda p, s, x, k: model.apply(p, s, x, train=True, rng=k), fullgraph=True)
    with torch.no_grad():
        k1, k2 = vr.split(vr.key(1))
        want1, st1 = model.apply(params, state, x, train=True, rng=k1)
        again, _ = model.apply(params, state, x, train=True, rng=k1)
        got1, gst1 = fn(params, state, x, k1)
        got2, _ = fn(params, state, x, k2)
        want2, _ = model.apply(params, state, x, train=True, rng=k2)
    assert torch.equal(want1, again)
    _close(got1, want1, 1e-4)
    _close(got2, want2, 1e-4)
    assert not torch.allclose(want1, want2)
    for k, v in vafunc.flatten(st1).items():
        if v.is_floating_point():  # (floor: some fresh-init running means are exactly 0 + rounding)
            _close(vafunc.flatten(gst1)[k], v, 1e-4, floor=1e-2)


# --------------------------------------------------------------------------- MNASNet versions


def _v1_checkpoint(name, seed=0):
    """A torchvision version-1 MNASNet checkpoint: vafunc's stem_version=1 network, saved with
    ``_metadata`` version 1 as old torchvision did."""
    m = vafunc.get_model(name, stem_version=1)
    sd = collections.OrderedDict(vafunc.to_state_dict(*m.init(seed)))
    sd._metadata = {"": {"version": 1}}
    return m, sd


def test_mnasnet_v1_checkpoint_for_alpha_1_loads_as_is():
    from torchvision.models.mnasnet import MNASNet

    # alpha=1: version-1 and version-2 layouts coincide, so the default model takes it
    m1, sd = _v1_checkpoint("mnasnet1_0")
    model = vafunc.get_model("mnasnet1_0")
    assert m1.state_dict_shapes() == model.state_dict_shapes()
    params, state = vafunc.from_state_dict(model, dict(sd))  # a plain dict, no _metadata
    ref = MNASNet(1.0).eval()
    ref.load_state_dict(sd)
    x = torch.randn(2, 3, 36, 40)
    with torch.no_grad():
        _close(model.apply(params, state, x)[0], ref(x))


@pytest.mark.parametrize("name, alpha", [("mnasnet0_5", 0.5), ("mnasnet1_3", 1.3)])
def test_mnasnet_v1_checkpoint_other_alpha(name, alpha):
    from torchvision.models.mnasnet import MNASNet

    m1, sd = _v1_checkpoint(name)
    # the default (version-2) model cannot hold it: a clear error naming the version and the fix
    with pytest.raises(ValueError, match=r"version-1 torchvision MNASNet checkpoint.*stem_version=1"):
        vafunc.from_state_dict(vafunc.get_model(name), sd)
    # stem_version=1 is torchvision's version-1 network (torchvision swaps in the old stem)
    with pytest.warns(UserWarning, match="previous version"):
        ref = MNASNet(alpha).eval()
        ref.load_state_dict(sd)
    ref = perturb(ref, seed=4)
    sd_p = collections.OrderedDict((k, v.detach().clone()) for k, v in ref.state_dict().items())
    params, state = vafunc.from_state_dict(m1, sd_p)
    x = torch.randn(2, 3, 33, 38)
    with torch.no_grad():
        _close(m1.apply(params, state, x)[0], ref(x))
    # and a version-2 checkpoint into the version-1 model is refused the other way round
    v2 = vafunc.to_state_dict(*vafunc.get_model(name).init(0))
    with pytest.raises(ValueError, match="version-2 torchvision MNASNet checkpoint"):
        vafunc.from_state_dict(m1, v2)
