"""Swin v1 / v2 specifics the registry-driven harness does not cover (it runs its heavy batteries
on swin_t only): V2's cosine attention, continuous position bias and post-norm against
torchvision in eval, train and gradients; torchvision's padding and shifted-window masks at many
sizes (maps below one window, one-window axes, odd maps before patch merging), non-square
windows; the buffers bit for bit; keyed dropout; the two attention paths; bf16 compute; the
stochastic-depth schedule; init. Small networks (two stages of width 16 / 32), so this stays cheap.
"""

import pytest
import torch
import torchvision
from oracle import build_reference_meta, check_intermediate_shapes, module_outputs, perturb
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import swin_transformer as tvs
from torchvision.models.feature_extraction import create_feature_extractor

import vafunc
from vafunc.core.precision import Policy
from vafunc.models import swin

#: two stages, two blocks each (one plain, one shifted), non-square window 3 x 5
SMALL = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(3, 5), num_classes=7)


def tv_swin(version, **kw):
    """torchvision's ``SwinTransformer`` class from vafunc-style keywords."""
    extra = {"block": tvs.SwinTransformerBlockV2, "downsample_layer": tvs.PatchMergingV2} if version == 2 else {}
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    return tvs.SwinTransformer(patch_size=[4, 4], **kw, **extra)


def small_pair(version, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {**SMALL, **kw}
    ref = perturb(tv_swin(version, stochastic_depth_prob=0.0, **cfg), seed=seed + 3).eval()
    model = vafunc.get_model("swin_t" if version == 1 else "swin_v2_t", stochastic_depth_prob=0.0, **cfg)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    return model, ref, params, state


@pytest.fixture(scope="module", params=[1, 2], ids=["v1", "v2"])
def pair(request):
    return small_pair(request.param)


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))


#: (H, W) inputs: one window, padding, a shift on one axis only (3 x 11 tokens -> 3 x 15 padded:
#: one window high), odd maps before patch merging, a map smaller than the window, 1 x 1 tokens
SIZES = [(12, 20), (12, 44), (44, 12), (30, 61), (4, 4)]


def test_eval_equals_torchvision_at_any_size(pair):
    model, ref, params, state = pair
    assert model.min_size == 4
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            close(model.apply(params, state, x)[0], ref(x))


def test_empty_batch_gives_an_empty_result(pair):
    model, ref, params, state = pair
    for h, w in SIZES:
        for train in (False, True):
            y, _ = model.apply(params, state, torch.zeros(0, 3, h, w), train=train)
            assert y.shape == (0, 7), (h, w, train)


def test_train_and_gradients_equal_torchvision(pair):
    """Train mode (rates 0 on both sides) and the gradient of every parameter, V2's zeroed k
    bias (its gradient is 0) and cpb_mlp included."""
    model, ref, params, state = pair
    x = torch.randn(3, 3, 28, 44)
    ref.train()
    try:
        want = ref(x)
        want.square().sum().backward()
        grads = {k: p.grad for k, p in ref.named_parameters()}
    finally:
        ref.zero_grad(set_to_none=True)
        ref.eval()

    def loss(p):
        y, _ = model.apply(p, state, x, train=True)
        return y.square().sum(), y

    g, got = torch.func.grad(loss, has_aux=True)(params)
    close(got, want.detach())
    flat = vafunc.to_state_dict(g, {})
    assert list(flat) == list(grads)
    for k, v in flat.items():
        close(v, grads[k], tol=1e-4)


def test_features_are_the_module_outputs(pair):
    """Every stage, block and patch merging (channels-last [B, H, W, C]) and the final norm."""
    model, ref, params, state = pair
    names = model.feature_names
    assert names[:4] == ["features.0", "features.1.0", "features.1.1", "features.1"]
    assert names[-3:] == ["features.3.1", "features.3", "norm"]
    create_feature_extractor(ref, names)
    x = torch.randn(2, 3, 30, 61)
    want = module_outputs(ref, names, x)
    with torch.no_grad():
        got, _ = model.features(params, state, x, names)
    for n in names:
        close(got[n], want[n])
    assert got["features.1"].shape == (2, 7, 15, 16) and got["features.3"].shape == (2, 4, 8, 32)


#: (indices, keywords) of model.intermediates: all, the last n, negative and repeated indices, NLC
INTERMEDIATE_CASES = [
    (None, {}),
    (1, {"norm": True}),
    ([0, -1], {"norm": True}),
    ([-1, 0, 1, 1], {"return_prefix_tokens": True}),
    ([1], {"output_fmt": "NLC", "norm": True}),
    ([0], {"output_fmt": "NLC"}),
]


def timm_take(n, indices):
    """The features timm's ``forward_intermediates`` yields: its ``feature_take_indices``, each
    once, in stage order (its loop tests ``i in take_indices``)."""
    from timm.models._features import feature_take_indices

    return sorted(set(feature_take_indices(n, indices)[0]))


