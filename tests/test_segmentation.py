"""torchvision's segmentation models beyond the registry batteries (tests/test_oracle.py compares every
one at its default config): the auxiliary heads in eval and train mode, a user's hook on the
compat module's backbone, the train step's loss against torchvision's recipe, and a U-Net that
learns to segment synthetic shapes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from oracle import build_reference, perturb

import torch_compat
import vafunc
import vafunc.metrics as M
from vafunc.training.train import accuracy, make_train_step, segmentation_loss


def _pair(name, **config):
    model = vafunc.get_model(name, **config)
    ref = build_reference(name, **config)
    perturb(ref, 0, (3, 48, 56))
    # copies: the reference's train-mode forward updates its buffers in place
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    return model, ref, params, state


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_aux_head_equals_torchvision(train):
    """``aux_loss=True``: ``{"out", "aux"}`` as torchvision's, and in train mode the same updated
    BatchNorm statistics (dropout off on both sides: the heads' rates are not config)."""
    model, ref, params, state = _pair("deeplabv3_mobilenet_v3_large", aux_loss=True)
    assert model.num_params() == 11_029_328
    x = torch.randn(3, 3, 48, 56, dtype=torch.float64)
    ref = ref.double().train(train)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    params, state = (vafunc.tree_map(lambda t: t.double() if t.is_floating_point() else t, t) for t in (params, state))
    with torch.no_grad():
        want = ref(x)
    got, new_state = model.apply(params, state, x, train=train, rng=vafunc.random.key(0) if train else None)
    assert list(got) == ["out", "aux"] == list(want)
    if not train:
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)
    else:  # dropout draws differ: compare the statistics before the dropouts (all but the BatchNorm
        # after ASPP's projection, classifier.2)
        buffers = dict(ref.named_buffers())
        flat = {k: v for k, v in vafunc.flatten(new_state).items() if not k.startswith("classifier.2.")}
        assert len(flat) == len(buffers) - 3
        for k, v in flat.items():
            torch.testing.assert_close(v, buffers[k].to(v.dtype), rtol=1e-9, atol=1e-9, msg=k)


def test_config_errors_name_the_choice():
    with pytest.raises(ValueError, match="LR-ASPP has no auxiliary head"):
        vafunc.get_model("lraspp_mobilenet_v3_large", aux_loss=True)
    with pytest.raises(ValueError, match="FCN on a ResNet only"):
        vafunc.get_model("fcn_resnet50", backbone="mobilenet_v3_large")
    with pytest.raises(ValueError, match="head must be one of"):
        vafunc.get_model("fcn_resnet50", head="pspnet")


def test_a_hook_on_the_compat_backbone_fires_as_on_torchvision():
    """A segmentation user's recipe: a forward hook on ``backbone.layer4``, the same map on both."""
    model, ref, params, state = _pair("fcn_resnet50")
    compat = torch_compat.from_model(model, params, state).eval()
    x = torch.randn(1, 3, 40, 48)
    got = {}
    for name, m in (("ref", ref), ("compat", compat)):
        h = m.get_submodule("backbone.layer4").register_forward_hook(lambda mod, a, y, n=name: got.__setitem__(n, y))
        with torch.no_grad():
            out = m(x)["out"]
        h.remove()
        assert out.shape == (1, 21, 40, 48)
    assert got["compat"].shape == (1, 2048, 5, 6)  # output stride 8: the dilated stages keep the map
    torch.testing.assert_close(got["compat"], got["ref"], rtol=1e-5, atol=1e-5)
    assert isinstance(compat.backbone.layer4[0].conv2, torch.nn.Conv2d)
    assert compat.backbone.layer4[0].conv2.dilation == ref.backbone.layer4[0].conv2.dilation == (2, 2)


def test_segmentation_loss_is_torchvisions_recipe():
    """torchvision's references/segmentation criterion: cross entropy with ignore_index=255 on
    ``out``, plus 0.5 times that on ``aux``; written here from its definition."""
    g = torch.Generator().manual_seed(0)
    out, aux = torch.randn(2, 21, 9, 11, generator=g), torch.randn(2, 21, 9, 11, generator=g)
    y = torch.randint(0, 21, (2, 9, 11), generator=g)
    y[:, :2] = 255
    keep = y != 255

    def ce(logits):  # mean over the counted pixels of -log softmax at the label
        logp = logits.log_softmax(1).permute(0, 2, 3, 1)[keep]
        return -logp.gather(1, y[keep][:, None]).mean()

    torch.testing.assert_close(segmentation_loss({"out": out, "aux": aux}, y), ce(out) + 0.5 * ce(aux))
    torch.testing.assert_close(segmentation_loss({"out": out}, y), ce(out))
    torch.testing.assert_close(segmentation_loss(out, y), ce(out))
    want = ((out.argmax(1) == y) & keep).sum() / keep.sum()
    torch.testing.assert_close(accuracy({"out": out}, y), want)


