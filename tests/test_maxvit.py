"""MaxViT and CoAtNet specifics the registry-driven harness does not cover. MaxViT on a small configuration
(stem 16, widths (16, 32), blocks (2, 1), head dim 8, 7x7 partitions: inputs are multiples of
56) that torchvision's ``MaxVit`` class builds too, so the oracle checks run in float64 at 56x56
in a fraction of a second: eval, train (BatchNorm statistics), gradients; non-square inputs
(which torchvision's grid partition cannot take); the relative position tables; the
stochastic-depth schedule and keyed randomness; input size errors; vmap, jvp and compile. CoAtNet
against timm built for 64x64 inputs (``img_size=64``), float64. The heavier checks (25M-parameter
float64 gradients, vmap + Hessian-vector products, compile) are marked slow."""

import numpy as np
import pytest
import torch
from oracle import build_reference_meta, check_intermediate_shapes, perturb
from torch.func import grad, jvp
from torchvision.models import maxvit as tvm

import vafunc
from vafunc.models import maxvit

SMALL = dict(stem_channels=16, block_channels=(16, 32), block_layers=(2, 1), head_dim=8, partition_size=7)
F64 = torch.float64


def tv_small(**kw):
    """torchvision's MaxVit class with SMALL's table, built for 56x56, stochastic depth off."""
    cfg = {**SMALL, "block_channels": list(SMALL["block_channels"]), "block_layers": list(SMALL["block_layers"])}
    return tvm.MaxVit(input_size=(56, 56), stochastic_depth_prob=0.0, **{**cfg, **kw}).eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = perturb(tv_small(), seed=3, size=(4, 56, 56)).double()
    model = vafunc.get_model("maxvit_t", **SMALL, stochastic_depth_prob=0.0)
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    return model, ref, params, state


def close(got, want, rel=1e-9, floor=1e-12):
    scale = max(float(want.abs().max()), floor)
    assert float((got - want).abs().max()) <= rel * scale


def check_float64(model, ref, params, state, x):
    """Float64 eval logits, then train-mode logits, new BatchNorm statistics and the gradient of
    every parameter, against the reference module (left in eval mode)."""
    with torch.no_grad():
        close(model.apply(params, state, x)[0], ref(x))
    ref.train()
    try:
        out = ref(x)
        w = torch.randn(out.shape, dtype=F64)
        ref.zero_grad()
        (out * w).sum().backward()
        got, new_state = model.apply(params, state, x, train=True)
        close(got.detach(), out.detach())
        buffers = dict(ref.named_buffers())
        for k, v in vafunc.flatten(new_state).items():
            if v.is_floating_point():
                close(v, buffers[k])
            else:
                assert torch.equal(v, buffers[k]), k
        g = vafunc.flatten(grad(lambda p: (model.apply(p, state, x, train=True)[0] * w).sum())(params))
        floor = 1e-6 * max(float(p.grad.abs().max()) for p in ref.parameters())  # exact zeros: noise
        for k, p in ref.named_parameters():
            close(g[k], p.grad, 1e-8, floor)
    finally:
        ref.eval()


def test_small_config_eval_train_and_gradients_equal_torchvision_in_float64(pair):
    model, ref, params, state = pair
    assert model.size_multiple == 56 and model.min_size == 56
    assert list(vafunc.to_state_dict(params, state)) == list(ref.state_dict())
    x = torch.randn(3, 3, 56, 56, dtype=F64)
    check_float64(model, ref, params, state, x)


@pytest.mark.slow
def test_float32_gradients_are_as_close_to_float64_as_torchvisions():
    """maxvit_t at 224 in float32: the harness's 1e-4 gradient tolerance is below the rounding
    of either implementation for the biases in front of a train-mode BatchNorm (their exact
    gradient through the normalisation cancels); against the float64 truth vafunc's float32
    gradients are as good as torchvision's (here on the small table, same structure)."""
    torch.manual_seed(1)
    ref = perturb(tv_small(), seed=5, size=(4, 56, 56)).train()
    model = vafunc.get_model("maxvit_t", **SMALL, stochastic_depth_prob=0.0)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    params, state = vafunc.from_state_dict(model, sd)
    x = torch.randn(3, 3, 56, 56)
    out = ref(x)
    w = torch.randn(out.shape)
    ref.zero_grad()
    (out * w).sum().backward()
    want = {k: p.grad.clone() for k, p in ref.named_parameters()}
    got = vafunc.flatten(grad(lambda p: (model.apply(p, state, x, train=True)[0] * w).sum())(params))
    ref = ref.double()
    ref.zero_grad()
    (ref(x.double()) * w.double()).sum().backward()
    floor = 1e-3 * max(float(v.abs().max()) for v in want.values())
    for k, p in ref.named_parameters():
        s = max(float(p.grad.abs().max()), floor)
        ours, theirs = float((got[k] - p.grad).abs().max()) / s, float((want[k] - p.grad).abs().max()) / s
        assert ours <= max(3 * theirs, 1e-4), (k, ours, theirs)