def test_intermediates_are_torchvisions_stage_outputs_in_nchw(pair):
    """Values: torchvision's stage outputs ``features.{2i+1}`` (its FX feature extractor), and its
    final ``norm`` on the last stage with ``norm=True``, permuted to NCHW (or flattened to NLC);
    which stages, by timm's index rule."""
    model, ref, params, state = pair
    x = torch.randn(2, 3, 30, 61)
    with torch.no_grad():
        tv = create_feature_extractor(ref, ["features.1", "features.3", "norm"])(x)
    for indices, kw in INTERMEDIATE_CASES:
        with torch.no_grad():
            got = model.intermediates(params, state, x, indices, **kw)
        take = timm_take(2, indices)
        assert len(got) == len(take), (indices, kw)
        for g, i in zip(got, take):
            want = tv["norm"] if kw.get("norm") and i == 1 else tv[f"features.{2 * i + 1}"]
            want = want.flatten(1, 2) if kw.get("output_fmt") == "NLC" else want.permute(0, 3, 1, 2)
            assert g.is_contiguous()
            close(g, want)


def test_intermediates_have_timms_shapes_and_stop_early():
    """timm's ``SwinTransformer`` of the same table (its own weights) gives the same number of
    maps in the same shapes for every index form; stages after the last requested one never run
    (NaN weights there change nothing)."""
    from timm.models.swin_transformer import SwinTransformer

    cfg = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=7)
    torch.manual_seed(0)
    ref = SwinTransformer(img_size=(56, 84), **cfg).eval()
    model = vafunc.get_model("swin_t", **{**cfg, "num_classes": 7})
    params, state = model.init(0)
    x = torch.randn(2, 3, 56, 84)
    check_intermediate_shapes(model, params, state, x, ref, INTERMEDIATE_CASES)
    poisoned = {**params, "features": dict(params["features"])}
    poisoned["features"]["3"] = vafunc.tree_map(lambda t: torch.full_like(t, float("nan")), params["features"]["3"])
    with torch.no_grad():
        first = model.intermediates(params, state, x, [0])[0]
        assert torch.equal(model.intermediates(poisoned, state, x, [0])[0], first)
        assert torch.isnan(model.intermediates(poisoned, state, x, [-1])[0]).all()
    with pytest.raises(ValueError, match="out of range for 2 blocks"):
        model.intermediates(params, state, x, [2])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.intermediates(params, state, x, 1, output_fmt="NHWC")


def test_fused_and_math_attention_agree(pair):
    model, _, params, state = pair
    x = torch.randn(2, 3, 28, 44)
    with torch.no_grad():
        close(model.apply(params, state, x, attention="math")[0], model.apply(params, state, x)[0])


def test_buffers_are_torchvisions_bit_for_bit():
    for window in ((7, 7), (8, 8), (3, 5)):
        v1 = tvs.ShiftedWindowAttention(16, list(window), [0, 0], 2)
        v2 = tvs.ShiftedWindowAttentionV2(16, list(window), [0, 0], 2)
        assert torch.equal(swin.relative_position_index(*window), v1.relative_position_index)
        assert torch.equal(swin.relative_position_index(*window), v2.relative_position_index)
        table = swin.relative_coords_table(*window)
        assert table.dtype == torch.float32 and torch.equal(table, v2.relative_coords_table)
    flat = vafunc.to_state_dict(*vafunc.get_model("swin_v2_t", **SMALL).init(0))
    ref = tv_swin(2, **SMALL).state_dict()
    for k in ("features.1.0.attn.relative_coords_table", "features.3.1.attn.relative_position_index"):
        assert flat[k].dtype == ref[k].dtype and torch.equal(flat[k], ref[k]), k


