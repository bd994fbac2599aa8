"""Named intermediate features are the reference's module outputs on the same weights.

Every model with a reference is compared: one representative per family by default
(oracle.representatives), every model with ``-m slow``.
"""

import pytest
import torch
from oracle import ORACLE_SIZES, build_reference, fit, heavy_params, module_outputs, perturb
from oracle import sizes_to_test as sizes_for
from torchvision.models.feature_extraction import create_feature_extractor

import vafunc

#: BN-Inception's feature names are the Caffe graph's blob names (``inception_3a_output``), not
#: module paths of Cadene's module: test_classic_b checks its taps against the reference
WITH_REFERENCE = [
    n
    for n in vafunc.list_models()
    if getattr(vafunc.get_entry(n).reference, "source", "pretrainedmodels") != "pretrainedmodels"
]
TORCHVISION = [n for n in WITH_REFERENCE if vafunc.get_entry(n).reference.source == "torchvision"]
#: bottleneck blocks and the widest stages (resnet18, the resnet representative, has basic blocks)
ALSO = ("resnet50",)


@pytest.mark.parametrize("name", heavy_params(WITH_REFERENCE, also=ALSO))
def test_features_are_the_reference_modules_outputs(name):
    """Every feature name is a module path of the reference, and its value is that module's
    output. (Forward hooks, not torchvision's ``create_feature_extractor``: the extractor reads a
    container's path as its last inner graph node, which for ConvNeXt's stages is the last
    block's branch before the residual sum, and for a conv followed by an in-place ReLU is the
    conv's storage after the ReLU overwrote it.)"""
    torch.manual_seed(0)
    ref = perturb(build_reference(name), seed=2).eval()
    model = vafunc.get_model(name)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    names = model.feature_names
    assert len(names) >= 4, names
    if name in TORCHVISION:  # the names also work with torchvision's feature extraction
        create_feature_extractor(ref, names)
    pick = list(dict.fromkeys(names[:: max(1, len(names) // 6)] + [names[-1]]))
    m = model.min_size
    if getattr(model.config, "image_size", None) is not None or name in ORACLE_SIZES:  # references fixed to one size
        _, h, w = sizes_for(model)[0]
    else:
        h, w = fit(model, max(72, m + 8)), fit(model, max(64, m))
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        want = module_outputs(ref, pick, x)
        got, new_state = model.features(params, state, x, pick)
    assert new_state is state
    assert list(got) == pick
    for n in pick:
        assert got[n].shape == want[n].shape, n
        scale = max(float(want[n].abs().max()), 1e-6)
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n


def test_feature_shapes_and_strides_resnet():
    shapes = vafunc.get_model("resnet50").feature_shapes(224)
    assert [shapes[f"layer{i}"][-1] for i in range(1, 5)] == [56, 28, 14, 7]  # strides 4/8/16/32
    assert shapes["layer4"][1] == 2048


@pytest.mark.slow  # 15 s (inductor); features under vmap and grad stay in the default suite elsewhere
def test_features_under_vmap_and_compile():
    model = vafunc.get_model("resnet18")
    params, state = vafunc.ensemble_init(model, 2, key=0)
    x = torch.randn(2, 3, 48, 48)
    f = lambda p, s: model.features(p, s, x, ["layer2", "layer3"])[0]
    batched = torch.vmap(f)(params, state)
    for i, (p, s) in enumerate(zip(vafunc.unstack(params), vafunc.unstack(state))):
        want = f(p, s)
        for k in want:
            torch.testing.assert_close(batched[k][i], want[k], rtol=1e-5, atol=1e-5)
    p, s = vafunc.unstack(params)[0], vafunc.unstack(state)[0]
    compiled = torch.compile(f, fullgraph=True)(p, s)
    for k, v in f(p, s).items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-4)


def test_unknown_feature_name_is_an_error():
    model = vafunc.get_model("resnet18")
    p, s = model.init(device="meta")
    with pytest.raises(ValueError, match="layer5"):
        model.features(p, s, torch.randn(1, 3, 32, 32, device="meta"), ["layer5"])
