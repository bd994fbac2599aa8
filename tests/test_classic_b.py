"""DenseNet, Xception and BN-Inception: the features the generic oracle harness does not cover.

* DenseNet: torchvision's 2017 checkpoint names load through ``remap`` and give the same outputs;
  dense-layer dropout sits where torchvision's does (checked by driving torchvision's dropout
  with vafunc's masks); ``memory_efficient`` changes nothing; feature taps equal the outputs of
  torchvision's modules of the same path.
* Xception: taps against timm's modules; head dropout placement; ``in_channels``/``num_classes``
  against timm's ``in_chans``/``num_classes``; the 7-pixel minimum against timm.
* BN-Inception: oracle comparison at the sizes the reference runs (223-230 px: its head is a fixed
  7x7 pool), features at other sizes, taps, the odd-size reduction pool, the recorded input
  convention of the published weights.
"""

from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import ORACLE_SIZES, perturb
from torch.func import grad

import vafunc
from vafunc.core import layers as L
from vafunc.core import random as vrandom


def _close(a, b, rel=1e-5, what=""):
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"


def _load(model, ref):
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    return vafunc.from_state_dict(model, sd)


def _hooked_outputs(ref, names):
    """Forward hooks that record (clones of) the outputs of the named reference modules."""
    got, handles = {}, []
    mods = dict(ref.named_modules())
    for n in names:
        assert n in mods, f"{n} is not a module path of the reference"
        handles.append(mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone())))
    return got, handles


def _patched_functional(fake_dropout):
    """A stand-in for ``torch.nn.functional`` whose ``dropout`` is ``fake_dropout``."""
    ns = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    ns.dropout = fake_dropout
    return ns


def _keyed_dropout(rng, keys_of_call):
    """An ``F.dropout`` replacement that draws vafunc's mask for the i-th call from
    ``keys_of_call(rng, i)``, so a torch reference and vafunc can be compared with dropout on."""
    calls = []

    def dropout(x, p=0.5, training=True, inplace=False):
        k = keys_of_call(rng, len(calls))
        calls.append(p)
        return L.dropout(x, p, k, train=training)

    return dropout, calls


# =========================================================================== DenseNet

TINY_DENSENET = dict(growth_rate=8, block_config=(2, 3, 2, 2), num_init_features=16, bn_size=2)


@pytest.fixture(scope="module")
def densenet121_pair():
    torch.manual_seed(0)
    ref = perturb(torchvision.models.densenet121().eval(), seed=3)
    model = vafunc.get_model("densenet121")
    return model, ref


