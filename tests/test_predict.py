"""``vafunc predict`` / ``convert`` / ``info`` against the reference implementations: the same
checkpoint file (random, perturbed, with BatchNorm statistics from real photos), the reference's
own transform and model, the same top-5."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from PIL import Image as Image
from skimage import data as skdata

import vafunc
from benchmarks.photos import realistic_random
from vafunc import cli
from vafunc.io import hub

PHOTOS = ("chelsea", "coffee", "astronaut")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for n in PHOTOS:
        Image.fromarray(getattr(skdata, n)()).save(d / f"{n}.png")  # lossless: same pixels for both
    return d


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def reference_top5(model, transform, paths):
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    p, i = probs.topk(5)
    return i.tolist(), p


def check_same_top5(capsys, name, ckpt, paths, ref_idx, ref_p, *extra):
    rc, out, err = run_cli(
        capsys, "predict", *map(str, paths), "--model", name, "--weights", str(ckpt), "--json", *extra
    )
    assert rc == 0, err
    res = json.loads(out)["results"]
    assert [r["image"] for r in res] == [str(p) for p in paths]
    got_idx = [[t["index"] for t in r["top"]] for r in res]
    got_p = torch.tensor([[t["probability"] for t in r["top"]] for r in res])
    assert got_idx == ref_idx
    torch.testing.assert_close(got_p, ref_p, rtol=1e-4, atol=1e-6)
    assert len({tuple(i) for i in ref_idx}) > 1  # the check means something
    return res


# torchvision models, keywords their builder gets with published weights
TV_CASES = [
    ("resnet18", {}),
    ("mobilenet_v3_small", {}),
    ("densenet121", {}),
    ("efficientnet_b0", {}),
    ("googlenet", {"aux_logits": False, "transform_input": True, "init_weights": True}),
]


@pytest.mark.parametrize("name,kw", TV_CASES, ids=[c[0] for c in TV_CASES])
def test_top5_equals_torchvision(tmp_path, capsys, photo_dir, name, kw):
    if name not in vafunc.list_models():
        pytest.fail(f"{name} is not registered")
    paths = [photo_dir / f"{n}.png" for n in PHOTOS]
    tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    calib = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    torch.manual_seed(0)
    ref = realistic_random(
        torchvision.models.get_model(name, **kw), torch.cat([calib, torch.randn(1, *calib.shape[1:])])
    )
    ckpt = tmp_path / f"{name}-random.pth"
    torch.save(ref.state_dict(), ckpt)
    idx, p = reference_top5(ref, tf, paths)
    res = check_same_top5(capsys, name, ckpt, paths, idx, p)
    cats = torchvision.models.get_model_weights(name).DEFAULT.meta["categories"]
    assert [t["label"] for t in res[0]["top"]] == [cats[i] for i in idx[0]]


def test_top5_equals_cadene_bn_inception(tmp_path, capsys, photo_dir):
    """BGR 0-255 Caffe convention end to end (Cadene's transform and model)."""
    import pretrainedmodels as pm
    from pretrainedmodels.utils import TransformImage

    paths = [photo_dir / f"{n}.png" for n in PHOTOS]
    tf = TransformImage(pm.pretrained_settings["bninception"]["imagenet"])
    calib = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    torch.manual_seed(0)
    ref = realistic_random(pm.bninception(pretrained=None), torch.cat([calib, 50 * torch.randn(1, *calib.shape[1:])]))
    ckpt = tmp_path / "bninception-random.pth"
    torch.save(ref.state_dict(), ckpt)
    idx, p = reference_top5(ref, tf, paths)
    check_same_top5(capsys, "inception_v2", ckpt, paths, idx, p)


def test_top5_equals_timm_mobilenet_v1(tmp_path, capsys, photo_dir):
    import timm
    from timm.data import create_transform, resolve_data_config

    paths = [photo_dir / f"{n}.png" for n in PHOTOS]
    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv1_100.ra4_e3600_r224_in1k", pretrained=False)
    tf = create_transform(**resolve_data_config({}, model=ref))
    calib = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    ref = realistic_random(ref, torch.cat([calib, torch.randn(1, *calib.shape[1:])]))
    ckpt = tmp_path / "mnv1.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), ckpt)
    idx, p = reference_top5(ref, tf, paths)
    check_same_top5(capsys, "mobilenet_v1", ckpt, paths, idx, p)


# --------------------------------------------------------------------------- folders, output, errors


@pytest.fixture(scope="module")
def r18_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), p)
    return p


