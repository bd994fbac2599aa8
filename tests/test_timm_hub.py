"""timm's pretrained tags through the Hugging Face hub, without network: the packaged pretrained
configs equal timm's, and a real hub cache (``tests/hf_cache.py``: the ``models--timm--...`` /
``blobs`` / ``snapshots/<commit>`` / ``refs/main`` layout ``huggingface_hub`` writes) holding
timm's own ``save_for_hf`` output of a randomly initialised timm model loads into a vafunc model
that computes what timm's does; the evaluation transform is timm's; a tag missing from an offline
cache names the repository, the file and the cache."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hf_cache import put_timm_model, repo_folder
from PIL import Image
from skimage import data as skdata

import vafunc
from vafunc import cli
from vafunc.io import hub
from vafunc.io.hub import WeightsError, timm_hub

ROOT = Path(__file__).resolve().parents[1]
MNV1 = "mobilenetv1_100.ra4_e3600_r224_in1k"  # vafunc mobilenet_v1, 4.2M parameters
LITE0 = "tf_efficientnet_lite0.in1k"  # TF "SAME" padding, BatchNorm eps 1e-3


def _tool():
    spec = importlib.util.spec_from_file_location("timm_pretrained_tool", ROOT / "tools" / "timm_pretrained.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timm_model(tag: str, **kw):
    """timm's model for ``tag``, randomly initialised with every BatchNorm's affine parameters and
    running statistics perturbed (so that loading them is checked too), in eval mode."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model(tag, pretrained=False, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                mod.bias.copy_(0.2 * torch.randn(n, generator=g))
                mod.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache holding MobileNetV1's and TF EfficientNet-Lite0's repositories: ``(cache, {tag: timm model})``."""
    root = tmp_path_factory.mktemp("hf_home") / "hub"
    refs = {}
    for tag in (MNV1, LITE0):
        refs[tag] = _timm_model(tag)
        put_timm_model(root, timm_hub.get_timm_tag(tag).repo_id, refs[tag])
    return root, refs


# --------------------------------------------------------------------------- the packaged facts


def test_packaged_tags_equal_timms_pretrained_cfgs():
    import timm
    from timm.models import get_pretrained_cfg

    tool = _tool()
    packaged = (ROOT / "vafunc" / "io" / "hub" / timm_hub.TAGS_FILE).read_text(encoding="utf-8")
    assert tool.COLUMNS == timm_hub.COLUMNS
    assert tool.render(tool.collect()) == packaged, "out of date: run python tools/timm_pretrained.py"
    # and field by field against timm's configs, read independently of the script
    tags = timm_hub.list_timm_tags()
    for t in tags:
        cfg = get_pretrained_cfg(t.name)
        assert (t.hf_hub_id or None, t.url or None) == (cfg.hf_hub_id or None, cfg.url or None), t.name
        assert (t.input_size, t.crop_pct, t.crop_mode, t.interpolation) == (
            tuple(cfg.input_size),
            cfg.crop_pct,
            cfg.crop_mode,
            cfg.interpolation,
        ), t.name
        assert (t.mean, t.std, t.num_classes) == (tuple(cfg.mean), tuple(cfg.std), cfg.num_classes), t.name
    # every published tag of every timm-named model vafunc registers, and nothing else
    want = {(name, t) for name, timm_name in tool.timm_models() for t in timm.list_pretrained(f"{timm_name}.*")}
    assert {(t.model, t.name) for t in tags} == want
    defaults = {t.timm_name: t.tag for t in tags if t.is_default}
    assert all(get_pretrained_cfg(n).tag == tag for n, tag in defaults.items())
    assert len(defaults) == len({t.timm_name for t in tags})


def test_the_timm_named_models_and_their_timm_names():
    by_model = {t.model: t.timm_name for t in timm_hub.list_timm_tags()}
    assert by_model["xception"] == "legacy_xception" and by_model["mobilenet_v1"] == "mobilenetv1_100"
    for name in ("seresnet50", "seresnext50_32x4d", "efficientnet_lite0", "coatnet_0_rw_224", "resnet50_gn"):
        assert by_model[name] == name
    assert {f"tf_efficientnet_lite{i}" for i in range(5)} <= set(by_model)
    # no weights: timm's CBAM ResNet is resnet50 with other block arguments; Lite1-4 and CoAtNet-0 are untrained
    assert not {"cbam_resnet50", "efficientnet_lite1", "coatnet_0_224"} & set(by_model)
    assert timm_hub.get_timm_tag("seresnet50").tag == "a1_in1k"  # a bare name: timm's default
    # the repository is hf_hub_id, not always timm/<name>.<tag>: the QuickGELU CLIP tower reads the plain one's
    quick = timm_hub.get_timm_tag("vit_base_patch16_clip_quickgelu_224.openai")
    assert quick.repo_id == "timm/vit_base_patch16_clip_224.openai" and quick.num_classes == 512
    assert timm_hub.get_timm_tag("xception.tf_in1k") is timm_hub.get_timm_tag("legacy_xception.tf_in1k")
    assert "seresnet50.a3_in1k" in [t.name for t in hub.list_timm_tags("seresnet50")]


def test_vafunc_info_lists_the_timm_tags(capsys):
    from vafunc.cli.weights import info_extra, print_info_extra

    info = info_extra(vafunc.get_model("seresnet50"))
    assert [t["tag"] for t in info["timm_tags"]] == [t.name for t in timm_hub.list_timm_tags("seresnet50")]
    assert info["timm_tags"][2]["transform"]["crop"] == 160 and info["weights"]  # a3_in1k; the table's rows too
    print_info_extra(info)
    out = capsys.readouterr().out
    assert "timm tags: seresnet50.a1_in1k (default)" in out and "168->160 bicubic  timm/seresnet50.a3_in1k" in out


def test_unknown_names_and_tags():
    with pytest.raises(WeightsError, match=r"seresnet50 has no timm tag 'a9_in1k'; timm publishes: a1_in1k, a2_in1k"):
        timm_hub.get_timm_tag("seresnet50.a9_in1k")
    with pytest.raises(WeightsError, match="did you mean seresnet50"):
        timm_hub.get_timm_tag("seresnet05.a1_in1k")
    with pytest.raises(TypeError, match="names its checkpoint already"):
        vafunc.hub.pretrained("seresnet50.a1_in1k", "IMAGENET1K_V1")
    assert not timm_hub.is_timm_tag("resnet50") and not timm_hub.is_timm_tag("ResNet50_Weights.IMAGENET1K_V2")
    assert not timm_hub.is_timm_tag("./seresnet50.a1_in1k") and timm_hub.is_timm_tag("seresnet50.a1_in1k")


def test_every_tags_transform_is_timms():
    """Each tag's transform is the one timm's ``create_transform`` builds from its pretrained config:
    the same steps for every tag, and the same pixels on a photograph for one tag of each kind."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg
    from torchvision.transforms import CenterCrop, Normalize, Resize

    photo = Image.fromarray(skdata.chelsea())  # 451 x 300: every tag resizes it
    kinds = {}
    for t in timm_hub.list_timm_tags():
        tf = vafunc.transforms.for_weights(t.name)
        assert tf == t.transforms()
        ref = create_transform(**resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(t.name).to_dict()))
        resize, crop, norm = (
            next(s for s in ref.transforms if isinstance(s, k)) for k in (Resize, CenterCrop, Normalize)
        )
        assert (resize.size, resize.interpolation.value, tuple(crop.size)) == (
            tf.resize_size,
            tf.interpolation,
            (tf.crop_size, tf.crop_size),
        ), t.name
        assert torch.equal(torch.as_tensor(norm.mean), torch.tensor(tf.mean)), t.name
        assert torch.equal(torch.as_tensor(norm.std), torch.tensor(tf.std)), t.name
        kinds.setdefault((tf.interpolation, tf.crop_size < 224, tf.crop_size == tf.resize_size, tf.mean), (t, tf, ref))
    assert len(kinds) >= 4
    for t, tf, ref in kinds.values():
        mean, std = torch.tensor(t.mean)[:, None, None], torch.tensor(t.std)[:, None, None]
        got, want = tf(photo)[0] * std + mean, ref(photo) * std + mean  # back to 0..1 pixels
        assert got.shape == want.shape, t.name
        assert (got - want).abs().max() <= 1 / 255 + 1e-6, t.name  # Pillow's 8-bit rounding vs float