def test_non_square_block_attention_equals_torchvision_and_grid_is_a_strided_window(pair):
    """torchvision's window partition takes non-square maps (its grid partition does not): the
    block attention layer equals it at 14x28; grid attention on x equals block attention on the
    map whose P x P grid cells were gathered into windows, put back."""
    model, ref, params, state = pair
    layer = ref.blocks[0].layers[0].layers.window_attention
    tv = (
        tvm.PartitionAttentionLayer(16, 8, 7, "window", (14, 28), 4, torch.nn.GELU, torch.nn.LayerNorm, 0.0, 0.0, 0.0)
        .double()
        .eval()
    )
    tv.load_state_dict(layer.state_dict())
    sub = params["blocks"]["0"]["layers"]["0"]["layers"]
    cfg = model.config
    from vafunc.core.kit import Scope

    def run(kind, x, name):
        p, s = sub[name], state["blocks"]["0"]["layers"]["0"]["layers"][name]
        return maxvit.partition_attention(Scope(p, s), x, cfg, kind, 0.0)

    x = torch.randn(2, 16, 14, 28, dtype=F64)
    with torch.no_grad():
        close(run("window", x, "window_attention"), tv(x))
        from einops import rearrange

        gathered = rearrange(x, "b c (ph nh) (pw nw) -> b c (nh ph) (nw pw)", ph=7, pw=7)
        back = rearrange(
            run("window", gathered, "grid_attention"), "b c (nh ph) (nw pw) -> b c (ph nh) (pw nw)", ph=7, pw=7
        )
        close(run("grid", x, "grid_attention"), back)
        y, _ = model.apply(params, state, torch.randn(2, 3, 56, 112, dtype=F64))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


#: (indices, keywords) of model.intermediates: all, the last n, negative and repeated indices, NLC
INTERMEDIATE_CASES = [
    (None, {}),
    (2, {"norm": True}),
    ([0, -1], {}),
    ([-1, 0, 1, 1], {"return_prefix_tokens": True}),
    ([1], {"output_fmt": "NLC"}),
]


def test_intermediates_are_torchvisions_stem_and_stage_outputs(pair):
    """Values: the outputs of torchvision's ``stem`` and ``blocks.{i}`` modules (what its feature
    extractor returns for those names), in float64, as NCHW maps and as NLC tokens; which ones,
    by timm's index rule (feature 0 the stem, each once, in order; all index forms are checked
    against timm below)."""
    from oracle import module_outputs
    from timm.models._features import feature_take_indices

    model, _, params, state = pair
    ref = tv_small().double()  # the pair's module: other tests run it in train mode (its statistics move)
    ref.load_state_dict(vafunc.to_state_dict(params, state))
    names = ["stem", "blocks.0", "blocks.1"]
    x = torch.randn(2, 3, 56, 56, dtype=F64)
    tv = module_outputs(ref, names, x)
    for indices, kw in [(None, {}), ([-1, 0, 1, 1], {"norm": True}), ([1], {"output_fmt": "NLC"})]:
        with torch.no_grad():
            got = model.intermediates(params, state, x, indices, **kw)
        take = sorted(set(feature_take_indices(3, indices)[0]))
        assert len(got) == len(take), (indices, kw)
        for g, i in zip(got, take):
            want = tv[names[i]]
            close(g, want.flatten(2).transpose(1, 2) if kw.get("output_fmt") == "NLC" else want)