def test_folder_in_batches_with_progress(capsys, photo_dir, r18_ckpt):
    rc, out, err = run_cli(
        capsys,
        "predict",
        str(photo_dir),
        "--model",
        "resnet18",
        "--weights",
        str(r18_ckpt),
        "--batch-size",
        "2",
        "--topk",
        "3",
        "--json",
    )
    assert rc == 0
    res = json.loads(out)
    assert [r["image"].rsplit("/", 1)[-1] for r in res["results"]] == sorted(f"{n}.png" for n in PHOTOS)
    assert all(len(r["top"]) == 3 for r in res["results"])
    assert "2/3 images" in err and "3/3 images" in err  # two batches, plain stderr progress
    assert "using the evaluation transform of resnet18.IMAGENET1K_V1" in err
    rc, out, err = run_cli(
        capsys, "predict", str(photo_dir / "coffee.png"), "--model", "resnet18", "--weights", str(r18_ckpt), "-q"
    )
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].endswith("coffee.png") and len(lines) == 6 and lines[1].strip().endswith("]")


def test_unreadable_image(tmp_path, capsys, photo_dir, r18_ckpt):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    rc, out, err = run_cli(
        capsys, "predict", str(photo_dir / "coffee.png"), str(bad), "--model", "resnet18", "--weights", str(r18_ckpt)
    )
    assert rc == 2 and "broken.jpg" in err and "not an image" in err
    rc, out, err = run_cli(
        capsys,
        "predict",
        str(photo_dir / "coffee.png"),
        str(bad),
        "--model",
        "resnet18",
        "--weights",
        str(r18_ckpt),
        "--skip-unreadable",
        "--json",
    )
    res = json.loads(out)["results"]
    assert rc == 1 and "top" in res[0] and "not an image" in res[1]["error"]
    rc, out, err = run_cli(
        capsys, "predict", str(tmp_path / "nope.png"), "--model", "resnet18", "--weights", str(r18_ckpt)
    )
    assert rc == 2 and "no such image file or folder" in err


def test_weights_that_do_not_fit(capsys, photo_dir, r18_ckpt):
    rc, out, err = run_cli(
        capsys, "predict", str(photo_dir / "coffee.png"), "--model", "resnet34", "--weights", str(r18_ckpt)
    )
    assert rc == 2 and f"{r18_ckpt} does not fit resnet34" in err and "fits resnet18" in err


def test_unknown_model(capsys, photo_dir, r18_ckpt):
    rc, out, err = run_cli(
        capsys, "predict", str(photo_dir / "coffee.png"), "--model", "resnet81", "--weights", str(r18_ckpt)
    )
    assert rc == 2 and "unknown model 'resnet81'; did you mean resnet18" in err