# --------------------------------------------------------------------------- loading from the cache


@pytest.mark.parametrize("tag", [MNV1])  # LITE0: test_predict_with_a_timm_tag_equals_timm
def test_load_from_an_offline_cache_equals_timm(cache, tag):
    root, refs = cache
    t = timm_hub.get_timm_tag(tag)
    model, params, state = vafunc.hub.pretrained(tag, cache_dir=root, download=False)
    assert model.name == t.model
    ref = refs[t.name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
    got, _ = model.apply(params, state, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want[0] - want[1]).abs().max() > 0.02  # the comparison means something


@pytest.mark.slow  # ~25 s: three ViTs, one of them CLIP-B (86M parameters)
def test_timm_vits_from_the_hub_equal_timm(tmp_path):
    """The ViTs of issue 29 from a hub cache: DeiT (a classifier), EVA-02 (``num_classes=0``: pooled
    features), and the QuickGELU CLIP tower, whose tags read the plain CLIP tower's repositories
    (whose ``config.json`` names ``vit_base_patch16_clip_224``), at a non-square size."""
    import timm

    for tag, size in [("deit_tiny_patch16_224.fb_in1k", (64, 96)), ("eva02_tiny_patch14_224.mim_in22k", (56, 84))]:
        ref = _timm_model(tag, dynamic_img_size=True)
        put_timm_model(tmp_path, timm_hub.get_timm_tag(tag).repo_id, ref)
        model, params, state = vafunc.hub.pretrained(tag, cache_dir=tmp_path, download=False)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model.apply(params, state, x)[0], ref(x), rtol=1e-4, atol=1e-5)
    tag = "vit_base_patch16_clip_quickgelu_224.openai"
    assert timm_hub.get_timm_tag(tag).repo_id == "timm/vit_base_patch16_clip_224.openai"
    plain = _timm_model("vit_base_patch16_clip_224.openai")
    put_timm_model(tmp_path, "timm/vit_base_patch16_clip_224.openai", plain)
    ref = timm.create_model(tag, pretrained=False, dynamic_img_size=True).eval()
    ref.load_state_dict(plain.state_dict())  # timm loads the same file into its QuickGELU tower
    model, params, state = vafunc.hub.pretrained(tag, cache_dir=tmp_path, download=False)
    assert model.name == "vit_base_patch16_clip_quickgelu_224" and model.config.num_classes == 512
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, state, x)[0], ref(x), rtol=1e-4, atol=1e-5)
        x = torch.randn(1, 3, 224, 224)
        got = model.apply(params, state, x)[0]
        torch.testing.assert_close(got, ref(x), rtol=1e-4, atol=1e-5)
        assert (got - plain(x)).abs().max() > 1e-3  # the same weights with GELU: the activation matters