def test_shift_mask_is_torchvisions():
    """The mask torchvision builds in ``shifted_window_attention`` (transcribed as a test oracle),
    for shifts on both axes and on one."""
    for (hp, wp), window, shift in [((14, 21), (7, 7), (3, 3)), ((3, 15), (3, 5), (0, 2)), ((16, 8), (8, 8), (4, 0))]:
        want = torch.zeros(hp, wp)
        count = 0
        for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
            for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
                want[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        want = want.view(hp // window[0], window[0], wp // window[1], window[1]).permute(0, 2, 1, 3)
        want = want.reshape(-1, window[0] * window[1])
        want = want.unsqueeze(1) - want.unsqueeze(2)
        want = want.masked_fill(want != 0, -100.0).masked_fill(want == 0, 0.0)
        got = swin.shift_mask(hp, wp, window, shift, dtype=torch.float32, device="cpu")
        assert torch.equal(got + 0.0, want), (hp, wp, window, shift)  # + 0.0: -0.0 -> 0.0


def test_dropouts_are_keyed():
    """Attention dropout, projection / MLP dropout and stochastic depth draw from the key: the
    same key gives the same output, another key another; no key is an error."""
    x = torch.randn(2, 3, 28, 44)
    for rates in ({"attention_dropout": 0.3}, {"dropout": 0.3, "stochastic_depth_prob": 0.5}):
        model = vafunc.get_model("swin_t", **{**SMALL, **rates})
        params, state = model.init(0)
        k1, k2 = vafunc.random.key(1), vafunc.random.key(2)
        with torch.no_grad():
            a, _ = model.apply(params, state, x, train=True, rng=k1)
            b, _ = model.apply(params, state, x, train=True, rng=k1)
            c, _ = model.apply(params, state, x, train=True, rng=k2)
            e, _ = model.apply(params, state, x)
            with pytest.raises(ValueError, match="needs randomness"):
                model.apply(params, state, x, train=True)
        assert torch.equal(a, b), rates
        assert not torch.allclose(a, c) and not torch.allclose(a, e), rates


def test_bf16_policy_computes_in_bf16(pair):
    """Every matmul / attention of the forward runs in bfloat16 under Policy.bf16(), and the
    logits stay near the float32 ones."""
    model, _, params, state = pair
    x = torch.randn(2, 3, 28, 44)
    seen = set()

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__
            if any(s in name for s in ("mm", "addmm", "bmm", "attention", "linear", "conv", "gelu")):
                seen.add((name, out[0].dtype if isinstance(out, tuple) else out.dtype))
            return out

    with torch.no_grad():
        want, _ = model.apply(params, state, x)
        with Dtypes():
            got, _ = model.apply(params, state, x, policy=Policy.bf16())
    assert seen and all(d == torch.bfloat16 for _, d in seen), seen
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


@pytest.mark.parametrize("name", ["swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"])
def test_stochastic_depth_schedule_and_rates_are_torchvisions(name):
    ref = build_reference_meta(name)
    want = [m.p for m in ref.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    cfg = vafunc.get_model(name).config
    assert [b.drop_path for s in swin.plan(cfg) for b in s] == pytest.approx(want, rel=1e-12)
    assert cfg.stochastic_depth_prob == want[-1]


def test_init_matches_torchvision_scheme():
    """trunc_normal(0.02) linear weights (cpb_mlp and MLPs too) and bias tables, zero biases,
    LayerNorm 1/0, logit_scale log(10), the patch conv torch's default; in state_dict order."""
    for version in (1, 2):
        model = vafunc.get_model("swin_t" if version == 1 else "swin_v2_t", **{**SMALL, "num_heads": (4, 8)})
        flat = vafunc.to_state_dict(*model.init(1))
        assert list(flat) == list(tv_swin(version, **{**SMALL, "num_heads": (4, 8)}).state_dict())
        for k in ("features.1.0.attn.qkv.weight", "features.3.1.mlp.3.weight", "head.weight"):
            assert abs(float(flat[k].std()) - 0.02) < 0.003, k
        assert torch.equal(flat["features.1.0.attn.qkv.bias"], torch.zeros(48))
        assert torch.equal(flat["features.0.2.weight"], torch.ones(16))
        bound = (3 * 4 * 4) ** -0.5
        w = flat["features.0.0.weight"]
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.8 * bound
        if version == 1:
            assert abs(float(flat["features.1.0.attn.relative_position_bias_table"].std()) - 0.02) < 0.004
        else:
            assert torch.allclose(flat["features.1.0.attn.logit_scale"], torch.full((4, 1, 1), 10.0).log())
            assert abs(float(flat["features.1.0.attn.cpb_mlp.0.weight"].std()) - 0.02) < 0.003


def test_config_checks():
    with pytest.raises(ValueError, match="same length"):
        vafunc.get_model("swin_t", depths=(2, 2), num_heads=(3,))
    with pytest.raises(ValueError, match="not divisible"):
        vafunc.get_model("swin_t", num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="version"):
        vafunc.get_model("swin_t", version=3)
    with pytest.raises(ValueError, match="window_size"):
        vafunc.get_model("swin_t", window_size=(7, 0))
    with pytest.raises(ValueError, match="2x2"):
        vafunc.get_model("swin_v2_t", window_size=1)
    assert vafunc.get_model("swin_t", window_size=5, patch_size=[2, 2]).config.window_size == (5, 5)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_compile_fullgraph_equals_eager(version):
    """Eval (inductor), and train with every dropout and stochastic depth on (dynamo fullgraph +
    AOT autograd: inductor's code generation for the keyed masks takes over ten minutes on two
    cores), at a padded, shifted size."""
    torch._dynamo.reset()
    model = vafunc.get_model(
        "swin_t" if version == 1 else "swin_v2_t",
        **{**SMALL, "dropout": 0.1, "attention_dropout": 0.1, "stochastic_depth_prob": 0.3},
    )
    params, state = model.init(0, dtype=torch.float64)
    x = torch.randn(2, 3, 28, 44, dtype=torch.float64)
    key = vafunc.random.key(4)
    train = torch.compile(
        lambda p, s, x, k: model.apply(p, s, x, train=True, rng=k)[0], fullgraph=True, backend="aot_eager"
    )
    ev = torch.compile(lambda p, s, x: model.apply(p, s, x)[0], fullgraph=True)
    with torch.no_grad():
        close(train(params, state, x, key), model.apply(params, state, x, train=True, rng=key)[0], 1e-6)
        close(ev(params, state, x), model.apply(params, state, x)[0], 1e-6)
