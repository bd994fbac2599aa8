"""CBAM-ResNet-50 (Woo et al. 2018, arXiv:1807.06521): the parameter count of the paper's Table 4
and the CBAM gate (vafunc.core.kit.Scope.cbam) against timm's CbamModule on the same weights; pytorchcv's
cbam_resnet50 checkpoints load (translated by the resnet family's remap) and give pytorchcv's logits."""

from __future__ import annotations

import pytest
import torch
from oracle import perturb

import vafunc
from vafunc.core import tree as vtree
from vafunc.core.init import Initializer
from vafunc.core.kit import Scope


def test_cbam_resnet50_parameter_count_is_the_paper_s():
    n = vafunc.get_model("cbam_resnet50").num_params()
    assert n == 28_089_624
    assert round(n / 1e6, 2) == 28.09  # Table 4: ResNet50 + CBAM, 28.09M


def _run_cbam(p: dict, s: dict, x: torch.Tensor, squeeze: int, train: bool):
    m = Scope(p, s, train=train)
    y = m.cbam(x, squeeze)
    return y, m.new


@pytest.mark.parametrize("train", [False, True])
def test_cbam_gate_equals_timm_cbam_module(train):
    cbam = pytest.importorskip("timm.layers.cbam")
    torch.manual_seed(0)
    c, squeeze = 64, 4
    ref = cbam.CbamModule(c, rd_ratio=1 / 16, mlp_bias=True).train(train)
    with torch.no_grad():  # non-trivial weights and BatchNorm statistics
        for t in ref.parameters():
            t.normal_(0.0, 0.5)
        bn = ref.spatial.conv.bn
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    # the kit's tree: declared on meta tensors, filled with the reference's tensors by name
    p = {}
    ini = Initializer.from_key(0, device="meta")
    Scope(p, None, ini=ini).cbam(torch.empty(2, c, 9, 11, device="meta"), squeeze, init="kaiming_fan_out_default_bias")
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert list(vafunc.flatten(p)) == list(sd)  # the reference's names, in its order
    params = vtree.unflatten({k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in vtree.STATE_LEAVES})
    state = vtree.unflatten({k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] in vtree.STATE_LEAVES})
    assert set(vafunc.flatten(params)) == {k for k, _ in ref.named_parameters()}

    x = torch.randn(2, c, 9, 11)
    y, new = _run_cbam(params, state, x, squeeze, train)
    with torch.no_grad():
        want = ref(x.clone())
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    if train:  # the spatial gate's BatchNorm statistics move as timm's
        got = vafunc.flatten(new)
        for k in ("running_mean", "running_var"):
            torch.testing.assert_close(got[f"spatial.conv.bn.{k}"], getattr(bn, k), rtol=0, atol=0)


def test_pytorchcv_checkpoint_loads_and_equals_pytorchcv_at_224(tmp_path):
    """pytorchcv's ``cbam_resnet50`` (the official CBAM code's layout, whose trained weights pytorchcv
    publishes): its state_dict, saved as a checkpoint, loads through ``load_weights`` (the resnet
    family's ``remap``: names, linear MLP weights to 1x1 convs, the spatial conv's ``[max, mean]``
    input channels to timm's ``[mean, max]``), and the model's logits at 224, pytorchcv's size (a
    fixed 7x7 average pool), are pytorchcv's."""
    models = pytest.importorskip("pytorchcv.model_provider")
    torch.manual_seed(0)
    ref = models.get_model("cbam_resnet50", pretrained=False).eval()
    pool = ref.features.final_pool  # calibrated cheaply on 64x64 through a global pool, then put back
    ref.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
    perturb(ref, seed=1, size=(2, 64, 64))
    ref.features.final_pool = pool
    path = tmp_path / "cbam_resnet50_pytorchcv.pth"
    torch.save(ref.state_dict(), path)
    model = vafunc.get_model("cbam_resnet50")
    with pytest.warns(UserWarning, match="translated 480 pytorchcv CBAM-ResNet keys"):
        params, state = vafunc.load_weights(model, path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref(x)
        got, _ = model.apply(params, state, x)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # the one layout difference that a shape check cannot see: the spatial gate's input channels
    w = ref.state_dict()["features.stage1.unit1.cbam.sp_gate.conv.conv.weight"]
    assert torch.equal(vafunc.flatten(params)["layer1.0.se.spatial.conv.conv.weight"], w.flip(1))