def test_the_repository_is_hf_hub_id_and_the_head_is_config_jsons(tmp_path, cache):
    """A tag is read from the repository its ``hf_hub_id`` names, whatever the tag is called (timm's
    QuickGELU CLIP tower reads the plain CLIP repository), and ``config.json`` decides the head."""
    root, refs = cache
    other = dataclasses.replace(timm_hub.get_timm_tag(MNV1), tag="quickgelu", hf_hub_id="timm/mobilenetv1_100.plain")
    with pytest.raises(WeightsError, match="timm/mobilenetv1_100.plain"):
        timm_hub.fetch_hub_files(other, cache_dir=root, download=False)
    put_timm_model(root, "timm/mobilenetv1_100.plain", refs[MNV1])
    path, config = timm_hub.fetch_hub_files(other, cache_dir=root, download=False)
    assert repo_folder(root, "timm/mobilenetv1_100.plain") in path.parents and path.name == "model.safetensors"
    assert config["architecture"] == "mobilenetv1_100" and config["num_classes"] == 1000
    # a 10-class fine-tune in the tag's own repository: the model is built with its head
    ten = _timm_model("mobilenetv1_100", num_classes=10)
    put_timm_model(tmp_path, timm_hub.get_timm_tag(MNV1).repo_id, ten)
    model, params, state = vafunc.hub.pretrained(MNV1, cache_dir=tmp_path, download=False)
    assert model.config.num_classes == 10
    got, want = vafunc.to_state_dict(params, state), ten.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a repository holding another architecture is refused
    put_timm_model(tmp_path, "timm/mobilenetv1_100.wrong", refs[LITE0])
    wrong = dataclasses.replace(other, hf_hub_id="timm/mobilenetv1_100.wrong")
    with pytest.raises(WeightsError, match="holds a tf_efficientnet_lite0, not the mobilenetv1_100"):
        timm_hub.fetch_hub_files(wrong, cache_dir=tmp_path, download=False)