def shapes(n, size, g):
    """Images of one disc or square on noise and their masks (0 background, 1 disc, 2 square)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r = int(torch.randint(3, 7, (), generator=g))
        cy, cx = (int(v) for v in torch.randint(r + 1, size - r - 1, (2,), generator=g))
        if i % 2:
            mask = (yy - cy).abs().maximum((xx - cx).abs()) <= r
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        y[i][mask] = 1 + i % 2
        x[i, 0][mask] += 1.0
    return x, y


def test_unet_learns_discs_and_squares():
    """A small padded U-Net trained with make_train_step segments synthetic discs and squares on
    noise: mean IoU over the three classes >= 0.9 on 64 new images within 200 steps (measured: from
    step 120 on, 0.94-0.97)."""
    g = torch.Generator().manual_seed(0)
    model = vafunc.get_model("unet", in_channels=1, num_classes=3, widths=(8, 16, 32), padding="same", norm="batch")
    params, state = model.init(0)
    opt = vafunc.optim.adamw(3e-3, weight_decay=0.0)
    step = make_train_step(model, opt)
    opt_state = opt.init(params)
    xt, yt = shapes(64, 24, torch.Generator().manual_seed(1))
    for i in range(200):
        x, y = shapes(16, 24, g)
        params, state, opt_state, metrics = step(params, state, opt_state, x, y)
        if i % 20 == 19:
            with torch.no_grad():
                pred = model.apply(params, state, xt)[0].argmax(1)
            miou = M.segmentation_scores(M.confusion_matrix(pred, yt, 3))["mean_iou"]
            if miou >= 0.9:
                break
    assert miou >= 0.9, f"mean IoU {miou:.3f} after {i + 1} steps"


def test_torchvision_builder_keywords_are_config():
    """The oracle's builders take the same keywords (num_classes, aux_loss) as vafunc's config."""
    ref = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    model = vafunc.get_model("lraspp_mobilenet_v3_large", num_classes=5)
    assert model.num_params() == sum(p.numel() for p in ref.parameters())


# --------------------------------------------------------------------------- weights and predict


def test_table_has_torchvisions_segmentation_checkpoints():
    """Every torchvision segmentation checkpoint, with its facts: file, parameters, the reported
    mean IoU and pixel accuracy, the 21 categories, the evaluation transform and the config."""
    from vafunc.io import hub

    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        for tv in torchvision.models.get_model_weights(name):
            w = hub.get_weights(name, tv.name)
            assert (w.url, w.num_params) == (tv.url, tv.meta["num_params"])
            reported = tv.meta["_metrics"]["COCO-val2017-VOC-labels"]
            assert w.metrics == {"miou": reported["miou"], "pixel_acc": reported["pixel_acc"]}
            assert list(w.categories) == tv.meta["categories"]
            t = tv.transforms()
            assert (w.resize_size, w.crop_size, w.mean, w.std) == (t.resize_size[0], None, tuple(t.mean), tuple(t.std))
            assert dict(w.config) == ({} if name.startswith("lraspp") else {"aux_loss": True})


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("VAFUNC_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_pretrained_and_predict_write_the_mask(torch_home, tmp_path, capsys):
    """A checkpoint in torchvision's layout (aux head included, as published) in the torch.hub cache:
    ``pretrained`` builds the model its row asks for; ``vafunc predict`` on a real photograph writes the
    mask picture and counts the pixels of each class as torchvision's own model with its preset does."""
    import json

    import numpy as np
    from PIL import Image
    from skimage import data

    from vafunc.cli.app import main
    from vafunc.io import hub

    name = "deeplabv3_mobilenet_v3_large"
    ref = build_reference(name, aux_loss=True)
    perturb(ref, 0, (2, 64, 64))
    w = hub.get_weights(name)
    w.cache_path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), w.cache_path)
    model, params, state = hub.pretrained(name)
    assert model.config.aux_loss and set(params) == {"backbone", "classifier", "aux_classifier"}

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()[::4, ::4]).save(photo)  # 100 x 150
    out = tmp_path / "masks"
    assert main(["predict", str(photo), "--model", name, "--json", "--out-dir", str(out), "-q"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    mask_png = np.asarray(Image.open(result["mask"]))
    assert mask_png.shape == (100, 150, 3)

    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    x = preset(Image.open(photo))[None]  # torchvision resizes a PIL image with Pillow, as vafunc predict does
    with torch.no_grad():
        labels = ref(x)["out"].argmax(1, keepdim=True).float()
    labels = torch.nn.functional.interpolate(labels, size=(100, 150), mode="nearest").long().reshape(-1)
    counts = torch.bincount(labels, minlength=21)
    got = {c["label"]: c["pixels"] for c in result["classes"]}
    assert sum(got.values()) == 100 * 150
    cats = w.categories
    assert got == {cats[i]: int(n) for i, n in enumerate(counts) if n > 0}