def test_offline_download_attempt(tmp_path, capsys, photo_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("VAFUNC_OFFLINE", "1")
    rc, out, err = run_cli(capsys, "predict", str(photo_dir / "coffee.png"), "--model", "mobilenet_v3_small")
    where = tmp_path / "th" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert rc == 2 and f"put it at {where}" in err and "https://download.pytorch.org/models/" in err


def test_published_tag_from_the_cache(tmp_path, capsys, photo_dir, monkeypatch, r18_ckpt):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    dst = hub.get_weights("resnet18").cache_path
    dst.parent.mkdir(parents=True)
    dst.write_bytes(r18_ckpt.read_bytes())
    rc, out, err = run_cli(
        capsys, "predict", str(photo_dir / "coffee.png"), "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--json"
    )
    assert rc == 0 and err == ""  # no note: the tag says which transform
    assert json.loads(out)["transform"].startswith("resize shorter side to 256 (bilinear")


def test_demo_checkpoint_brings_its_preprocessing_and_class_names(tmp_path, capsys):
    """A ``vafunc demo`` checkpoint (16x16 digits, 10 classes) is read with the preprocessing and
    class names saved in its metadata, not ImageNet's."""
    from vafunc.cli import demo
    from vafunc.serving.transforms import Transform

    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = model.init(0)
    ckpt = tmp_path / "member0.safetensors"
    vafunc.save_weights(
        params,
        state,
        ckpt,
        metadata={
            "model": "resnet18",
            "num_classes": "10",
            "transform": json.dumps(demo.preprocessing(16)),
            "categories": json.dumps(demo.DIGITS),
        },
    )
    scan = (torch.rand(3, 24, 20, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    img = tmp_path / "digit.png"
    Image.fromarray(scan.permute(1, 2, 0).numpy()).save(img)
    rc, out, err = run_cli(
        capsys, "predict", str(img), "--model", "resnet18", "--weights", str(ckpt), "--json", "--topk", "10"
    )
    assert rc == 0, err
    got = json.loads(out)
    assert got["transform"].startswith("resize shorter side to 16") and "mean [0.5, 0.5, 0.5]" in got["transform"]
    top = got["results"][0]["top"]
    assert sorted(t["label"] for t in top) == demo.DIGITS
    x = Transform(**demo.preprocessing(16))(img)
    assert x.shape == (1, 3, 16, 16)
    with torch.no_grad():
        want = model.apply(params, state, x)[0].softmax(-1)[0]
    torch.testing.assert_close(
        torch.tensor([t["probability"] for t in top]), want[[t["index"] for t in top]], rtol=1e-4, atol=1e-6
    )


# --------------------------------------------------------------------------- convert, info


def test_convert_round_trip(tmp_path, capsys, r18_ckpt):
    st, back = tmp_path / "r18.safetensors", tmp_path / "r18_back.pth"
    rc, out, err = run_cli(capsys, "convert", str(r18_ckpt), str(st))
    assert rc == 0 and "resnet18 (from its tensor names and shapes)" in out and "verified" in out
    rc, out, err = run_cli(capsys, "convert", str(st), str(back))
    assert rc == 0 and "from the file's metadata" in out
    ref = torch.load(r18_ckpt, weights_only=True)
    got = torch.load(back, weights_only=True)
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    torchvision.models.resnet18().load_state_dict(got)
    rc, out, err = run_cli(capsys, "convert", str(st), str(back))
    assert rc == 2 and "exists; pass --force" in err
    assert run_cli(capsys, "convert", str(st), str(back), "--force")[0] == 0


def test_convert_hint_names_the_option(tmp_path, capsys):
    ten = tmp_path / "ten.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ten)
    rc, out, err = run_cli(capsys, "convert", str(ten), str(tmp_path / "x.safetensors"), "--model", "resnet18")
    assert rc == 2 and "--num-classes 10" in err and "num_classes=" not in err


def test_convert_errors(tmp_path, capsys, photo_dir, r18_ckpt):
    rc, out, err = run_cli(capsys, "convert", str(r18_ckpt), str(tmp_path / "x.safetensors"), "--model", "resnet34")
    assert rc == 2 and "does not fit resnet34" in err
    assert not (tmp_path / "x.safetensors").exists()
    rc, out, err = run_cli(capsys, "convert", str(photo_dir / "coffee.png"), str(tmp_path / "y.pth"))
    assert rc == 2 and "coffee.png: not a checkpoint" in err
    odd = tmp_path / "odd.pth"
    torch.save({"a.weight": torch.zeros(3)}, odd)
    rc, out, err = run_cli(capsys, "convert", str(odd), str(tmp_path / "z.pth"))
    assert rc == 2 and "cannot tell which model" in err and "--model" in err


def test_info_shows_weights_and_gflops(capsys):
    rc, out, err = run_cli(capsys, "info", "resnet50")
    assert rc == 0
    assert "gflops: 4.089 (multiply-adds at 224x224, published)" in out
    assert "IMAGENET1K_V2 (default)" in out and "resnet50-0676ba61.pth" in out
    rc, out, err = run_cli(capsys, "info", "inception_v2", "--json")
    info = json.loads(out)
    assert info["weights"][0]["transform"]["channel_order"] == "BGR" and info["gflops"] == 2.04
    rc, out, err = run_cli(capsys, "info", "densenet264")
    assert "none published" in out and "counted" in out


def test_counted_gflops_match_the_published_figures():
    from vafunc.cli.weights import measured_gflops

    for name in ("resnet18", "mobilenet_v3_small", "googlenet", "inception_v2"):
        w = hub.get_weights(name)
        model = vafunc.get_model(name, **dict(w.config))
        assert measured_gflops(model, w.crop_size) == pytest.approx(w.gflops, rel=0.01), name
