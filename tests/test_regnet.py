"""RegNet: what the registry-driven oracle harness does not reach.

* the stage rule (:func:`vafunc.models.regnet.stage_params`) gives torchvision's
  ``BlockParams.from_init_params`` stages for every registered design, and for bottleneck
  multipliers other than 1 (no registered model uses one);
* a small custom design with a bottleneck multiplier, a custom stem width and class count, built
  against torchvision's ``RegNet`` class directly: names, shapes, eval and train outputs;
* the config's design checks.
"""

from __future__ import annotations

import pytest
import torch
from oracle import perturb
from torchvision.models.regnet import BlockParams, RegNet  # noqa: E402

import vafunc
from vafunc.models import regnet as R


def _tv_stages(bp):
    return [(w, d, g) for w, d, g in zip(bp.widths, bp.depths, bp.group_widths)]


@pytest.mark.parametrize("name", sorted(R.DESIGNS))
def test_stages_equal_torchvision_block_params(name):
    d, w0, wa, wm, gw, se = R.DESIGNS[name]
    for bm in (1.0, 0.5, 2.0 / 3.0):
        bp = BlockParams.from_init_params(
            depth=d, w_0=w0, w_a=wa, w_m=wm, group_width=gw, bottleneck_multiplier=bm, se_ratio=se
        )
        assert [tuple(s) for s in R.stage_params(d, w0, wa, wm, gw, bm)] == _tv_stages(bp), (name, bm)
    cfg = vafunc.get_model(f"regnet_{name}").config
    assert cfg.stages == R.stage_params(d, w0, wa, wm, gw)


@pytest.mark.parametrize("se_ratio", [None, 0.25])
def test_custom_design_against_torchvision_class(se_ratio):
    design = dict(depth=7, w_0=16, w_a=9.5, w_m=2.1, group_width=8, bottleneck_multiplier=0.5)
    ref = RegNet(BlockParams.from_init_params(**design, se_ratio=se_ratio), num_classes=11, stem_width=24)
    model = vafunc.get_model("regnet_y_400mf", **design, se_ratio=se_ratio, num_classes=11, stem_width=24)
    mine = vafunc.to_state_dict(*model.init(device="meta"))
    theirs = ref.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == v.shape for k, v in theirs.items())
    x = torch.randn(3, 3, 45, 38)
    ref = perturb(ref.eval(), seed=3, size=(3, 45, 38))
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        y, _ = model.apply(params, state, x)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
        ref.train()
        y, new_state = model.apply(params, state, x, train=True)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    flat = vafunc.flatten(new_state)
    for k, v in ref.state_dict().items():
        if k in flat:
            torch.testing.assert_close(flat[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    "bad",
    [
        dict(w_0=20),
        dict(w_0=0),
        dict(w_a=-1.0),
        dict(w_m=1.0),
        dict(depth=0),
        dict(bottleneck_multiplier=0.0),
        dict(se_ratio=-0.1),
        dict(stem_width=0),
    ],
)
def test_invalid_designs_are_refused(bad):
    with pytest.raises(ValueError):
        vafunc.get_model("regnet_x_400mf", **bad)
