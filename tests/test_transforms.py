"""vafunc.serving.transforms against torchvision's ``Weights.transforms()``, Pillow, timm and Cadene on
real photographs (scikit-image's sample images)."""

from __future__ import annotations

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TVF  # noqa: E402
from PIL import Image as Image
from skimage import data as skdata
from torchvision.transforms import InterpolationMode  # noqa: E402

from vafunc.io import hub
from vafunc.serving import transforms as T

PHOTOS = ("chelsea", "coffee", "astronaut")  # 300x451, 400x600, 512x512 RGB


@pytest.fixture(scope="module")
def photos():
    return {n: getattr(skdata, n)() for n in PHOTOS}


def _tensor(a):
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def _unnormalize(x, mean, std):
    return x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


def _tv_specs():
    """Distinct evaluation transforms of the torchvision checkpoints of registered models."""
    import vafunc

    seen = {}
    for name in vafunc.list_models():
        for w in hub.list_weights(name):
            if w.source != "torchvision":
                continue
            key = (w.resize_size, w.crop_size, w.interpolation, w.normalization)
            seen.setdefault(key, w)
    return sorted(seen.values(), key=lambda w: (w.interpolation, w.resize_size, w.crop_size))


TV_SPECS = _tv_specs()


def test_specs_cover_both_interpolations():
    assert {w.interpolation for w in TV_SPECS} == {"bilinear", "bicubic"}


# --------------------------------------------------------------------------- resize


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_pil_method_is_pillow(photos, interpolation):
    """The tensor code reproduces Pillow's 8-bit resampling (down- and up-scaling)."""
    mode = InterpolationMode(interpolation)
    for name, a in photos.items():
        for size in (100, 232, 256, 299, 342, 480, 600):
            ref = TVF.pil_to_tensor(TVF.resize(Image.fromarray(a), [size], interpolation=mode)).int()
            got = T.resize(_tensor(a), size, interpolation).int()
            assert got.shape == ref.shape, (name, size)
            assert (got - ref).abs().max() <= 1, (name, size)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_torch_method_is_torchvision_tensor_resize(photos, interpolation):
    mode = InterpolationMode(interpolation)
    for a in photos.values():
        for size in (232, 333, 480):
            t = _tensor(a)
            ref = TVF.resize(t, [size], interpolation=mode, antialias=True)
            got = T.resize(t, size, interpolation, method="torch")
            assert got.dtype == torch.uint8
            assert torch.equal(got, ref)
            reff = TVF.resize(t.float() / 255, [size], interpolation=mode, antialias=True)
            torch.testing.assert_close(T.resize(t.float() / 255, size, interpolation, method="torch"), reff)


def test_resize_float_images_agree_across_methods(photos):
    """Without 8-bit rounding and clipping between the passes the two methods are one algorithm."""
    for a in photos.values():
        x = _tensor(a).float() / 255
        for interpolation in ("bilinear", "bicubic"):
            for size in (100, 256, 480):
                f = T.resize(x, size, interpolation)
                assert f.dtype == torch.float32
                torch.testing.assert_close(f, T.resize(x, size, interpolation, method="torch"), rtol=0, atol=1e-4)


def test_resized_shape_matches_torchvision():
    from torchvision.transforms.functional import _compute_resized_output_size

    for h, w in [(300, 451), (451, 300), (224, 224), (7, 1000), (1000, 7), (333, 334)]:
        for size in (1, 224, 256, 333):
            assert T.resized_shape(h, w, size) == tuple(_compute_resized_output_size((h, w), [size]))
    assert T.resized_shape(10, 20, (5, 7)) == (5, 7)
    with pytest.raises(ValueError, match="positive int"):
        T.resized_shape(10, 10, 0)


@pytest.mark.parametrize("h,w,crop", [(256, 341, 224), (255, 300, 224), (101, 99, 50), (30, 40, 64), (64, 31, 63)])
def test_center_crop_matches_torchvision(h, w, crop):
    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    assert torch.equal(T.center_crop(x, crop), TVF.center_crop(x, [crop]))


# --------------------------------------------------------------------------- the eval transforms


@pytest.mark.parametrize("w", TV_SPECS, ids=lambda w: f"{w.name}-{w.resize_size}-{w.crop_size}-{w.interpolation}")
def test_for_weights_equals_torchvision_on_photos(photos, w):
    """Within 1/255 before normalisation: ours on tensors vs torchvision on PIL images (Pillow path),
    and ours with method='torch' vs torchvision on tensors."""
    weights_enum = torchvision.models.get_model_weights(w.model)[w.tag]
    tv = weights_enum.transforms()
    ours = T.for_weights(w.model, w.tag)
    ours_t = T.for_weights(w.model, w.tag, method="torch")
    assert ours == w.transforms()
    for a in photos.values():
        ref = _unnormalize(tv(Image.fromarray(a)), w.mean, w.std)
        got = ours(_tensor(a))
        side = (w.crop_size, w.crop_size) if w.crop_size else tuple(ref.shape[-2:])  # segmentation: uncropped
        assert got.shape == (1, 3, *side) and got.dtype == torch.float32
        assert (_unnormalize(got[0], w.mean, w.std) - ref).abs().max() <= 1 / 255 + 1e-6
        # a PIL image or a file path goes through Pillow itself: the same numbers
        torch.testing.assert_close(ours(Image.fromarray(a)), got, rtol=0, atol=1e-6)
        ref_t = _unnormalize(tv(_tensor(a)), w.mean, w.std)
        got_t = ours_t(_tensor(a))[0]
        assert (_unnormalize(got_t, w.mean, w.std) - ref_t).abs().max() <= 1 / 255 + 1e-6


