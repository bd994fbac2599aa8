"""timm's ViTs (vafunc/models/timm_vit.py) beyond the registry batteries: any input size against timm
built with ``dynamic_img_size=True`` (DINOv2, stored for 518, at 224 and 224x336), and
``model.intermediates`` against timm's ``forward_intermediates(..., intermediates_only=True)``.

By default one model per layout difference (distillation token, registers, no class token with the
attention pool, CLIP's pre-norm, EVA-02's RoPE and ``fc_norm``), with two or three of their blocks
(every block runs the same code); every registered name, and the full depth at timm's default input
size, under ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch
from oracle import build_reference_fast, perturb

import vafunc

NAMES = [n for n in vafunc.list_models() if vafunc.get_entry(n).family.name == "timm_vit"]
#: one model per layout difference, in the default suite
DEFAULT = (
    "deit_base_distilled_patch16_224",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch16_siglip_224",
    "eva02_tiny_patch14_224",
)


def _params(names):
    return [pytest.param(n, id=n, marks=[] if n in DEFAULT else [pytest.mark.slow]) for n in names]


def _pair(name, seed=0, **config):
    torch.manual_seed(seed)
    model = vafunc.get_model(name, **config)
    ref = perturb(build_reference_fast(name, seed=seed, **config), seed=seed + 1).eval()
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    return model, ref, params, state


def _close(got, want, what, rel=1e-5):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(float(want.abs().max()), 1e-6)
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x {scale:.3g}"


# --------------------------------------------------------------------------- any input size


def test_dinov2_at_224_and_224x336_equals_timm_dynamic_img_size():
    """DINOv2's position embedding is stored for 518 (a 37x37 grid): at 224 (16x16) and 224x336
    (16x24) it is resampled as timm's resample_abs_pos_embed does (antialiased bicubic)."""
    model, ref, params, state = _pair("vit_small_patch14_dinov2", depth=2)
    assert ref.pos_embed.shape[1] == 1 + 37 * 37
    for h, w in ((224, 224), (224, 336)):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            want = ref(x)
            got, _ = model.apply(params, state, x)
        assert float((want - want.mean(0)).abs().max()) > 1e-3 * float(want.abs().max())  # depends on x
        _close(got, want, f"dinov2 at {h}x{w}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_default_and_another_size_equal_timm(name):
    """Every name at timm's default input size (no resampling) and at 224x336 (resampled position
    embedding; EVA-02's RoPE rescaled to its pre-training grid), full depth unless a giant."""
    big = vafunc.get_entry(name).params > 150_000_000
    model, ref, params, state = _pair(name, **({"depth": 4} if big else {}))
    p, s = model.config.patch_size, model.config.img_size
    for h, w in ((s, s), (224 // p * p, 336 // p * p)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            _close(model.apply(params, state, x)[0], ref(x), f"{name} at {h}x{w}")


# --------------------------------------------------------------------------- intermediates

CASES = [
    (None, {}),
    (2, {"norm": True}),
    ([0, -1], {"output_fmt": "NLC"}),
    ([-1, 0, 1, 1], {"return_prefix_tokens": True}),
    ([1], {"return_prefix_tokens": True, "norm": True, "output_fmt": "NLC"}),
]


@pytest.mark.parametrize("name", _params(NAMES))
def test_intermediates_equal_timm_forward_intermediates(name):
    model, ref, params, state = _pair(name, depth=3)
    p = model.config.patch_size
    x = torch.randn(2, 3, 2 * p, 3 * p)
    for indices, kw in CASES:
        with torch.no_grad():
            want = ref.forward_intermediates(x, indices, intermediates_only=True, **kw)
            got = model.intermediates(params, state, x, indices, **kw)
        assert len(got) == len(want), (indices, kw)
        for g, w in zip(got, want):
            if isinstance(w, tuple):  # (patch tokens, prefix tokens)
                assert isinstance(g, tuple) and len(g) == 2
                for a, b in zip(g, w):
                    _close(a, b, f"{name} {indices} {kw}")
            else:
                assert not isinstance(g, tuple), (indices, kw)
                _close(g, w, f"{name} {indices} {kw}")


def test_intermediates_stop_after_the_last_block_needed():
    """Blocks after the last requested one never run: NaN weights there leave the output as it was."""
    model, _, params, state = _pair("eva02_tiny_patch14_224", depth=4)
    x = torch.randn(2, 3, 28, 42)
    want = model.intermediates(params, state, x, [0, 1])
    poisoned = vafunc.tree_map(lambda t: t, params)  # new dicts, the same tensors
    poisoned["blocks"] = dict(params["blocks"])
    poisoned["blocks"]["2"] = vafunc.tree_map(lambda t: torch.full_like(t, float("nan")), params["blocks"]["2"])
    got = model.intermediates(poisoned, state, x, [0, 1])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.isnan(model.apply(poisoned, state, x)[0]).all()  # ...which the whole forward reads


def test_intermediates_refuse_bad_arguments():
    model = vafunc.get_model("deit_tiny_patch16_224")
    params, state = model.init(device="meta")
    x = torch.empty(1, 3, 32, 32, device="meta")
    with pytest.raises(ValueError, match="last-n count must be in 1..12"):
        model.intermediates(params, state, x, 13)
    with pytest.raises(ValueError, match="out of range for 12 blocks"):
        model.intermediates(params, state, x, [-13])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.intermediates(params, state, x, 1, output_fmt="NHWC")
    with pytest.raises(TypeError, match="indices must"):
        model.intermediates(params, state, x, "blocks.3")
    resnet = vafunc.get_model("resnet18")
    with pytest.raises(TypeError, match="intermediates"):
        resnet.intermediates(*resnet.init(device="meta"), x, 1)


# --------------------------------------------------------------------------- configuration errors


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="global_pool must be one of"):
        vafunc.get_model("deit_tiny_patch16_224", global_pool="max")
    with pytest.raises(ValueError, match="class_token must be True"):
        vafunc.get_model("deit_tiny_patch16_224", class_token=False)
    with pytest.raises(ValueError, match="num_classes must be a non-negative int"):
        vafunc.get_model("deit_tiny_patch16_224", num_classes=-1)
    with pytest.raises(ValueError, match="img_size .* divisible by patch_size"):
        vafunc.get_model("vit_small_patch14_dinov2", img_size=224 + 1)
    with pytest.raises(ValueError, match="needs heights and widths divisible by 14"):
        m = vafunc.get_model("eva02_tiny_patch14_224")
        m.apply(*m.init(device="meta"), torch.empty(1, 3, 28, 30, device="meta"))


def test_torchvision_vit_intermediates_are_its_encoder_blocks():
    """The same contract on torchvision's ViT layout: the outputs of ``encoder.layers.encoder_layer_{i}``
    (forward hooks on torchvision's module), ``encoder.ln`` applied with ``norm=True``, the class token
    split off, the patch tokens reshaped to the patch grid."""
    from oracle import module_outputs
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(image_size=64, patch_size=16, num_layers=3, num_heads=3, hidden_dim=192, mlp_dim=384)
    ref = perturb(VisionTransformer(**cfg), seed=1).eval()
    model = vafunc.get_model("vit_b_16", **cfg)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    blocks = module_outputs(ref, [f"encoder.layers.encoder_layer_{i}" for i in range(3)], x)
    for indices, kw in CASES:
        got = model.intermediates(params, state, x, indices, **kw)
        take = sorted({i % 3 for i in indices}) if isinstance(indices, list) else list(range(3))[-(indices or 3) :]
        assert len(got) == len(take)
        for g, i in zip(got, take):
            y = blocks[f"encoder.layers.encoder_layer_{i}"]
            with torch.no_grad():
                y = ref.encoder.ln(y) if kw.get("norm") else y
            patches = y[:, 1:] if kw.get("output_fmt") == "NLC" else y[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
            if kw.get("return_prefix_tokens"):
                _close(g[0], patches, f"vit {indices} {kw}")
                _close(g[1], y[:, :1], f"vit {indices} {kw} class token")
            else:
                _close(g, patches, f"vit {indices} {kw}")
