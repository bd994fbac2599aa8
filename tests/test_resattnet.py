"""Residual Attention Networks (vafunc/models/resattnet.py) beyond the registry batteries.

The batteries compare resattnet56/92 with pytorchcv at sizes where its mask branch halves exactly,
with its fixed ``AvgPool2d(7)`` replaced by the global pool (tests/oracle.py, PYTORCHCV_GLOBAL_POOL).
Here: the unmodified pytorchcv network at 224 (its only size), odd sizes against pytorchcv with
its up-sampling sized to the skip (the one change vafunc makes), the depths of pytorchcv's table,
and the hooks of the two modules that return pairs (the hourglass, the bottleneck).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from oracle import build_reference_fast, perturb

import torch_compat
import vafunc
from vafunc.models.resattnet import DEPTHS

pytorchcv = pytest.importorskip("pytorchcv.model_provider")


def _upsample_to_skip(ref: torch.nn.Module) -> torch.nn.Module:
    """pytorchcv's network with each mask branch up-sampled to its skip's size (``align_corners=True``),
    not by 2, and the global pool: its up blocks stop at their residual units and the hourglass's
    merge resizes. Where every pooled side halves exactly, that is pytorchcv's computation."""

    def merge(self, x, y):
        if y is None:
            return x
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    for mod in ref.modules():
        if type(mod).__name__ == "UpAttBlock":
            mod.upsample = torch.nn.Identity()
        elif type(mod).__name__ == "Hourglass":
            mod._merge = types.MethodType(merge, mod)
    ref.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
    return ref


def _reference(name: str, seed: int) -> torch.nn.Module:
    """:func:`_upsample_to_skip` of pytorchcv's network with perturbed weights and BatchNorm
    statistics (calibrated on a 33x35 batch, where pytorchcv itself could not run)."""
    torch.manual_seed(seed)
    return perturb(_upsample_to_skip(build_reference_fast(name, seed)), seed=seed, size=(2, 33, 35)).eval()


@pytest.fixture(scope="module")
def pair():
    """``(model, ref, params, state)``: resattnet56 and its :func:`_reference`, the same tensors (copies)."""
    ref = _reference("resattnet56", 4)
    model = vafunc.get_model("resattnet56")
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    return model, ref, params, state


def _close(got, want, rel=1e-5):
    scale = float(want.abs().max())
    assert scale > 0 and float((got - want).abs().max()) <= rel * scale, float((got - want).abs().max()) / scale


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resattnet56", "resattnet92"])
def test_equals_unmodified_pytorchcv_at_224(name):
    """At 224 (pytorchcv's only size) the global pool is pytorchcv's ``AvgPool2d(7)`` and the
    up-sampling to the skip's size its ``scale_factor=2``: the logits are those of pytorchcv's
    network as it is. (The default suite compares at 64x61 and 32x32 through the registry
    batteries, where only the pool differs.)"""
    ref = pytorchcv.get_model(name, pretrained=False).eval()
    ref.load_state_dict(_reference(name, 3).state_dict())  # (no tensors in the modules that differ)
    model = vafunc.get_model(name)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref(x)
        got, _ = model.apply(params, state, x)
    assert want.std() > 0.1  # an output that depends on the weights (calibrated statistics)
    _close(got, want)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_odd_sizes_up_sample_to_the_skip(pair, train):
    """Where a pooled side is odd (45: stage-1 map 12, pooled 6, 3, 2; 53: 14, 7, 4, 2) pytorchcv
    cannot add its doubled map to the skip; vafunc up-samples to the skip's size, which is
    pytorchcv's network with that one change. Every size from the probed minimum works."""
    model, ref, params, state = pair
    ref = copy.deepcopy(ref).train(train)
    x = torch.randn(3, 3, 45, 53)
    with torch.no_grad():
        want = ref(x)
        got, new_state = model.apply(params, state, x, train=train)
    _close(got, want, 1e-4 if train else 1e-5)
    if train:  # the running statistics move as pytorchcv's, in the mask branch too
        flat, theirs = vafunc.to_state_dict(params, new_state), ref.state_dict()
        k = "features.stage1.unit2.hg.up_seq.up1.res_blocks.blocks.block1.body.conv1.bn.running_mean"
        _close(flat[k], theirs[k], 1e-4)
    assert (model.min_size, model.size_multiple, model.max_size) == (1, 1, None)
    with torch.no_grad():
        small, _ = model.apply(params, state, torch.randn(2, 3, model.min_size, model.min_size))
    assert small.shape == (2, 1000) and torch.isfinite(small).all()


#: pytorchcv's own parameter counts of its depths (its ``resattnet.py`` asserts them)
PYTORCHCV_COUNTS = {
    56: 31810728,
    92: 52466344,
    128: 65294504,
    164: 78122664,
    200: 90950824,
    236: 103778984,
    452: 182285224,
}


@pytest.mark.parametrize("blocks", [128, pytest.param(452, marks=pytest.mark.slow)])
def test_other_depths_are_pytorchcv_s(blocks):
    """The depth table (``blocks=``) builds pytorchcv's networks: counts and names on the meta device."""
    assert set(DEPTHS) == set(PYTORCHCV_COUNTS)
    model = vafunc.get_model("resattnet56", blocks=blocks)
    assert model.num_params() == PYTORCHCV_COUNTS[blocks]
    with torch.device("meta"):
        ref = pytorchcv.get_model(f"resattnet{blocks}", pretrained=False)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert list(model.state_dict_shapes().items()) == list(want.items())


def test_config_errors_name_the_depths():
    with pytest.raises(ValueError, match=r"blocks must be one of \[56, 92"):
        vafunc.get_model("resattnet56", blocks=50)


def test_hooks_on_modules_that_return_pairs(pair):
    """The hourglass (mask, trunk) and the bottleneck (residual, pre-activation) return pairs in
    pytorchcv: the compat tree's modules are called there too, and their hooks see the same pairs."""
    model, ref, params, state = pair
    compat = torch_compat.from_model(model, params, state).eval()
    paths = ("features.stage2.unit2.hg", "features.stage1.unit1.body", "features.stage3.unit2.middle_block")
    seen: dict = {}
    handles = []
    for side, net in (("ref", ref), ("compat", compat)):
        for p in paths:
            hook = lambda mod, args, out, key=(side, p): seen.setdefault(key, []).append(out)
            handles.append(net.get_submodule(p).register_forward_hook(hook))
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, 45, 53)
            ref(x), compat(x)
    finally:
        for h in handles:
            h.remove()
    for p in paths:
        (want,), (got,) = seen["ref", p], seen["compat", p]
        assert type(got) is type(want), p
        for a, b in zip(*((got, want) if isinstance(want, tuple) else ((got,), (want,)))):
            _close(a, b)
