"""ViT beyond the registry-driven batteries: any input size (position embeddings resampled as
torchvision's ``interpolate_embeddings``), the attention rule (fused SDPA vs the math path) and
keyed attention dropout, per-sample gradients. Small configurations of the family (the
registered ones are checked by test_oracle / test_properties / test_features)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings  # noqa: E402

import vafunc
from vafunc.core import layers as L
from vafunc.training.train import cross_entropy

SMALL = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


def _ref(image_size=32, sd=None):
    torch.manual_seed(0)
    kw = {k: v for k, v in SMALL.items() if k != "image_size"}
    ref = VisionTransformer(image_size=image_size, **kw).eval()
    if sd is not None:
        ref.load_state_dict(sd)
    return ref


def _perturbed_pair():
    """A small torchvision ViT with every tensor non-trivial (its head starts at zero) and the
    same weights in vafunc."""
    ref = _ref()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in ref.state_dict(keep_vars=True).values():
            t.data.add_(torch.randn(t.shape, generator=g) * 0.05)
    model = vafunc.get_model("vit_b_16", **SMALL)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    return model, params, state, ref


@pytest.mark.parametrize("size", [16, 48, 64])
def test_any_square_size_equals_torchvision_with_interpolated_embeddings(size):
    model, params, state, ref = _perturbed_pair()
    want_ref = _ref(size, interpolate_embeddings(size, 8, ref.state_dict()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = want_ref(x)
        got, _ = model.apply(params, state, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_square_grid_interpolates_each_axis():
    """32x48 input, stored 4x4 grid -> 4x6: the explicit computation with torchvision's modules."""
    model, params, state, ref = _perturbed_pair()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        got, _ = model.apply(params, state, x)
        pos = ref.encoder.pos_embedding
        grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=True)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        t = ref.conv_proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([ref.class_token.expand(2, -1, -1), t], 1) + pos
        t = ref.encoder.ln(ref.encoder.layers(t))
        want = ref.heads(t[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_stored_embedding_at_another_size():
    model, params, state, _ = _perturbed_pair()
    x = torch.randn(2, 3, 40, 24)
    g = torch.func.grad(lambda p: model.apply(p, state, x)[0].square().sum())(params)
    pe = g["encoder"]["pos_embedding"]
    assert pe.shape == params["encoder"]["pos_embedding"].shape
    assert float(pe[:, 1:].abs().sum()) > 0 and float(pe[:, :1].abs().sum()) > 0


def test_sizes_not_divisible_by_the_patch_are_refused():
    model = vafunc.get_model("vit_b_16", **SMALL)
    p, s = model.init(device="meta")
    assert model.size_multiple == 8 and model.min_size == 8
    with pytest.raises(ValueError, match="divisible by 8"):
        model.apply(p, s, torch.empty(1, 3, 32, 36, device="meta"))


# --------------------------------------------------------------------------- the attention rule


def test_attention_rule():
    assert L.attention_path("auto", train=False, rate=0.0) == "fused"
    assert L.attention_path("auto", train=True, rate=0.0) == "fused"
    assert L.attention_path("auto", train=True, rate=0.1) == "math"  # keyed dropout
    assert L.attention_path("auto", train=False, rate=0.1) == "fused"  # dropout is off in eval
    assert L.attention_path("math", train=False, rate=0.0) == "math"
    with pytest.raises(ValueError, match="keyed"):
        L.attention_path("fused", train=True, rate=0.1)
    with pytest.raises(ValueError, match="impl"):
        L.attention_path("flash", train=False, rate=0.0)
    seen = []
    q = torch.randn(2, 3, 4)
    torch.func.grad(lambda t: (seen.append(L.attention_path("auto", train=False, rate=0.0)), t.sum())[1])(q)
    torch.vmap(lambda t: (seen.append(L.attention_path("auto", train=False, rate=0.0)), t)[1])(q)
    with torch.autograd.forward_ad.dual_level():
        seen.append(L.attention_path("auto", train=False, rate=0.0))
    assert seen == ["math", "math", "math"]


def test_attention_rule_under_torch_compile():
    """The rule is applied when dynamo traces: fused in a plain compiled graph, math in a compiled vmap
    or grad (dynamo once read a transform into every compiled graph)."""
    fused = lambda t: t + (L.attention_path("auto", train=False, rate=0.0) == "fused")  # noqa: E731
    q = torch.zeros(2)
    torch._dynamo.reset()
    assert torch.compile(fused, fullgraph=True, backend="eager")(q).tolist() == [1.0, 1.0]
    assert torch.compile(torch.vmap(fused), fullgraph=True, backend="eager")(q).tolist() == [0.0, 0.0]
    grad = torch.func.grad(lambda t: (fused(t).detach() * t).sum())  # the gradient is the flag
    assert torch.compile(grad, fullgraph=True, backend="eager")(q).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_and_math_paths_agree(bias):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    b = torch.randn(3, 7, 7, generator=g, dtype=torch.float64) if bias else None
    fused = L.attention(q, k, v, bias=b, impl="fused")
    math = L.attention(q, k, v, bias=b, impl="math")
    want = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + (0 if b is None else b), -1) @ v
    torch.testing.assert_close(fused, want)
    torch.testing.assert_close(math, want)


def test_math_path_forced_through_apply_equals_the_default():
    model, params, state, _ = _perturbed_pair()
    x = torch.randn(2, 3, 32, 32)
    a, _ = model.apply(params, state, x)
    b, _ = model.apply(params, state, x, attention="math")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        model.apply(params, state, x, attention="flash")


def test_attention_dropout_is_keyed():
    _, params, state, _ = _perturbed_pair()
    model = vafunc.get_model("vit_b_16", **{**SMALL, "attention_dropout": 0.3})
    x = torch.randn(2, 3, 32, 32)
    k1, k2 = vafunc.random.key(1), vafunc.random.key(2)
    a, _ = model.apply(params, state, x, train=True, rng=k1)
    b, _ = model.apply(params, state, x, train=True, rng=k1)
    c, _ = model.apply(params, state, x, train=True, rng=k2)
    e, _ = model.apply(params, state, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, e)
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, state, x, train=True)


def test_per_sample_gradients_equal_a_loop():
    """LayerNorm has no batch coupling: the per-sample gradients of a ViT are those of one-sample
    batches (what differential-privacy training needs)."""
    model, params, state, _ = _perturbed_pair()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    got = vafunc.per_sample_grads(model, params, state, x, y, cross_entropy)
    for i in range(3):
        want = torch.func.grad(lambda p: cross_entropy(model.apply(p, state, x[i : i + 1])[0], y[i : i + 1]))(params)
        for name, t in vafunc.flatten(want).items():
            torch.testing.assert_close(vafunc.flatten(got)[name][i], t, rtol=1e-4, atol=1e-6, msg=name)
