"""Per-sample gradients and their norms from one taped backward (vafunc.research.persample), against the
loop of one-sample gradients (torch.func.grad per sample), in float64."""

import pytest
import torch
from oracle import check_tape_against_loop
from torch.nn.functional import cross_entropy

import vafunc
from vafunc.research import persample

TINY_VIT = dict(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)

# (name, config, input size): every kind of taped layer: convs (plain, grouped, depthwise, 1x1
# strided), linears on tokens, BatchNorm in eval, LayerNorm, LayerNorm2d, layer scale, class
# token and position embedding, auxiliary heads that eval mode does not reach.
CASES = [
    ("resnet18", {}, 32),
    ("mobilenet_v3_small", {}, 32),
    ("shufflenet_v2_x0_5", {}, 32),
    pytest.param("convnext_tiny", {}, 32, marks=pytest.mark.slow, id="convnext_tiny"),  # default suite time
    ("vit_b_16", TINY_VIT, 32),
    ("googlenet", {}, 32),
    ("tf_efficientnet_lite0", {}, 33),
]


def _problem(name, cfg, size, batch=3):
    model = vafunc.get_model(name, num_classes=7, **cfg)
    params, state = model.init(0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    params = vafunc.tree_map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype), params)
    state = vafunc.tree_map(lambda t: t.abs() + 0.5 if t.is_floating_point() else t, state)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (batch,), generator=g)
    return model, params, state, x, y


@pytest.mark.parametrize("name,cfg,size", CASES)
def test_taped_grads_and_norms_equal_the_loop(name, cfg, size):
    model, params, state, x, y = _problem(name, cfg, size)
    check_tape_against_loop(model, params, state, x, y, norms_rtol=1e-10)


def test_chunks_and_out_reuse():
    model, params, state, x, y = _problem("resnet18", {}, 32, batch=5)
    whole = vafunc.per_sample_grads(model, params, state, x, y, cross_entropy)
    chunked = vafunc.per_sample_grads(model, params, state, x, y, cross_entropy, chunk_size=2)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    again = vafunc.per_sample_grads(model, params, state, x.flip(0), y.flip(0), cross_entropy, out=chunked)
    assert again is chunked  # written in place
    torch.testing.assert_close(vafunc.tree_map(lambda t: t.flip(0), again), whole, rtol=1e-12, atol=0)
    n = vafunc.per_sample_grad_norms(model, params, state, x, y, cross_entropy, chunk_size=2)
    torch.testing.assert_close(n, vafunc.per_sample_grad_norms(model, params, state, x, y, cross_entropy))
    with pytest.raises(ValueError, match="out"):
        vafunc.per_sample_grads(model, params, state, x[:2], y[:2], cross_entropy, out=whole)
    with pytest.raises(ValueError, match="chunk_size"):
        vafunc.per_sample_grads(model, params, state, x, y, cross_entropy, chunk_size=0)
    with pytest.raises(ValueError, match=r"y \[B"):
        vafunc.per_sample_grad_norms(model, params, state, x, y[:2], cross_entropy)


@pytest.mark.parametrize("t", [1, 4, 64])
@pytest.mark.parametrize("groups", [1, 4])
def test_ghost_and_explicit_norms_agree(t, groups):
    """Both sides of the mixed rule: the Gram-matrix (ghost) norm and the explicit per-sample
    product give the same squared norm, whichever the cost rule picks."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, groups, 36, t, generator=g, dtype=torch.float64)
    go = torch.randn(3, groups, 8, t, generator=g, dtype=torch.float64)
    explicit = torch.einsum("bgot,bgdt->bgod", go, a).reshape(3, -1).square().sum(1)
    ghost = (torch.einsum("bgdt,bgds->bgts", a, a) * torch.einsum("bgot,bgos->bgts", go, go)).reshape(3, -1).sum(1)
    torch.testing.assert_close(persample._sq_norm(a, go), explicit)
    torch.testing.assert_close(ghost, explicit)


def test_uncovered_models_fall_back_to_vmap():
    """Swin's relative position tables and its fused qkv are used by the family directly: the
    tape does not cover it, and per_sample_grads takes torch.vmap(grad) (still the loop's values)."""
    model = vafunc.get_model("swin_t")
    assert not persample.tape_covers(model)
    with pytest.raises(ValueError, match="method='vmap'"):
        p, s = model.init(0, device="meta")
        vafunc.per_sample_grads(
            model, p, s, torch.zeros(2, 3, 32, 32, device="meta"), torch.zeros(2), cross_entropy, method="tape"
        )


def test_without_a_tape_the_kit_emits_plain_ops():
    """The tape is per call: apply without one runs the plain aten convolution (what inductor and
    vafunc.compile's folding see)."""
    model = vafunc.get_model("resnet18", num_classes=3)
    params, state = model.init(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.profiler.profile() as prof:
        model.apply(params, state, x)
    names = {e.name for e in prof.events()}
    assert "aten::convolution" in names and not any("_Conv" in n for n in names)


def test_fresh_results_reuse_dropped_memory_only(monkeypatch):
    """Without ``out=`` the taped path writes into memory kept from the previous call once that
    result was dropped (no page faults); a result still held is never overwritten."""
    from vafunc.serving import memory

    monkeypatch.setattr(memory, "_KEEP_MIN_BYTES", 0)  # the tiny model's buffer counts as large
    memory.release_buffers()
    model, params, state, x, y = _problem("resnet18", {}, 32, batch=2)

    def ptr(tree):
        return next(iter(vafunc.flatten(tree).values())).untyped_storage().data_ptr()

    first = vafunc.per_sample_grads(model, params, state, x, y, cross_entropy)
    kept = vafunc.tree_map(torch.clone, first)
    second = vafunc.per_sample_grads(model, params, state, x.flip(0), y.flip(0), cross_entropy)
    assert ptr(second) != ptr(first)  # `first` is alive: new memory
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # and untouched
    torch.testing.assert_close(vafunc.tree_map(lambda t: t.flip(0), second), kept, rtol=1e-12, atol=0)
    where = ptr(second)
    del first, second
    third = vafunc.per_sample_grads(model, params, state, x, y, cross_entropy)
    assert ptr(third) == where  # the last result was dropped: its memory comes back
    torch.testing.assert_close(third, kept, rtol=0, atol=0)
    assert memory.release_buffers() > 0 and memory.release_buffers() == 0
    with torch.inference_mode():  # inference tensors are never kept (they could not be written later)
        memory.reusable_empty(10, torch.float32)
    assert memory.release_buffers() == 0
    with pytest.raises(ValueError, match="numel must be a non-negative int"):
        memory.reusable_empty(-1, torch.float32)