def test_not_cached_offline_names_the_repository_the_file_and_the_cache(tmp_path, cache, monkeypatch):
    with pytest.raises(WeightsError) as err:
        vafunc.hub.pretrained("seresnet50.a1_in1k", cache_dir=tmp_path, download=False)
    msg = str(err.value)
    for part in ("timm/seresnet50.a1_in1k", "model.safetensors", str(tmp_path), "download=False"):
        assert part in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub read it at import; vafunc reads it per call
    with pytest.raises(WeightsError, match=r"cannot be downloaded \(HF_HUB_OFFLINE is set\)"):
        timm_hub.fetch_hub_files("resnet50_gn.a1h_in1k", cache_dir=tmp_path)
    # the weights are there but config.json is not: the message names config.json
    root, _ = cache
    snap = next((repo_folder(root, f"timm/{MNV1}") / "snapshots").iterdir())
    part = tmp_path / "partial"
    dst = repo_folder(part, f"timm/{MNV1}")
    (dst / "snapshots" / snap.name).mkdir(parents=True)
    (dst / "refs").mkdir()
    (dst / "refs" / "main").write_text(snap.name)
    (dst / "snapshots" / snap.name / "model.safetensors").write_bytes((snap / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=rf"config\.json of the Hugging Face repository timm/{MNV1} is not in"):
        timm_hub.fetch_hub_files(MNV1, cache_dir=part)


def test_a_tag_timm_publishes_off_the_hub_goes_through_the_weights_table(tmp_path, monkeypatch):
    """``legacy_xception.tf_in1k`` has no ``hf_hub_id``: the table's file in the torch.hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("VAFUNC_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"xception\.TF_IN1K: xception-43020ad28\.pth is not in the cache"):
        vafunc.hub.pretrained("legacy_xception.tf_in1k")
    with pytest.raises(WeightsError, match="not on the Hugging Face hub"):
        timm_hub.fetch_hub_files("legacy_xception.tf_in1k")


def test_model_config_follows_the_tag():
    mnv1 = vafunc.get_model("mobilenet_v1")
    t = timm_hub.get_timm_tag(MNV1)
    assert timm_hub._model_config(mnv1, t, 1000) == {} and timm_hub._model_config(mnv1, t, 0) == {"num_classes": 0}
    coat = vafunc.get_model("coatnet_0_rw_224")
    t = dataclasses.replace(timm_hub.get_timm_tag("coatnet_0_rw_224"), input_size=(3, 256, 256))
    assert timm_hub._model_config(coat, t, 1000) == {"img_size": 256}


# --------------------------------------------------------------------------- vafunc predict --weights TAG


def test_predict_with_a_timm_tag_equals_timm(cache, tmp_path, monkeypatch, capsys):
    """``vafunc predict IMAGES --weights TAG`` (the model implied) from the HF cache, offline: timm's
    top-5 with timm's own transform of that tag."""
    import huggingface_hub
    from timm.data import create_transform, resolve_data_config

    root, refs = cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))  # as HF_HOME at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = []
    for n in ("chelsea", "coffee"):
        paths.append(tmp_path / f"{n}.png")
        Image.fromarray(getattr(skdata, n)()).save(paths[-1])
    ref = refs[LITE0]
    tf = create_transform(**resolve_data_config({}, model=ref))
    with torch.no_grad():
        probs = ref(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).softmax(-1)
    ref_p, ref_i = probs.topk(5)
    rc = cli.main(["predict", *map(str, paths), "--weights", LITE0, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"weights {LITE0} from the Hugging Face repository timm/{LITE0}" in err
    res = json.loads(out)["results"]
    assert [[t["index"] for t in r["top"]] for r in res] == ref_i.tolist()
    got_p = torch.tensor([[t["probability"] for t in r["top"]] for r in res])
    torch.testing.assert_close(got_p, ref_p, rtol=1e-4, atol=1e-6)
    assert res[0]["top"][0]["label"] == vafunc.hub.get_weights("tf_efficientnet_lite0").categories[ref_i[0, 0]]
    assert len({tuple(i) for i in ref_i.tolist()}) > 1  # the check means something
    rc = cli.main(["predict", str(paths[0]), "--model", "resnet18", "--weights", LITE0])
    assert rc == 2 and "are weights for tf_efficientnet_lite0, not for resnet18" in capsys.readouterr().err
    assert cli.main(["predict", str(paths[0])]) == 2
    assert "--model is required unless --weights is a timm tag" in capsys.readouterr().err