def test_intermediates_have_timms_shapes_and_stop_early(pair):
    """timm's ``MaxxVit`` with MaxViT-T's recipe cut to the small table (its own weights) gives the
    same number of maps in the same shapes for every index form; stages after the last requested
    one never run (NaN weights there change nothing)."""
    from dataclasses import replace

    from timm.models.maxxvit import MaxxVit, model_cfgs

    tf = model_cfgs["maxvit_tiny_tf"]
    cfg = replace(
        tf,
        embed_dim=SMALL["block_channels"],
        depths=SMALL["block_layers"],
        stem_width=SMALL["stem_channels"],
        head_hidden_size=32,
        transformer_cfg=replace(tf.transformer_cfg, dim_head=SMALL["head_dim"]),
    )
    torch.manual_seed(0)
    ref = MaxxVit(cfg, img_size=56).eval()
    model, _, params, state = pair
    x = torch.randn(2, 3, 56, 56, dtype=F64)
    check_intermediate_shapes(model, params, state, x, ref, INTERMEDIATE_CASES)
    poisoned = {**params, "blocks": dict(params["blocks"])}
    poisoned["blocks"]["1"] = vafunc.tree_map(lambda t: torch.full_like(t, float("nan")), params["blocks"]["1"])
    with torch.no_grad():
        got = model.intermediates(poisoned, state, x, [0, 1])
        want = model.intermediates(params, state, x, [0, 1])
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert torch.isnan(model.intermediates(poisoned, state, x, [-1])[0]).all()
    with pytest.raises(ValueError, match="last-n count must be in 1..3"):
        model.intermediates(params, state, x, 4)


def test_relative_position_index_is_torchvisions_and_timms():
    from timm.layers.pos_embed_rel import gen_relative_position_index

    for h, w in ((7, 7), (3, 5), (14, 14)):
        idx = maxvit.relative_position_index(h, w)
        assert idx.dtype == torch.int64
        assert torch.equal(idx, gen_relative_position_index((h, w)))
        if h == w:
            assert torch.equal(idx, tvm._get_relative_position_index(h, w))


def test_stochastic_depth_schedule_is_torchvisions():
    ref = build_reference_meta("maxvit_t")
    layers = [m for m in ref.modules() if isinstance(m, tvm.MaxVitLayer)]
    ps = [m.layers.window_attention.stochastic_dropout.p for m in layers]
    assert ps == [m.layers.grid_attention.stochastic_dropout.p for m in layers]
    want = [float(v) for v in np.linspace(0, 0.2, 11)]
    assert maxvit.linear_schedule(0.2, 11) == want == ps
    assert maxvit.linear_schedule(0.3, 1) == [0.0]


def test_keyed_randomness():
    model = vafunc.get_model("maxvit_t", **SMALL, stochastic_depth_prob=0.5, attention_dropout=0.2, mlp_dropout=0.1)
    params, state = model.init(0)
    x = torch.randn(2, 3, 56, 56)
    k1, k2 = vafunc.random.key(1), vafunc.random.key(2)
    with torch.no_grad():
        a, _ = model.apply(params, state, x, train=True, rng=k1)
        b, _ = model.apply(params, state, x, train=True, rng=k1)
        c, _ = model.apply(params, state, x, train=True, rng=k2)
        assert torch.equal(a, b) and not torch.allclose(a, c)
        with pytest.raises(ValueError):
            model.apply(params, state, x, train=True)
        e1, _ = model.apply(params, state, x)
        e2, _ = vafunc.get_model("maxvit_t", **SMALL).apply(params, state, x)
        assert torch.equal(e1, e2)  # eval ignores the rates


def test_input_size_errors_and_config_checks():
    model = vafunc.get_model("maxvit_t")
    assert model.min_size == 224 and model.size_multiple == 224
    p, s = model.init(device="meta")
    for h, w in ((225, 224), (224, 336), (112, 112)):
        with pytest.raises(ValueError, match="224"):
            model.apply(p, s, torch.randn(1, 3, h, w, device="meta"))
    with pytest.raises(ValueError, match="head_dim"):
        vafunc.get_model("maxvit_t", block_channels=(64, 100, 256, 512))
    with pytest.raises(ValueError, match="block_layers"):
        vafunc.get_model("maxvit_t", block_layers=(2, 2, 5))
    with pytest.raises(ValueError, match="stochastic_depth_prob"):
        vafunc.get_model("maxvit_t", stochastic_depth_prob=1.5)