def test_for_weights_bn_inception_equals_cadene(photos):
    """Caffe convention: BGR, 0-255, mean 104/117/128 (Cadene's TransformImage)."""
    import pretrainedmodels as pm
    from pretrainedmodels.utils import TransformImage

    settings = pm.pretrained_settings["bninception"]["imagenet"]
    ref_tf = TransformImage(settings)
    ours = T.for_weights("inception_v2")
    assert (ours.channel_order, ours.input_scale, ours.mean) == ("BGR", 255.0, (104.0, 117.0, 128.0))
    for a in photos.values():
        ref = ref_tf(Image.fromarray(a))
        got = ours(_tensor(a))[0]
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1.0 + 1e-4  # 1/255 of the 0-255 range


@pytest.mark.parametrize(
    "model,timm_name", [("xception", "legacy_xception"), ("mobilenet_v1", "mobilenetv1_100.ra4_e3600_r224_in1k")]
)
def test_for_weights_timm_equals_timm(photos, model, timm_name):
    import timm
    from timm.data import create_transform, resolve_data_config

    m = timm.create_model(timm_name, pretrained=False)
    ref_tf = create_transform(**resolve_data_config({}, model=m))
    w = hub.get_weights(model)
    ours = T.for_weights(model)
    for a in photos.values():
        ref = _unnormalize(ref_tf(Image.fromarray(a)), w.mean, w.std)
        got = _unnormalize(ours(_tensor(a))[0], w.mean, w.std)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1 / 255 + 1e-6


# --------------------------------------------------------------------------- batching, devices, inputs


def test_batched_and_lists(photos):
    tf = T.for_weights("resnet50", "IMAGENET1K_V2")
    a = _tensor(photos["astronaut"])
    b = torch.stack([a, a.flip(-1)])
    out = tf(b)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out[0], tf(a)[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], tf(a.flip(-1))[0], rtol=0, atol=0)
    mixed = tf([_tensor(photos["chelsea"]), photos["coffee"], Image.fromarray(photos["astronaut"])])
    assert mixed.shape == (3, 3, 224, 224)
    torch.testing.assert_close(mixed[2], tf(a)[0], rtol=0, atol=1e-6)


def test_file_paths_and_decode(tmp_path, photos):
    p = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(p)
    assert torch.equal(T.decode(p), _tensor(photos["chelsea"]))
    tf = T.for_weights("resnet18")
    torch.testing.assert_close(tf(str(p)), tf(_tensor(photos["chelsea"])), rtol=0, atol=1e-6)
    gray = tmp_path / "gray.png"
    Image.fromarray(photos["chelsea"][:, :, 0]).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(photos["chelsea"]).convert("RGBA").save(rgba)
    assert T.decode(gray).shape == (3, 300, 451)
    assert torch.equal(T.decode(rgba), _tensor(photos["chelsea"]))


def test_unreadable_images_name_the_file(tmp_path, photos):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not an image"):
        T.decode(bad)
    p = tmp_path / "cut.png"
    Image.fromarray(photos["coffee"]).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png.*truncated or corrupt"):
        T.decode(p)
    with pytest.raises(ValueError, match="no such image"):
        T.decode(tmp_path / "missing.png")


def test_bad_inputs():
    with pytest.raises(ValueError, match="interpolation"):
        T.resize(torch.zeros(3, 8, 8), 4, "nearest")
    with pytest.raises(TypeError, match="uint8 or floating-point"):
        T.resize(torch.zeros(3, 8, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        T.center_crop(torch.zeros(8, 8), 4)
    with pytest.raises(TypeError, match="to_float first"):
        T.normalize(torch.zeros(3, 4, 4, dtype=torch.uint8), T.IMAGENET_MEAN, T.IMAGENET_STD)
    with pytest.raises(ValueError, match="3-channel"):
        T.for_weights("resnet18")(torch.zeros(1, 40, 40, dtype=torch.uint8))


def test_channel_order_and_scale():
    x = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    tf = T.Transform(20, 20, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0), channel_order="BGR", input_scale=255.0)
    want = x.flip(0).float() - torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    torch.testing.assert_close(tf(x)[0], want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(photos):  # pragma: no cover - needs a GPU
    a = _tensor(photos["coffee"])
    for method in ("pil", "torch"):
        tf = T.for_weights("efficientnet_b0", method=method)
        cpu, gpu = tf(a), tf(a.cuda())
        assert gpu.device.type == "cuda"
        atol = 0 if method == "pil" else 1 / 255 / 0.224 + 1e-5
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=atol)