def _legacy_names(sd):
    """torchvision's 2017 DenseNet checkpoint layout: ``norm.1``/``conv.1``/``norm.2``/``conv.2``
    in dense layers, and no ``num_batches_tracked`` buffers (they did not exist yet)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if ".denselayer" in k:
            for mod in ("norm1", "conv1", "norm2", "conv2"):
                k = k.replace(f".{mod}.", f".{mod[:-1]}.{mod[-1]}.")
        out[k] = v
    return out


def test_densenet_legacy_checkpoint_loads_and_matches(densenet121_pair):
    model, ref = densenet121_pair
    legacy = _legacy_names(ref.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock2.denselayer3.conv.2.weight" in legacy
    assert not any(k.endswith("num_batches_tracked") for k in legacy)
    # torchvision itself cannot load this without its regex: the names really are the old ones
    with pytest.raises(RuntimeError):
        torchvision.models.densenet121().load_state_dict(legacy)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        params, state = vafunc.from_state_dict(model, legacy)
    messages = [str(w.message) for w in rec]
    assert any("renamed 580 legacy DenseNet keys" in m for m in messages), messages
    assert any("added 121 missing BatchNorm num_batches_tracked" in m for m in messages), messages
    flat = vafunc.to_state_dict(params, state)
    assert list(flat) == list(ref.state_dict()), "remapped checkpoint not in torchvision's key order"
    for k, v in ref.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert int(flat[k]) == 0 and flat[k].dtype == torch.int64
        else:
            assert torch.equal(flat[k], v), k
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        want = ref(x)
    got, _ = model.apply(params, state, x)
    _close(got, want, what="densenet121 from a legacy checkpoint")


def test_densenet_remap_leaves_current_names_alone(densenet121_pair, recwarn):
    model, ref = densenet121_pair
    sd = ref.state_dict()
    flat, notes = model.family.remap(model.config, dict(sd))
    assert notes == [] and list(flat) == list(sd)
    vafunc.from_state_dict(model, sd)
    assert not [w for w in recwarn if "densenet" in str(w.message).lower()]


def test_densenet_legacy_checkpoint_with_wrong_shapes_still_fails(densenet121_pair):
    model, ref = densenet121_pair
    legacy = _legacy_names(ref.state_dict())
    legacy["features.denseblock1.denselayer1.conv.1.weight"] = torch.zeros(3, 3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(vafunc.StateDictMismatch, match="denselayer1.conv1.weight"):
            vafunc.from_state_dict(model, legacy)


def test_densenet_dropout_matches_torchvision_with_the_same_masks(monkeypatch):
    """Dropout after every dense layer (on its new features, before the concatenation), scaled by
    1/(1-p): torchvision's ``F.dropout`` is replaced by vafunc's masks for the same layer index."""
    cfg = dict(TINY_DENSENET, drop_rate=0.3)
    torch.manual_seed(0)
    ref = perturb(torchvision.models.DenseNet(**cfg), seed=1).train()
    model = vafunc.get_model("densenet121", **cfg)
    params, state = _load(model, ref)
    rng = vrandom.key(11)
    fake, calls = _keyed_dropout(rng, vrandom.fold_in)
    monkeypatch.setattr(torchvision.models.densenet, "F", _patched_functional(fake))
    x = torch.randn(3, 3, 40, 47)
    with torch.no_grad():
        want = ref(x)
    assert calls == [0.3] * sum(cfg["block_config"])
    got, new_state = model.apply(params, state, x, train=True, rng=rng)
    _close(got, want, what="train logits with dropout")
    for k, v in vafunc.flatten(new_state).items():
        _close(v.double(), dict(ref.named_buffers())[k].double(), what=k)
    # the masks really act: another key gives another output, the same key the same one
    again, _ = model.apply(params, state, x, train=True, rng=rng)
    other, _ = model.apply(params, state, x, train=True, rng=vrandom.key(12))
    assert torch.equal(again, got) and not torch.allclose(other, got)


def test_densenet_dropout_needs_rng_in_train_mode():
    model = vafunc.get_model("densenet121", **TINY_DENSENET, drop_rate=0.2)
    params, state = model.init(0)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, state, x, train=True)
    # eval mode and drop_rate 0 need none
    model.apply(params, state, x)
    vafunc.get_model("densenet121", **TINY_DENSENET).apply(params, state, x, train=True)


def test_densenet_memory_efficient_is_the_same_function():
    torch.manual_seed(0)
    ref = perturb(torchvision.models.DenseNet(**TINY_DENSENET, memory_efficient=True), seed=2).train()
    model = vafunc.get_model("densenet121", **TINY_DENSENET, memory_efficient=True)
    assert model.config.memory_efficient is True
    params, state = _load(model, ref)
    x = torch.randn(2, 3, 33, 36)
    w = torch.randn(2, 1000)
    (ref(x) * w).sum().backward()
    got = vafunc.flatten(grad(lambda p: (model.apply(p, state, x, train=True)[0] * w).sum())(params))
    for k, prm in ref.named_parameters():
        _close(got[k], prm.grad, 1e-4, k)


def test_densenet_taps_are_torchvision_module_outputs():
    torch.manual_seed(0)
    ref = perturb(torchvision.models.DenseNet(**TINY_DENSENET), seed=4).eval()
    model = vafunc.get_model("densenet121", **TINY_DENSENET)
    params, state = _load(model, ref)
    names = ["features.relu0", "features.pool0", "features.norm5"]
    for b, n in enumerate(TINY_DENSENET["block_config"], 1):
        names += [f"features.denseblock{b}.denselayer{j}" for j in range(1, n + 1)] + [f"features.denseblock{b}"]
        if b < 4:
            names.append(f"features.transition{b}")
    got_ref, handles = _hooked_outputs(ref, names)
    x = torch.randn(2, 3, 41, 35)
    try:
        with torch.no_grad():
            ref(x)
    finally:
        for h in handles:
            h.remove()
    taps = L.Taps(None)
    model.apply(params, state, x, taps=taps)
    assert set(taps.got) == set(names)
    for n in names:
        _close(taps.got[n], got_ref[n], what=f"tap {n}")
    # asking for an early feature stops before the head
    early = L.Taps(["features.transition1"])
    logits, st = model.apply(params, state, x, taps=early)
    assert logits is None and st is state and set(early.got) == {"features.transition1"}


def test_densenet_min_size_is_torchvisions():
    ref = torchvision.models.DenseNet(**TINY_DENSENET).eval()
    model = vafunc.get_model("densenet121", **TINY_DENSENET)
    params, state = _load(model, ref)
    m = model.min_size
    assert m == 29
    with torch.no_grad():
        x = torch.randn(1, 3, m, m + 3)
        _close(model.apply(params, state, x)[0], ref(x), what="at the minimum size")
        with pytest.raises(RuntimeError):
            ref(torch.randn(1, 3, m - 1, m))
    with pytest.raises(ValueError, match=f"at least {m}x{m}"):
        model.apply(params, state, torch.randn(1, 3, m - 1, m))
    assert vafunc.get_model("densenet121", block_config=(2, 2)).min_size == 5
    assert vafunc.get_model("densenet121", block_config=(2, 2, 2)).min_size == 13


@pytest.mark.parametrize(
    "bad", [dict(growth_rate=0), dict(block_config=(6, 0, 2)), dict(drop_rate=1.5), dict(block_config=3)]
)
def test_densenet_rejects_bad_config(bad):
    with pytest.raises((ValueError, TypeError)):
        vafunc.get_model("densenet121", **bad)


# =========================================================================== Xception

import timm  # noqa: E402 - the section's oracle


@pytest.fixture(scope="module")
def xception_pair():
    torch.manual_seed(0)
    ref = perturb(timm.create_model("legacy_xception", pretrained=False).eval(), seed=5)
    model = vafunc.get_model("xception")
    params, state = _load(model, ref)
    return model, ref, params, state


def test_xception_taps_are_timm_module_outputs(xception_pair):
    model, ref, params, state = xception_pair
    names = ["act1", "act2"] + [f"block{i}" for i in range(1, 13)] + ["conv3", "act3", "conv4", "act4"]
    got_ref, handles = _hooked_outputs(ref, names)
    x = torch.randn(2, 3, 37, 50)
    try:
        with torch.no_grad():
            ref(x)
    finally:
        for h in handles:
            h.remove()
    taps = L.Taps(None)
    model.apply(params, state, x, taps=taps)
    assert list(taps.got) == names
    for n in names:
        _close(taps.got[n], got_ref[n], what=f"tap {n}")


def test_xception_minimum_size_is_timms(xception_pair):
    model, ref, params, state = xception_pair
    assert model.min_size == 7
    for h, w in [(7, 7), (7, 12), (9, 8)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            _close(model.apply(params, state, x)[0], ref(x), what=f"xception at {h}x{w}")
    with pytest.raises(RuntimeError), torch.no_grad():
        ref(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="at least 7x7"):
        model.apply(params, state, torch.randn(1, 3, 6, 30))


def test_xception_head_dropout_matches_timm_with_the_same_mask(monkeypatch):
    torch.manual_seed(0)
    ref = perturb(timm.create_model("legacy_xception", pretrained=False, drop_rate=0.4), seed=6).train()
    model = vafunc.get_model("xception", drop_rate=0.4)
    params, state = _load(model, ref)
    rng = vrandom.key(3)
    fake, calls = _keyed_dropout(rng, lambda k, i: k)
    tx = importlib.import_module("timm.models.xception")  # timm.models.xception is also a function
    monkeypatch.setattr(tx, "F", _patched_functional(fake))
    x = torch.randn(2, 3, 33, 40)
    with torch.no_grad():
        want = ref(x)
    assert calls == [0.4]
    got, _ = model.apply(params, state, x, train=True, rng=rng)
    _close(got, want, what="xception train logits with head dropout")
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, state, x, train=True)


def test_xception_in_channels_and_num_classes_follow_timm():
    torch.manual_seed(0)
    ref = perturb(timm.create_model("legacy_xception", pretrained=False, in_chans=1, num_classes=7), seed=8).eval()
    model = vafunc.get_model("xception", in_channels=1, num_classes=7)
    params, state = _load(model, ref)
    assert vafunc.count_params(params) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 1, 40, 33)
    with torch.no_grad():
        _close(model.apply(params, state, x)[0], ref(x), what="1-channel, 7-class xception")
    with pytest.raises(ValueError, match="1 input channels"):
        model.apply(params, state, torch.randn(2, 3, 40, 33))


# =========================================================================== BN-Inception

import pretrainedmodels  # noqa: E402 - the section's oracle

#: the reference's fixed 7x7 average pool + flatten only runs at these input sizes
REF_SIZES = range(223, 231)


@pytest.fixture(scope="module")
def bninception_pair():
    torch.manual_seed(0)
    ref = perturb(pretrainedmodels.bninception(pretrained=None).eval(), seed=9)
    model = vafunc.get_model("inception_v2")
    params, state = _load(model, ref)
    return model, ref, params, state


def test_bninception_oracle_sizes_are_where_the_reference_runs():
    fixed = ORACLE_SIZES["inception_v2"]
    assert all(h in REF_SIZES and w in REF_SIZES for _, h, w in fixed)
    ref = pretrainedmodels.bninception(pretrained=None).eval()
    with torch.no_grad():
        for h in (REF_SIZES.start - 1, REF_SIZES.stop):
            with pytest.raises(RuntimeError):
                ref(torch.randn(1, 3, h, h))


def test_bninception_eval_and_train_match_the_reference(bninception_pair):
    model, ref, params, state = bninception_pair
    for b, h, w in [(2, 223, 230), (1, 224, 224)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = ref(x)
        got, st = model.apply(params, state, x)
        assert st is state
        _close(got, want, what=f"eval logits at {h}x{w}")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(2, 3, 224, 226)
    weights = torch.randn(2, 1000)
    try:
        ref.train()
        out = ref(x)
        (out * weights).sum().backward()
        got, new_state = model.apply(params, state, x, train=True)
        _close(got.detach(), out.detach(), what="train logits")
        buffers = dict(ref.named_buffers())
        for k, v in vafunc.flatten(new_state).items():
            if k.endswith("num_batches_tracked"):
                assert int(v) == int(buffers[k]), k
            else:
                _close(v, buffers[k], what=k)
        g = vafunc.flatten(grad(lambda p: (model.apply(p, state, x, train=True)[0] * weights).sum())(params))
        for k, prm in ref.named_parameters():
            _close(g[k], prm.grad, 1e-4, f"gradient of {k}")
    finally:
        ref.load_state_dict(sd)
        ref.zero_grad()
        ref.eval()


def test_bninception_features_match_at_other_sizes(bninception_pair):
    """Below the head the reference runs on more sizes (whenever its stride-8/16 maps are even);
    there the last module's output equals ours, so the global-pool head is the only change."""
    model, ref, params, state = bninception_pair
    for b, h, w in [(2, 63, 100), (1, 35, 130)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = ref.features(x)
        taps = L.Taps(["inception_5b_output"])
        logits, _ = model.apply(params, state, x, taps=taps)
        assert logits is None
        _close(taps.got["inception_5b_output"], want, what=f"features at {h}x{w}")
        logits, _ = model.apply(params, state, x)
        with torch.no_grad():
            want_logits = ref.last_linear(want.mean((2, 3)))
        _close(logits, want_logits, what=f"logits at {h}x{w}")


def test_bninception_taps_are_reference_blobs(bninception_pair):
    model, ref, params, state = bninception_pair
    stem = ["conv1_relu_7x7", "pool1_3x3_s2", "conv2_relu_3x3", "pool2_3x3_s2"]
    got_ref, handles = _hooked_outputs(ref, stem)
    # a module's concatenated output is no module of Cadene's: it is the input of the next
    # module's 3x3_reduce conv (and of the global pool for 5b)
    mods = ["3a", "3b", "3c", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    consumers = [f"inception_{m}_3x3_reduce" for m in mods[1:]] + ["global_pool"]
    for m, c in zip(mods, consumers):
        handles.append(
            getattr(ref, c).register_forward_pre_hook(
                lambda mod, inp, n=f"inception_{m}_output": got_ref.__setitem__(n, inp[0].detach().clone())
            )
        )
    x = torch.randn(2, 3, 224, 224)
    try:
        with torch.no_grad():
            ref(x)
    finally:
        for h in handles:
            h.remove()
    taps = L.Taps(None)
    model.apply(params, state, x, taps=taps)
    assert list(taps.got) == stem + [f"inception_{m}_output" for m in mods]
    for n, v in taps.got.items():
        _close(v, got_ref[n], what=f"tap {n}")


def _brute_force_pool(x):
    """3x3/2 max pool whose windows start at 0, 2, 4, ... and are clipped to the image (the
    last one may hang over the bottom/right edge): ceil(H/2) x ceil(W/2) outputs."""
    h, w = x.shape[-2:]
    rows = []
    for i in range(0, h, 2):
        rows.append(torch.stack([x[..., i : i + 3, j : j + 3].amax((-2, -1)) for j in range(0, w, 2)], -1))
    return torch.stack(rows, -2)


@pytest.mark.parametrize("h,w", [(8, 10), (7, 9), (7, 10), (1, 2), (5, 5)])
def test_bninception_reduction_pool(h, w):
    """The reduction modules' pool: ``pad_odd``, then Caffe's ceil-mode 3x3/2 max pool."""
    from vafunc.core import layers as L
    from vafunc.models.bninception import pad_odd

    def reduction_pool(x):
        return L.max_pool2d(pad_odd(x), 3, 2, ceil_mode=True)

    x = torch.randn(2, 3, h, w)
    got = reduction_pool(x)
    assert got.shape[-2:] == ((h + 1) // 2, (w + 1) // 2)
    assert torch.equal(got, _brute_force_pool(x))
    if h % 2 == 0 and w % 2 == 0 and h >= 2:  # exactly Caffe's / Cadene's pool on even maps
        assert torch.equal(got, F.max_pool2d(x, 3, 2, ceil_mode=True))
    fn = torch.compile(reduction_pool, fullgraph=True, backend="eager")
    assert torch.equal(fn(x), got)


def test_bninception_any_size_at_or_above_the_minimum(bninception_pair):
    model, ref, params, state = bninception_pair
    assert model.min_size == 7
    with torch.no_grad():
        for h, w in [(7, 7), (7, 8), (9, 13), (30, 45), (61, 37)]:  # odd stride-8/16 maps included
            out, _ = model.apply(params, state, torch.randn(1, 3, h, w))
            assert out.shape == (1, 1000) and bool(torch.isfinite(out).all()), (h, w)
        with pytest.raises(RuntimeError):  # below the minimum the stem pools have nothing left
            model.family.apply(model.config, params, state, torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="at least 7x7"):
        model.apply(params, state, torch.randn(1, 3, 6, 224))


def test_bninception_records_the_published_input_convention():
    from pretrainedmodels.models.bninception import pretrained_settings

    want = pretrained_settings["bninception"]["imagenet"]
    meta = vafunc.get_model("inception_v2").metadata
    assert meta["input_space"] == want["input_space"] == "BGR"
    assert list(meta["input_range"]) == want["input_range"]
    assert list(meta["mean"]) == want["mean"]
    assert list(meta["std"]) == want["std"]
    assert meta["input_size"] == want["input_size"][-1]
    assert "BGR" in meta["input_convention"] and meta["reference"] == "pretrainedmodels.bninception"


def test_bninception_num_classes_and_in_channels():
    torch.manual_seed(0)
    ref = perturb(pretrainedmodels.bninception(pretrained=None, num_classes=5).eval(), seed=10)
    model = vafunc.get_model("inception_v2", num_classes=5)
    params, state = _load(model, ref)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _close(model.apply(params, state, x)[0], ref(x), what="5-class bninception")
    m1 = vafunc.get_model("inception_v2", in_channels=1)
    p1, _ = m1.init(device="meta")
    assert p1["conv1_7x7_s2"]["weight"].shape == (64, 1, 7, 7)
