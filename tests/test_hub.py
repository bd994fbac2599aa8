"""The weights table (against torchvision/timm/Cadene metadata), checkpoint files in and out, the
torch.hub cache and download logic (offline: downloads are simulated), and the error messages."""

from __future__ import annotations

import os
import pickle
import re
import urllib.error
import warnings

import pytest
import torch
import torchvision

import vafunc
from vafunc.io import hub
from vafunc.io.hub import WeightsError


def perturbed_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """A randomly initialised reference model's state_dict with every float tensor perturbed (so
    that a mix-up of any two tensors would show)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone() + 3  # e.g. num_batches_tracked
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        else:
            out[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def r18_sd():
    torch.manual_seed(0)
    return perturbed_state_dict(torchvision.models.resnet18())


@pytest.fixture
def r18_pth(tmp_path, r18_sd):
    p = tmp_path / "r18.pth"
    torch.save(r18_sd, p)
    return p


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache, and downloads that fail loudly unless a test replaces them."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("VAFUNC_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


def assert_loaded(params, state, sd):
    flat = vafunc.to_state_dict(params, state)
    assert list(flat) == list(sd)
    for k in sd:
        assert torch.equal(flat[k], sd[k]), k


# --------------------------------------------------------------------------- the table


def _tv_weights():
    for name in torchvision.models.list_models(module=torchvision.models):
        for w in torchvision.models.get_model_weights(name):
            yield name, w


def test_table_has_every_torchvision_checkpoint_with_its_facts():
    seen = set()
    for name, tw in _tv_weights():
        w = hub.get_weights(name, tw.name)
        seen.add(w.name)
        meta, tf = tw.meta, tw.transforms()
        assert w.url == tw.url and w.file == os.path.basename(tw.url) and w.source == "torchvision"
        assert w.num_params == meta["num_params"]
        assert w.gflops == pytest.approx(meta["_ops"])
        metrics = meta["_metrics"]["ImageNet-1K"]
        for ours, theirs in ((w.acc1, metrics["acc@1"]), (w.acc5, metrics["acc@5"])):
            assert (ours is None and theirs != theirs) or ours == pytest.approx(theirs)
        assert (w.resize_size, w.crop_size) == (tf.resize_size[0], tf.crop_size[0])
        assert w.interpolation == tf.interpolation.value
        assert w.mean == pytest.approx(tuple(tf.mean)) and w.std == pytest.approx(tuple(tf.std))
        assert (w.channel_order, w.input_scale) == ("RGB", 1.0)
        assert w.categories == (tuple(meta["categories"]) if meta["categories"] else None)
        assert w.is_default == (torchvision.models.get_model_weights(name).DEFAULT == tw)
        assert hub.get_weights(name, f"{type(tw).__name__}.{tw.name}") == w
    # the segmentation checkpoints: tests/test_segmentation.py checks their facts
    classifiers = {w.name for w in hub.list_weights() if w.source == "torchvision" and w.category_set != "voc"}
    assert classifiers == seen


def test_hash_prefix_is_torch_hubs():
    for w in hub.list_weights():
        m = torch.hub.HASH_REGEX.search(w.file)
        assert w.hash_prefix == (m.group(1) if m and m.group(1) else None)
    assert hub.get_weights("resnet50").hash_prefix == "11ad3fa6"
    assert hub.get_weights("mnasnet0_5").hash_prefix == "3ffadce67e"
    assert hub.get_weights("mobilenet_v1").hash_prefix is None


@pytest.mark.slow  # 13 s: every checkpoint's model on meta
def test_registered_models_with_the_checkpoint_config_have_the_published_parameter_count():
    """The config each checkpoint needs (googlenet without aux heads, ...) builds the network the
    checkpoint's published parameter count describes (mnasnet0_5's file is the retrained
    version-2 network: torchvision's count, and its file size, are version 2's)."""
    for name in vafunc.list_models():
        for w in hub.list_weights(name):
            model = vafunc.get_model(name, **dict(w.config))
            assert model.num_params() == w.num_params, w.name


def test_every_registered_model_but_the_unpublished_has_weights():
    # densenet264: the paper's, never released; timm's efficientnet_lite1..4 are untrained configs;
    # coatnet_0_224 (the paper's CoAtNet-0): timm publishes weights for its coatnet_0_rw_224 only;
    # unet: the paper's network, never released; cbam_resnet50: timm publishes none (pytorchcv's
    # checkpoint has its own layout, not in the table yet); timm's tags on the Hugging Face hub count
    # (the timm ViTs have no torch.hub table rows); basic_unet: MONAI's BasicUNet is a template for
    # training (no checkpoint of its default 2-D config in the table); resattnet56/92: pytorchcv
    # publishes none (nor did the paper's authors for these layouts)
    missing = {n for n in vafunc.list_models() if not hub.list_weights(n) and not hub.list_timm_tags(n)}
    unpublished = {"coatnet_0_224", "densenet264", "unet", "basic_unet", "resattnet56", "resattnet92"}
    unpublished |= {f"efficientnet_lite{i}" for i in range(1, 5)}
    assert missing - {"cbam_resnet50"} == unpublished


def test_categories_are_torchvisions():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from vafunc.serving.imagenet_classes import IMAGENET_CATEGORIES

    assert IMAGENET_CATEGORIES == tuple(_IMAGENET_CATEGORIES) and len(IMAGENET_CATEGORIES) == 1000
    assert IMAGENET_CATEGORIES[281] == "tabby"


def test_timm_facts():
    import timm

    x = timm.create_model("legacy_xception", pretrained=False).pretrained_cfg
    w = hub.get_weights("xception", "legacy_xception.tf_in1k")
    assert w.url == x["url"] and w.tag == "TF_IN1K" and w.interpolation == x["interpolation"]
    assert w.mean == x["mean"] and w.std == x["std"] and w.crop_size == x["input_size"][-1]
    assert w.resize_size == int(w.crop_size / x["crop_pct"])
    m = timm.create_model("mobilenetv1_100.ra4_e3600_r224_in1k", pretrained=False).pretrained_cfg
    w = hub.get_weights("mobilenet_v1")
    assert w.url == f"https://huggingface.co/{m['hf_hub_id']}/resolve/main/model.safetensors"
    assert w.interpolation == m["interpolation"] and w.mean == m["mean"] and w.std == m["std"]
    assert w.resize_size == int(w.crop_size / m["crop_pct"])


def test_cadene_facts():
    import pretrainedmodels as pm

    s = pm.pretrained_settings["bninception"]["imagenet"]
    w = hub.get_weights("inception_v2")
    assert w.url == s["url"] and w.hash_prefix == "52deb4733"
    assert (w.channel_order, w.input_scale) == (s["input_space"], float(max(s["input_range"])))
    assert w.mean == tuple(s["mean"]) and w.std == tuple(s["std"]) and w.crop_size == s["input_size"][-1]
    assert pm.pretrained_settings["xception"]["imagenet"]["url"].endswith(hub.get_weights("xception").file)


def test_tags():
    assert hub.get_weights("resnet50").tag == "IMAGENET1K_V2"
    assert hub.get_weights("resnet50", "imagenet1k_v1").tag == "IMAGENET1K_V1"
    with pytest.raises(WeightsError, match="IMAGENET1K_V9.*available: DEFAULT, IMAGENET1K_V2, IMAGENET1K_V1"):
        hub.get_weights("resnet50", "IMAGENET1K_V9")
    with pytest.raises(WeightsError, match="densenet264 has no published weights"):
        hub.get_weights("densenet264")
    with pytest.raises(ValueError, match="did you mean resnet50"):
        hub.get_weights("resnet5O")


def test_resolve_weights_gives_a_path_or_a_table_entry(tmp_path):
    w = hub.get_weights("resnet50")
    assert hub.resolve_weights("resnet50", "DEFAULT") == (None, w)
    assert hub.resolve_weights("resnet50", w) == (None, w)
    f = tmp_path / w.file
    assert hub.resolve_weights("resnet50", f) == (f, w)  # a copied checkpoint is recognised by its name
    other = tmp_path / "mine.pth"
    assert hub.resolve_weights("resnet50", str(other)) == (other, None)
    with pytest.raises(TypeError, match="weights must be a tag"):
        hub.resolve_weights("resnet50", 3)


def test_the_table_is_a_package_data_file():
    from importlib import resources

    text = resources.files("vafunc.io.hub").joinpath(hub.table.TABLE_FILE).read_text(encoding="utf-8")
    rows = hub.table.read_table(text)
    assert set(rows) == set(hub.list_weights()) and len(rows) == len(hub.list_weights())
    assert sum(w.is_default for w in rows) == len({w.model for w in rows})  # one DEFAULT per model
    bad = text.replace("\nresnet50,IMAGENET1K_V2,true,", "\nresnet50,IMAGENET1K_V2,maybe,")
    line = text[: text.index("\nresnet50,IMAGENET1K_V2,")].count("\n") + 2
    with pytest.raises(RuntimeError, match=rf"weights.csv, line {line}: expected true or false, got 'maybe'"):
        hub.table.read_table(bad)
    with pytest.raises(RuntimeError, match="expected the columns"):
        hub.table.read_table(text.replace("acc1,acc5", "top1,top5", 1))


def test_rows_of_unregistered_models_stay_out_of_sight(capsys):
    """The table keeps torchvision's rows of architectures vafunc does not register (yet): facts
    about files, reachable by name, but nothing lists or builds those models."""
    from vafunc import cli

    registered = set(vafunc.list_models())
    unregistered = sorted({w.model for w in hub.list_weights()} - registered)
    assert set(torchvision.models.list_models(module=torchvision.models)) >= set(unregistered)
    for name in unregistered[:3]:
        assert hub.get_weights(name).model == name
        assert cli.main(["info", name]) == 2
        assert f"unknown model {name!r}" in capsys.readouterr().err
        with pytest.raises(ValueError, match="unknown model"):
            vafunc.load_weights(name)


# --------------------------------------------------------------------------- loading


def test_load_pth_and_identify(r18_pth, r18_sd):
    params, state = vafunc.load_weights(vafunc.get_model("resnet18"), r18_pth)
    assert_loaded(params, state, r18_sd)
    assert hub.identify(r18_sd) == ["resnet18"]


def test_legacy_pickle_format(tmp_path, r18_sd):
    """Checkpoints saved before torch 1.6 (no zip container), like several published files."""
    p = tmp_path / "legacy.pth"
    torch.save(r18_sd, p, _use_new_zipfile_serialization=False)
    assert p.read_bytes()[:1] == b"\x80"
    assert_loaded(*vafunc.load_weights("resnet18", p), r18_sd)
    cut = tmp_path / "legacy_cut.pth"
    cut.write_bytes(p.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="legacy_cut.pth: truncated or corrupt PyTorch checkpoint"):
        vafunc.load_weights("resnet18", cut)


def test_cache_path_and_tags(torch_home, r18_sd):
    """A tag reads $TORCH_HOME/hub/checkpoints/<file>; nothing is downloaded when it is there."""
    w = hub.get_weights("resnet18", "IMAGENET1K_V1")
    assert w.cache_path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    w.cache_path.parent.mkdir(parents=True)
    torch.save(r18_sd, w.cache_path)
    for tag in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        assert_loaded(*vafunc.load_weights(vafunc.get_model("resnet18"), tag), r18_sd)
    assert_loaded(*vafunc.load_weights("resnet18"), r18_sd)


def test_download_is_hash_checked_into_the_cache(torch_home, r18_pth, r18_sd, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        with open(dst, "wb") as f:
            f.write(r18_pth.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert_loaded(*vafunc.load_weights("resnet18", "DEFAULT", progress=False), r18_sd)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    vafunc.load_weights("resnet18", "DEFAULT")  # now cached: no second download
    assert len(calls) == 1


def test_hash_mismatch(torch_home, monkeypatch):
    def bad_hash(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", bad_hash)
    with pytest.raises(WeightsError, match="does not match the SHA-256 prefix f37072fd"):
        vafunc.load_weights("resnet18")
    assert not hub.get_weights("resnet18").cache_path.exists()


def test_offline_download_says_where_to_put_the_file(torch_home, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    dst = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError) as err:
        vafunc.load_weights("resnet18")
    msg = str(err.value)
    assert "cannot download https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert f"put it at {dst}" in msg and "name resolution" in msg


@pytest.mark.parametrize("how", ["env", "argument"])
def test_no_download_when_offline_or_disabled(torch_home, monkeypatch, how):
    kw = {}
    if how == "env":
        monkeypatch.setenv("VAFUNC_OFFLINE", "1")
    else:
        kw["download"] = False
    with pytest.raises(
        WeightsError, match=re.escape(str(torch_home / "hub" / "checkpoints" / "xception-43020ad28.pth"))
    ):
        vafunc.load_weights("xception", "TF_IN1K", **kw)  # the no_network fixture would raise otherwise


def test_weights_for_another_model(r18_pth):
    with pytest.raises(WeightsError, match="resnet18.IMAGENET1K_V1 are weights for resnet18, not for resnet34"):
        vafunc.load_weights("resnet34", hub.get_weights("resnet18"))


def test_wrong_checkpoint_names_file_keys_and_the_model_it_fits(r18_pth):
    with pytest.raises(WeightsError) as err:
        vafunc.load_weights("resnet34", r18_pth)
    msg = str(err.value)
    assert str(r18_pth) in msg and "does not fit resnet34" in msg
    assert "missing keys (96)" in msg and "layer1.2.conv1.weight" in msg
    assert "the checkpoint fits resnet18" in msg


def test_other_num_classes_hint(tmp_path):
    p = tmp_path / "ft.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), p)
    with pytest.raises(WeightsError, match=r"(?s)fc.weight \(checkpoint \[10, 512\].*num_classes=10"):
        vafunc.load_weights("resnet18", p)
    params, _ = vafunc.load_weights(vafunc.get_model("resnet18", num_classes=10), p)
    assert params["fc"]["weight"].shape == (10, 512)


def test_truncated_and_corrupt_files(tmp_path, r18_pth):
    data = r18_pth.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=re.escape(str(cut)) + ".*truncated or corrupt PyTorch checkpoint"):
        vafunc.load_weights("resnet18", cut)
    broken = tmp_path / "broken.pth"  # the zip directory at the end overwritten
    broken.write_bytes(data[:-300] + os.urandom(300))
    with pytest.raises(WeightsError, match="broken.pth.*truncated or corrupt"):
        vafunc.load_weights("resnet18", broken)
    params, state = vafunc.load_weights("resnet18", r18_pth)  # the intact file still loads
    st = tmp_path / "r18.safetensors"
    vafunc.save_weights(params, state, st)
    sdata = st.read_bytes()
    for n, name in ((len(sdata) - 1000, "cut.safetensors"), (200, "head.safetensors")):
        p = tmp_path / name
        p.write_bytes(sdata[:n])
        with pytest.raises(WeightsError, match=re.escape(str(p)) + ".*truncated or corrupt safetensors"):
            vafunc.load_weights("resnet18", p)


def test_check_hash_catches_corrupt_tensor_data(tmp_path, r18_pth):
    """Bytes flipped inside a tensor leave a readable file: only the hash in the name tells."""
    import hashlib

    data = r18_pth.read_bytes()
    good = tmp_path / f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    good.write_bytes(data)
    vafunc.load_weights("resnet18", good, check_hash=True)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    good.write_bytes(bytes(flipped))
    with pytest.raises(WeightsError, match="does not match the prefix .* in its name"):
        vafunc.load_weights("resnet18", good, check_hash=True)
    with pytest.raises(WeightsError, match="no hash prefix"):
        vafunc.load_weights("resnet18", r18_pth, check_hash=True)


def test_not_checkpoints(tmp_path):
    txt = tmp_path / "notes.pth"
    txt.write_text("hello")
    with pytest.raises(WeightsError, match="notes.pth: not a checkpoint.*starts with b'hello'"):
        vafunc.load_weights("resnet18", txt)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.pth: the file is empty"):
        vafunc.load_weights("resnet18", empty)
    with pytest.raises(WeightsError, match="no such file"):
        vafunc.load_weights("resnet18", tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="is a folder"):
        vafunc.load_weights("resnet18", tmp_path)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(WeightsError, match="list.pth: holds a list, not a state_dict"):
        vafunc.load_weights("resnet18", lst)
    mixed = tmp_path / "mixed.pth"
    torch.save({"epoch": 3, "lr": 0.1, "w": torch.zeros(1)}, mixed)
    with pytest.raises(
        WeightsError, match=r"mixed.pth: not a state_dict: 2 entries are not tensors \(epoch \(int\), lr"
    ):
        vafunc.load_weights("resnet18", mixed)


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    p = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": evil}, p)
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(evil, protocol=2))
    for f in (p, raw):
        with pytest.raises(WeightsError, match=re.escape(str(f)) + r": refused to load.*os\.makedirs.*run code"):
            vafunc.load_weights("resnet18", f)
    assert not marker.exists()


def test_training_checkpoint_wrappers(tmp_path, r18_sd):
    p = tmp_path / "train.pth"
    torch.save({"epoch": 7, "state_dict": {"module." + k: v for k, v in r18_sd.items()}}, p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, state = vafunc.load_weights("resnet18", p)
    assert_loaded(params, state, r18_sd)
    msgs = " ".join(str(c.message) for c in caught)
    assert "checkpoint['state_dict']" in msgs and "'module.' prefix" in msgs


def test_checkpoints_without_num_batches_tracked(tmp_path, r18_sd):
    p = tmp_path / "old.pth"
    torch.save({k: v for k, v in r18_sd.items() if not k.endswith("num_batches_tracked")}, p)
    with pytest.warns(UserWarning, match="added 20 missing BatchNorm num_batches_tracked"):
        params, state = vafunc.load_weights("resnet18", p)
    assert state["bn1"]["num_batches_tracked"] == 0
    assert torch.equal(params["fc"]["weight"], r18_sd["fc.weight"])
    old = {k: v for k, v in r18_sd.items() if not k.endswith("num_batches_tracked")}
    assert hub.identify(old) == ["resnet18"]  # identify back-fills them the same way
    from vafunc.io.state_dict import missing_num_batches_tracked

    shapes = {"num_batches_tracked": (), "bn.num_batches_tracked": (), "b.num_batches_tracked": ()}
    assert missing_num_batches_tracked(shapes, {"bn.running_mean": 0, "running_mean": 0}) == ["bn.num_batches_tracked"]


def test_device_and_dtype(r18_pth):
    params, state = vafunc.load_weights("resnet18", r18_pth, dtype=torch.float16, device="cpu")
    assert params["conv1"]["weight"].dtype == torch.float16
    assert state["bn1"]["running_mean"].dtype == torch.float16
    assert state["bn1"]["num_batches_tracked"].dtype == torch.int64


def test_checkpoint_config_warning_and_pretrained(torch_home):
    """torchvision's GoogLeNet weights expect transform_input=True and ship aux heads that its
    builder drops; pretrained() builds that network, a default model gets a warning."""
    torch.manual_seed(0)
    ref = torchvision.models.googlenet(aux_logits=True, init_weights=True)
    sd = perturbed_state_dict(ref)
    w = hub.get_weights("googlenet")
    w.cache_path.parent.mkdir(parents=True)
    torch.save(sd, w.cache_path)
    with pytest.warns(UserWarning, match="transform_input=True"):
        vafunc.load_weights("googlenet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, params, state = hub.pretrained("googlenet")
    assert not any("transform_input" in str(c.message) for c in caught)
    assert model.config.transform_input and not model.config.aux_logits
    assert "aux1" not in params
    tv = torchvision.models.googlenet(aux_logits=False, transform_input=True, init_weights=False).eval()
    tv.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, state, x)[0], tv(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_round_trip(tmp_path, r18_pth, r18_sd, suffix):
    params, state = vafunc.load_weights("resnet18", r18_pth)
    out = tmp_path / f"copy{suffix}"
    assert vafunc.save_weights(params, state, out) == out
    assert_loaded(*vafunc.load_weights("resnet18", out), r18_sd)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if suffix == ".pth":  # a plain state_dict torchvision loads strictly
        m = torchvision.models.resnet18()
        m.load_state_dict(torch.load(out, weights_only=True))
    else:
        _, meta, _ = hub.read_checkpoint(out)
        assert meta["format"] == "pt"


def test_save_rejects_unknown_suffix(tmp_path, r18_pth):
    params, state = vafunc.load_weights("resnet18", r18_pth)
    with pytest.raises(WeightsError, match="unknown checkpoint suffix '.ckpt'"):
        vafunc.save_weights(params, state, tmp_path / "x.ckpt")


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_interrupted_save_leaves_no_truncated_file(tmp_path, r18_pth, monkeypatch, suffix):
    params, state = vafunc.load_weights("resnet18", r18_pth)
    real_fdopen = os.fdopen

    class Dying:
        """A file that dies after 1 MB, as a write killed half-way would."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            if self.n + len(b) > 1 << 20:
                self.f.write(bytes(b)[: (1 << 20) - self.n])
                self.f.flush()
                raise _Interrupted("disk full / killed")
            self.n += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Dying(real_fdopen(fd, *a, **k)))
    fresh = tmp_path / f"new{suffix}"
    with pytest.raises((_Interrupted, RuntimeError)):  # torch.save's zip writer may re-raise its own
        vafunc.save_weights(params, state, fresh)
    assert not fresh.exists()
    old = tmp_path / f"old{suffix}"
    old.write_bytes(b"previous checkpoint")
    with pytest.raises((_Interrupted, RuntimeError)):
        vafunc.save_weights(params, state, old)
    assert old.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"old{suffix}", "r18.pth"])


def test_missing_safetensors_gives_install_hint(tmp_path, r18_pth, monkeypatch):
    import sys

    params, state = vafunc.load_weights("resnet18", r18_pth)
    st = tmp_path / "w.safetensors"
    vafunc.save_weights(params, state, st)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'vafunc[safetensors]'")):
        vafunc.load_weights("resnet18", st)
    with pytest.raises(ImportError, match=re.escape("pip install 'vafunc[safetensors]'")):
        vafunc.save_weights(params, state, tmp_path / "x.safetensors")
