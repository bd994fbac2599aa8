"""The research transforms on timm's ViTs (vafunc/models/timm_vit.py): per-sample gradients and
norms through the tape, DP-SGD's clipped step and members-mode ensembles, each against the loop
of single-sample (single-member) computations, in float64.

The models are the registered configs shrunk (``embed_dim=24, depth=2``) and at small images, so
every kind of token network the family holds is covered in a few seconds: class + distillation
tokens, registers + layer scale, the attention-pool head, RoPE + packed SwiGLU with EVA's q/v
biases, separate q/k/v + sub-LN, CLIP's pre-norm + QuickGELU, DeiT III's layer scale with
position embedding on the patches only."""

import math

import pytest
import torch
from oracle import check_tape_against_loop, per_sample_loop

import vafunc
from vafunc.research import members, persample
from vafunc.training import optim
from vafunc.training.train import make_dp_train_step

SMALL = dict(embed_dim=24, num_heads=2, depth=2, num_classes=5)
# (name, stored img_size, input size): an input other than the stored size resamples the position embedding
CASES = [
    ("deit_base_distilled_patch16_224", 32, 32),  # class + distillation tokens, two heads
    ("vit_small_patch14_reg4_dinov2", 28, 42),  # registers, layer scale, resampled position embedding
    ("vit_base_patch16_siglip_224", 32, 32),  # no class token, attention-pool head (latent query)
    ("eva02_tiny_patch14_224", 28, 28),  # RoPE, packed SwiGLU, q/v biases beside a fused qkv
    ("vit_base_patch16_clip_quickgelu_224", 32, 32),  # norm_pre, bias-free patch embedding, QuickGELU
    pytest.param("eva02_base_patch14_224", 28, 28, marks=pytest.mark.slow, id="eva02_base"),  # q/k/v, sub-LN
    pytest.param("deit3_small_patch16_224", 32, 32, marks=pytest.mark.slow, id="deit3_small"),  # no_embed_class
]
F64 = torch.float64


def _problem(name, img, size, batch=3, **kw):
    model = vafunc.get_model(name, img_size=img, **{**SMALL, **kw})
    params, state = model.init(0, dtype=F64)
    g = torch.Generator().manual_seed(2)
    # O(1) perturbations: layer scales (1e-5 at init) and tokens (1e-6) must carry gradient
    params = vafunc.tree_map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=F64)
    y = torch.randint(0, 5, (batch,), generator=g)
    return model, params, state, x, y


@pytest.mark.parametrize("name,img,size", CASES)
def test_taped_grads_and_norms_equal_the_loop(name, img, size):
    model, params, state, x, y = _problem(name, img, size)
    check_tape_against_loop(model, params, state, x, y, reached=True)


@pytest.mark.parametrize(
    "name", ["deit_base_distilled_patch16_224", "vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224"]
)
def test_every_registered_vit_is_taped(name):
    """The full-size registered config (probed on the meta device), not only the shrunk one."""
    model = vafunc.get_model(name)
    assert persample.tape_covers(model) and persample.tape_covers(model, "norms")


def test_dp_step_equals_clipping_the_loop():
    """DP-SGD without noise: clip each sample's gradient (the loop's) to C and average, what the
    step applies (plain SGD at lr 1 reads it back as ``p - p_new``); registers + layer scale."""
    model, params, state, x, y = _problem("vit_small_patch14_reg4_dinov2", 28, 28, batch=4)
    loops = per_sample_loop(model, params, state, x, y)
    norms = torch.stack([torch.cat([t.flatten() for t in w.values()]).norm() for w in loops])
    s = norms.sort().values
    clip = float(s[1] + s[2]) / 2  # two samples clipped, two not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    want = {k: sum(f * w[k] for f, w in zip(factors, loops)) / len(x) for k in loops[0]}
    step = make_dp_train_step(model, optim.sgd(1.0), clip_norm=clip, noise_multiplier=0.0, train=False)
    new, _, _, metrics = step(params, state, optim.sgd(1.0).init(params), x, y, vafunc.random.key(0))
    got = vafunc.flatten(vafunc.tree_map(torch.sub, params, new))
    assert list(got) == list(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-12, msg=k)
    assert float(metrics["clipped"]) == pytest.approx(0.5)
    assert math.isclose(float(metrics["grad_norm"]), float(norms.mean()), rel_tol=1e-9)


@pytest.mark.parametrize(
    "name,img,kw",
    [
        ("vit_small_patch14_reg4_dinov2", 28, {}),  # registers, layer scale, resampled position embedding (42)
        ("eva02_base_patch14_224", 28, {}),  # RoPE, separate q/k/v, sub-LN
        pytest.param(  # layer scale, keyed dropout and stochastic depth masks
            "deit3_small_patch16_224", 32, dict(drop_path_rate=0.2, proj_drop_rate=0.1), marks=pytest.mark.slow
        ),
        pytest.param("vit_base_patch16_siglip_224", 32, {}, marks=pytest.mark.slow),  # the attention-pool latent
    ],
)
def test_members_mode_equals_the_loop(name, img, kw):
    model = vafunc.get_model(name, img_size=img, **{**SMALL, **kw})
    assert members.covers(model)
    params, state = vafunc.ensemble_init(model, 3, key=1, dtype=F64)
    g = torch.Generator().manual_seed(3)
    params = vafunc.tree_map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    size = 42 if "dinov2" in name else img
    x = torch.randn(2, 3, size, size, generator=g, dtype=F64)
    for train in (False, True):
        rng = vafunc.random.key(4) if train else None
        got, _ = vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method="batched")
        want, _ = vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method="loop")
        assert got.shape == want.shape == (3, 2, 5)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    xs = torch.randn(3, 2, 3, size, size, generator=g, dtype=F64)  # one batch per member
    torch.testing.assert_close(
        vafunc.ensemble_apply(model, params, state, xs, method="batched")[0],
        vafunc.ensemble_apply(model, params, state, xs, method="loop")[0],
        rtol=1e-9,
        atol=1e-12,
    )


def test_auto_takes_members_mode_at_32_and_the_loop_at_224():
    """``auto``'s rule (members.prefer): a small ViT's batch of 8 at 32x32 is members mode, at 224
    the loop (the faster lowering on a CPU there; benchmarks/README.md)."""
    model = vafunc.get_model("deit_tiny_patch16_224", patch_size=4, img_size=32, depth=2)
    assert members.prefer(model, 16, torch.empty(8, 3, 32, 32, device="meta"))
    assert not members.prefer(vafunc.get_model("deit_tiny_patch16_224"), 16, torch.empty(8, 3, 224, 224, device="meta"))
