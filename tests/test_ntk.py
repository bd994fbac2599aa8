"""vafunc.ntk against the two methods of the torch.func NTK tutorial (Jacobian contraction and
NTK-vector products), written (benchmarks/ntk_tutorial.py) against the reference ``nn.Module`` with the same weights
(``torch.func.functional_call``): the tutorial's own small CNN, and torchvision's resnet18 with 10
classes at 2 x 4 images @ 32 (``-m slow``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vafunc
from benchmarks.ntk_tutorial import CNN, TutorialCNN, ntk_jacobian_contraction, ntk_vector_products
from vafunc.ntk import ntk


def _setup(model, module, n1, n2, dtype=torch.float64, seed=0):
    module = module.to(dtype).eval()
    params, state = vafunc.from_state_dict(model, module.state_dict())
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, 3, 32, 32, generator=g, dtype=dtype)
    x2 = torch.randn(n2, 3, 32, 32, generator=g, dtype=dtype)
    ref = {k: v.detach() for k, v in module.named_parameters()}
    return params, state, x1, x2, ref


def test_small_cnn_equals_both_tutorial_methods():
    torch.manual_seed(0)
    module = TutorialCNN()
    params, state, x1, x2, ref = _setup(CNN, module, 2, 3)
    want = ntk_jacobian_contraction(module, ref, x1, x2, ["full", "trace", "diagonal"])
    torch.testing.assert_close(ntk_vector_products(module, ref, x1, x2, "full"), want["full"], rtol=1e-9, atol=1e-9)
    for mode, chunk in [("full", None), ("full", 2), ("trace", None), ("diagonal", 1)]:  # 1 pass, or blocks
        got = ntk(CNN, params, state, x1, x2, mode=mode, chunk=chunk)
        torch.testing.assert_close(got, want[mode], rtol=1e-9, atol=1e-9)
    got = ntk(CNN, params, state, x1, x2, method="jacobian", chunk=2)
    torch.testing.assert_close(got, want["full"], rtol=1e-9, atol=1e-9)


def test_bn_resnet_symmetric_kernel_by_both_paths():
    """resnet18 (BatchNorm in eval, the ghost contraction on its last stages) at 8 x 8 and the
    kernel of one batch with itself, symmetric blocks mirrored, against Jacobian contraction."""
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=3)
    for mod in module.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    model = vafunc.get_model("resnet18", num_classes=3)
    module = module.double().eval()
    params, state = vafunc.from_state_dict(model, module.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ref = {k: v.detach() for k, v in module.named_parameters()}
    want = ntk_jacobian_contraction(module, ref, x, x, ["full"])["full"]
    got = ntk(model, params, state, x, mode="full", chunk=2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, got.permute(1, 0, 3, 2))  # K(x_i, x_j)_ab = K(x_j, x_i)_ba


def test_bad_input_is_a_clear_error():
    params, state = CNN.init(0)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="mode must be one of"):
        ntk(CNN, params, state, x, mode="diag")
    with pytest.raises(ValueError, match="image batch"):
        ntk(CNN, params, state, x[0])
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        ntk(CNN, params, state, x, chunk=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_resnet18_equals_both_tutorial_methods(mode):
    """The issue's case: resnet18, 10 classes, 2 x 4 images @ 32 (float32; the tutorial methods'
    Jacobians are 1.8 GB each)."""
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=10)
    params, state, x1, x2, ref = _setup(vafunc.get_model("resnet18", num_classes=10), module, 4, 4, torch.float32)
    want = ntk_jacobian_contraction(module, ref, x1, x2, [mode])[mode]
    other = ntk_vector_products(module, ref, x1, x2, mode)
    got = ntk(vafunc.get_model("resnet18", num_classes=10), params, state, x1, x2, mode=mode)
    scale = want.abs().max()
    torch.testing.assert_close(other / scale, want / scale, rtol=0, atol=2e-4)  # float32 sums
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-4)