def test_init_follows_torchvision():
    model = vafunc.get_model("maxvit_t")
    flat = vafunc.to_state_dict(*model.init(0))
    w = flat["blocks.3.layers.0.layers.MBconv.layers.conv_a.0.weight"]
    assert abs(float(w.std()) - 0.02) < 5e-4 and abs(float(w.mean())) < 5e-4
    t = flat["blocks.2.layers.0.layers.grid_attention.attn_layer.1.relative_position_bias_table"]
    assert t.shape == (169, 8) and abs(float(t.std()) - 0.02) < 3e-3
    assert float(flat["classifier.3.bias"].abs().max()) == 0.0
    assert torch.equal(
        flat["blocks.0.layers.0.layers.window_attention.attn_layer.1.relative_position_index"],
        tvm._get_relative_position_index(7, 7),
    )
    assert torch.equal(vafunc.to_state_dict(*model.init(0))["stem.0.0.weight"], flat["stem.0.0.weight"])


@pytest.mark.slow
def test_vmap_ensemble_train_and_hvp_on_the_small_table():
    model = vafunc.get_model("maxvit_t", **SMALL, stochastic_depth_prob=0.3, attention_dropout=0.1, num_classes=5)
    params, state = vafunc.ensemble_init(model, 2, key=0, dtype=F64)
    x = torch.randn(2, 3, 56, 112, dtype=F64)
    rng = vafunc.random.key(4)
    with torch.no_grad():
        got, gs = vafunc.ensemble_apply(model, params, state, x, train=True, rng=rng, method="vmap")
        want, ws = vafunc.ensemble_apply(model, params, state, x, train=True, rng=rng, method="loop")
    close(got, want, 1e-10)
    for k, v in vafunc.flatten(ws).items():
        assert torch.allclose(vafunc.flatten(gs)[k].to(v.dtype), v, rtol=1e-10, atol=1e-12), k
    p, s = vafunc.unstack(params)[0], vafunc.unstack(state)[0]

    def loss(q):
        return model.apply(q, s, x)[0].square().mean()

    u = vafunc.tree_map(torch.randn_like, p)
    v = vafunc.tree_map(torch.randn_like, p)
    g = grad(loss)(p)
    _, d = jvp(loss, (p,), (u,))
    dot = lambda a, b: sum((a[k] * b[k]).sum() for k in vafunc.flatten(a))  # noqa: E731
    fa, fb = vafunc.flatten(g), vafunc.flatten(u)
    assert torch.allclose(d, sum((fa[k] * fb[k]).sum() for k in fa), rtol=1e-8)
    hv = vafunc.flatten(jvp(grad(loss), (p,), (v,))[1])
    hu = vafunc.flatten(jvp(grad(loss), (p,), (u,))[1])
    a, b = dot(fb, hv), dot(vafunc.flatten(v), hu)
    assert torch.allclose(a, b, rtol=1e-6)


def test_bf16_policy_stays_close_to_float32():
    from vafunc.core.precision import Policy

    model = vafunc.get_model("maxvit_t", **SMALL)
    params, state = model.init(0)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want, _ = model.apply(params, state, x)
        got, _ = model.apply(params, state, x, policy=Policy.bf16())
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


@pytest.mark.slow
def test_compile_fullgraph_equals_eager_small_table():
    torch._dynamo.reset()
    model = vafunc.get_model("maxvit_t", **SMALL, stochastic_depth_prob=0.3, attention_dropout=0.1, num_classes=5)
    params, state = model.init(0, dtype=F64)
    x = torch.randn(2, 3, 56, 112, dtype=F64)
    key = vafunc.random.key(5)
    train = torch.compile(lambda p, s, x, k: model.apply(p, s, x, train=True, rng=k), fullgraph=True)
    ev = torch.compile(lambda p, s, x: model.apply(p, s, x)[0], fullgraph=True)
    with torch.no_grad():
        got, gs = train(params, state, x, key)
        want, ws = model.apply(params, state, x, train=True, rng=key)
        close(got, want, 1e-9)
        for k, v in vafunc.flatten(ws).items():
            assert torch.allclose(vafunc.flatten(gs)[k].to(v.dtype), v, rtol=1e-9, atol=1e-12), k
        close(ev(params, state, x), model.apply(params, state, x)[0], 1e-9)


# --------------------------------------------------------------------------- CoAtNet (timm), at 64x64

COATNETS = ("coatnet_0_224", "coatnet_0_rw_224")


def timm_coatnet(name, **kw):
    from oracle import build_reference

    return build_reference(name, img_size=64, **kw)


@pytest.mark.slow  # 25M parameters: timm's init, perturbation and float64 gradients take ~30 s each
@pytest.mark.parametrize("name", COATNETS)
def test_coatnet_eval_train_and_gradients_equal_timm_in_float64(name):
    torch.manual_seed(0)
    ref = perturb(timm_coatnet(name), seed=3, size=(4, 64, 64)).double()
    model = vafunc.get_model(name, img_size=64)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    assert list(vafunc.to_state_dict(*model.init(device="meta"))) == list(sd)
    params, state = vafunc.from_state_dict(model, sd)
    x = torch.randn(3, 3, 64, 64, dtype=F64)
    check_float64(model, ref, params, state, x)


def test_coatnet_size_config_and_init():
    model = vafunc.get_model("coatnet_0_224")
    assert model.min_size == 224 and model.size_multiple == 224 and model.max_size == 224
    assert vafunc.get_model("coatnet_0_224", img_size=64).max_size == 64
    assert vafunc.get_model("maxvit_t").max_size is None  # its window biases do not cover the map
    p, s = model.init(device="meta")
    for shape in ((448, 448), (224, 448)):
        with pytest.raises(ValueError, match="exactly 224x224"):
            model.apply(p, s, torch.randn(1, 3, *shape, device="meta"))
    with pytest.raises(ValueError, match="variant"):
        vafunc.get_model("coatnet_0_224", variant="coatnet_9")
    with pytest.raises(ValueError, match="img_size"):
        vafunc.get_model("coatnet_0_224", img_size=100)
    flat = vafunc.to_state_dict(*vafunc.get_model("coatnet_0_224", img_size=64).init(0))
    qkv = flat["stages.3.blocks.1.attn.qkv.weight"]  # xavier uniform over [2304, 768, 1, 1]
    bound = (6.0 / (768 + 2304)) ** 0.5
    assert float(qkv.abs().max()) <= bound and float(qkv.abs().max()) > 0.99 * bound
    assert float(flat["stages.3.blocks.1.attn.qkv.bias"].abs().max()) == 0.0
    b = flat["stages.3.blocks.1.mlp.fc1.bias"]
    assert 0 < float(b.std()) < 2e-6
    c = flat["stages.1.blocks.1.conv1_1x1.weight"]  # timm's fan-out normal: std sqrt(2 / 768)
    assert abs(float(c.std()) - (2 / 768) ** 0.5) < 2e-3
    t = flat["stages.2.blocks.0.attn.rel_pos.relative_position_bias_table"]
    assert t.shape == (49, 12) and 0.015 < float(t.std()) < 0.025


@pytest.mark.slow
def test_coatnet_keyed_randomness_and_vmap():
    model = vafunc.get_model("coatnet_0_rw_224", img_size=64, drop_path_rate=0.4, drop_rate=0.3, num_classes=5)
    params, state = vafunc.ensemble_init(model, 2, key=0, dtype=F64)
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    rng = vafunc.random.key(4)
    with torch.no_grad():
        got, gs = vafunc.ensemble_apply(model, params, state, x, train=True, rng=rng, method="vmap")
        want, ws = vafunc.ensemble_apply(model, params, state, x, train=True, rng=rng, method="loop")
        close(got, want, 1e-10)
        p, s = vafunc.unstack(params)[0], vafunc.unstack(state)[0]
        a = model.apply(p, s, x, train=True, rng=rng)[0]
        b = model.apply(p, s, x, train=True, rng=vafunc.random.key(5))[0]
        assert torch.equal(a, model.apply(p, s, x, train=True, rng=rng)[0]) and not torch.allclose(a, b)
        with pytest.raises(ValueError):
            model.apply(p, s, x, train=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", COATNETS)
def test_coatnet_compile_fullgraph_equals_eager(name):
    torch._dynamo.reset()
    model = vafunc.get_model(name, img_size=64, drop_path_rate=0.3, drop_rate=0.2, num_classes=5)
    params, state = model.init(0, dtype=F64)
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    key = vafunc.random.key(5)
    train = torch.compile(lambda p, s, x, k: model.apply(p, s, x, train=True, rng=k), fullgraph=True)
    ev = torch.compile(lambda p, s, x: model.apply(p, s, x)[0], fullgraph=True)
    with torch.no_grad():
        got, gs = train(params, state, x, key)
        want, ws = model.apply(params, state, x, train=True, rng=key)
        close(got, want, 1e-9)
        for k, v in vafunc.flatten(ws).items():
            assert torch.allclose(vafunc.flatten(gs)[k].to(v.dtype), v, rtol=1e-9, atol=1e-12), k
        close(ev(params, state, x), model.apply(params, state, x)[0], 1e-9)
