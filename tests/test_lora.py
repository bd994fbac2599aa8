"""vafunc.lora (vafunc/research/lora.py) against peft's LoRA on the same timm model with the same
``A``, ``B``, rank, alpha and targets: outputs, adapter gradients and a few training steps; and the
properties that need no peft (the merged weights ``W + alpha/r B A`` equal the adapted forward, in
values and gradients; targets match linear layers only).

By default: deit_tiny against peft (one block, 32x32, float64: outputs, adapter gradients, three
training steps; peft's import, which pulls in transformers, adds about 3-5 s to one worker) and
EVA-02 base's separate ``q_proj``/``k_proj``/``v_proj`` (one block, 28x28), the rest against the
merged formula and on meta shapes. Under ``-m slow``: one model of every other timm ViT layout
against peft.
"""

from __future__ import annotations

import pytest
import torch

import vafunc
from vafunc.research import lora
from vafunc.training import optim
from vafunc.training.train import make_train_step

#: the tests that import peft (in the test extra; its import pulls in transformers, 3-5 s): one
#: xdist group, so that only one worker pays for it
PEFT = pytest.mark.xdist_group("peft")

VIT = ["qkv", "proj", "fc1", "fc2"]


def _pair(name, **config):
    """vafunc's model and timm's (dynamic_img_size, float64), timm's weights in both."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, dynamic_img_size=True, **config).double().eval()
    model = vafunc.get_model(name, **config)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    return model, ref, params, state


def _adapters(lm, seed=1):
    """Adapters with a non-zero ``B`` (peft's init has ``B = 0``, which would hide it)."""
    g = torch.Generator().manual_seed(seed)
    ad = lm.init(seed, dtype=torch.float64)
    return vafunc.tree_map(lambda t: t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype), ad)


def _peft(ref, lm, adapters, targets, **kw):
    import peft

    cfg = peft.LoraConfig(r=lm.rank, lora_alpha=lm.alpha, target_modules=targets, **kw)
    pm = peft.get_peft_model(ref, cfg)
    got = peft.set_peft_model_state_dict(pm, lm.to_peft(adapters))
    assert not got.unexpected_keys
    names = {n.replace(".default", "") for n, p in pm.named_parameters() if p.requires_grad}
    assert names == set(lm.to_peft(adapters)), "peft adapted other layers than vafunc"
    return pm


def _close(got, want, what, rel=1e-8):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = float((got - want).abs().max()), max(float(want.abs().max()), 1e-12)
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x {scale:.3g}"


def _check_against_peft(name, targets, size, peft_kw=None, rel=1e-10, train=False, **config):
    model, ref, params, state = _pair(name, **config)
    lm = lora.adapt(model, targets, rank=4, alpha=12)
    ad = _adapters(lm)
    pm = _peft(ref, lm, ad, targets, **(peft_kw or {}))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    w = torch.randn_like(pm(x))  # the loss: a random projection of the outputs

    def loss(adapters):
        return (lm.apply(params, adapters, state, x)[0] * w).sum()

    grads = torch.func.grad(loss)(ad)
    y = lm.apply(params, ad, state, x)[0]
    want = pm(x)
    (want * w).sum().backward()
    with torch.no_grad(), pm.disable_adapter():
        base = pm(x)
    assert float((want.detach() - base).abs().max()) > 1e-3 * float(base.abs().max()), "the adapters change nothing"
    _close(y, want.detach(), f"{name} output", rel)
    peft_grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for k, g in lm.to_peft(grads).items():
        _close(g, peft_grads[k], f"{name} gradient of {k}", 10 * rel)
    assert len(peft_grads) == 2 * len(lm.layers)
    if train:
        _train_like_peft(lm, pm, params, state, ad, size, rel)


def _train_like_peft(lm, pm, params, state, ad, size, rel):
    """Three SGD steps of make_train_step on ``lm.bind(params)`` equal peft's model trained with
    torch.optim.SGD (only its adapters require grad); vafunc's base parameters stay as they were."""
    before = {k: v.clone() for k, v in vafunc.flatten(params).items()}
    opt = optim.sgd(0.05, momentum=0.9)
    step, opt_state = make_train_step(lm.bind(params), opt), opt.init(ad)
    torch_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, size, size, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2])
    losses = []
    for _ in range(3):
        ad, state, opt_state, metrics = step(ad, state, opt_state, x, y)
        torch_opt.zero_grad()
        torch.nn.functional.cross_entropy(pm(x), y).backward()
        torch_opt.step()
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    want = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    for k, v in lm.to_peft(ad).items():
        _close(v, want[k].detach(), f"trained {k}", 100 * rel)
    for k, v in vafunc.flatten(params).items():
        assert torch.equal(v, before[k]), f"base parameter {k} changed"


@PEFT
def test_deit_tiny_equals_peft_outputs_gradients_and_training():
    # peft's list rule would also take patch_embed.proj (a conv); vafunc's targets are linear layers only.
    # At the stored size (img_size) no position embedding is resampled: timm's float64 forward is vafunc's.
    kw = {"exclude_modules": ["patch_embed.proj"]}
    _check_against_peft("deit_tiny_patch16_224", VIT, 32, kw, train=True, img_size=32, depth=1, num_classes=3)


@PEFT
def test_eva02_base_separate_q_k_v_equal_peft():
    """EVA-02 base/large: q_proj, k_proj, v_proj (no fused qkv), SwiGLU's fc1_g/fc1_x; by a regex."""
    targets = r".*\.(q_proj|k_proj|v_proj|fc1_g|fc1_x)"
    # timm builds the rotary embedding in float32 (its float64 model agrees with vafunc to ~1e-9 without
    # adapters, to ~2e-7 relative with them on q and k)
    _check_against_peft("eva02_base_patch14_224", targets, 28, rel=2e-6, depth=1)


#: one model per layout (the EVA-02 tiny/small qkv is left out: peft cannot adapt it, see below)
SLOW = {
    "deit_base_distilled_patch16_224": (VIT + ["head", "head_dist"], {"exclude_modules": ["patch_embed.proj"]}),
    "vit_small_patch14_reg4_dinov2": (VIT, {"exclude_modules": ["patch_embed.proj"]}),
    "vit_base_patch16_siglip_224": (r".*(qkv|attn\.proj|kv|attn_pool\.q|fc1|fc2)", {}),
    "vit_base_patch16_clip_224": (VIT, {"exclude_modules": ["patch_embed.proj"]}),
    "eva02_small_patch14_224": (["attn.proj", "fc1", "fc2"], {}),
    "eva02_large_patch14_224": (["q_proj", "k_proj", "v_proj", "attn.proj", "fc1_g", "fc1_x", "fc2"], {}),
}


@PEFT
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_every_layout_equals_peft(name):
    targets, kw = SLOW[name]
    p = vafunc.get_model(name).config.patch_size
    _check_against_peft(name, targets, 2 * p, kw, rel=2e-6, depth=2)


# --------------------------------------------------------------------------- without peft


def test_merged_equals_adapted_and_eva02_fused_qkv_is_adapted():
    """``model.apply(merge(params, ad))`` equals ``lm.apply(params, ad)``, values and gradients; on
    EVA-02 tiny, whose ``qkv`` reaches the kit as a bare weight with a built bias (timm reads
    ``qkv.weight`` directly, so peft's adapter on it does nothing): vafunc adapts it."""
    model = vafunc.get_model("eva02_tiny_patch14_224", depth=2)
    params, state = model.init(0, dtype=torch.float64)
    assert "blocks.0.attn.qkv" in lora.linear_layers(model)
    lm = lora.adapt(model, ["qkv", "fc2"], rank=2, alpha=3)
    ad = _adapters(lm)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)

    def adapted(a):
        return lm.apply(params, a, state, x)[0].square().sum()

    def merged(a):
        return model.apply(lm.merge(params, a), state, x)[0].square().sum()

    _close(adapted(ad), merged(ad), "merged vs adapted", rel=1e-12)
    ga, gm = torch.func.grad(adapted)(ad), torch.func.grad(merged)(ad)
    for (k, u), v in zip(vafunc.flatten(ga).items(), vafunc.flatten(gm).values()):
        _close(u, v, f"gradient of {k}", rel=1e-10)
    only_qkv = lora.adapt(model, ["qkv"], rank=2, alpha=3)
    y0 = model.apply(params, state, x)[0]
    y1 = only_qkv.apply(params, {"blocks": {k: {"attn": v["attn"]} for k, v in ad["blocks"].items()}}, state, x)[0]
    assert float((y1 - y0).abs().max()) > 1e-3 * float(y0.abs().max())
    # B = 0 at init: the adapted model starts as its base
    _close(lm.apply(params, lm.init(3, dtype=torch.float64), state, x)[0], y0, "fresh adapters", rel=0)


def test_vmap_over_stacked_adapters_equals_loop_and_policy_bf16():
    model = vafunc.get_model("deit_tiny_patch16_224", depth=1, num_classes=5)
    params, state = model.init(0, dtype=torch.float64)
    lm = lora.adapt(model, VIT, rank=2)
    ads = [vafunc.tree_map(lambda t: t + 0.1, lm.init(i, dtype=torch.float64)) for i in range(3)]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    loop = torch.stack([lm.apply(params, a, state, x)[0] for a in ads])
    batched = torch.vmap(lambda a: lm.apply(params, a, state, x)[0])(vafunc.stack(ads))
    _close(batched, loop, "vmap over adapters", rel=1e-10)
    # mixed precision: the targeted weights are cast once per call, the adapters still reached
    p32, a32 = vafunc.tree_map(lambda t: t.float(), params), vafunc.tree_map(lambda t: t.float(), ads[0])
    y = lm.apply(p32, a32, state, x.float(), policy=vafunc.Policy.bf16())[0]
    assert y.dtype == torch.float32
    base = model.apply(params, state, x)[0]
    err, effect = float((y.double() - loop[0]).abs().max()), float((loop[0] - base).abs().max())
    assert err < 0.25 * effect, f"bf16: off by {err:.3g} where the adapters move the logits by {effect:.3g}"


# --------------------------------------------------------------------------- targets and errors


def test_targets_are_linear_layers_only_with_clear_errors():
    model = vafunc.get_model("deit_tiny_patch16_224", depth=2)
    lm = lora.adapt(model, ["proj"])
    assert lm.layers == ("blocks.0.attn.proj", "blocks.1.attn.proj")  # not the patch embedding's conv
    assert lora.adapt(model, r"blocks\.1\..*").layers == (
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    )
    with pytest.raises(ValueError, match=r"'q_proj' matches no linear layer.*blocks\.\*\.attn\.qkv.*head"):
        lora.adapt(model, ["qkv", "q_proj"])
    with pytest.raises(ValueError, match="only convolutions: patch_embed.proj"):
        lora.adapt(model, r"patch_embed\.proj")
    with pytest.raises(TypeError, match="targets must be"):
        lora.adapt(model, [])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora.adapt(model, ["qkv"], rank=0)
    eva = vafunc.get_model("eva02_base_patch14_224", depth=1)
    assert lora.adapt(eva, ["proj"]).layers == ("blocks.0.attn.proj",)  # q_proj/k_proj/v_proj are other names
    assert len(lora.adapt(eva, ["q_proj", "k_proj", "v_proj"]).layers) == 3


def test_adapter_shape_dtype_and_peft_name_errors():
    model = vafunc.get_model("deit_tiny_patch16_224", depth=1)
    params, state = model.init(0)
    lm = lora.adapt(model, ["qkv"], rank=2)
    assert lm.shapes() == {"blocks.0.attn.qkv": ((2, 192), (576, 2))}
    ad = lm.init(0)
    x = torch.randn(1, 3, 32, 32)
    wrong = {"blocks": {"0": {"attn": {"qkv": {"lora_A": torch.zeros(3, 192), "lora_B": torch.zeros(576, 3)}}}}}
    with pytest.raises(ValueError, match=r"lora_A \[3, 192\].*expected \[2, 192\]"):
        lm.apply(params, wrong, state, x)
    with pytest.raises(TypeError, match="float64.*float32"):
        lm.apply(params, lm.init(0, dtype=torch.float64), state, x)
    with pytest.raises(ValueError, match="the adapter tree has no 'blocks.0.attn.qkv'"):
        lm.apply(params, {}, state, x)
    sd = lm.to_peft(ad)
    assert list(sd) == [
        "base_model.model.blocks.0.attn.qkv.lora_A.weight",
        "base_model.model.blocks.0.attn.qkv.lora_B.weight",
    ]
    back = lm.from_peft(sd)
    assert vafunc.flatten(back).keys() == vafunc.flatten(ad).keys()
    with pytest.raises(ValueError, match="unexpected"):
        lm.from_peft({**sd, "base_model.model.head.lora_A.weight": torch.zeros(2, 192)})
    with pytest.raises(TypeError, match="own backend"):
        lm.apply(params, ad, state, x, backend=object())


@pytest.mark.slow
def test_adapted_forward_compiles_fullgraph():
    model = vafunc.get_model("deit_tiny_patch16_224", depth=1, num_classes=5)
    params, state = model.init(0)
    lm = lora.adapt(model, VIT, rank=2)
    ad = vafunc.tree_map(lambda t: t + 0.1, lm.init(0))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(lambda p, a, x: lm.apply(p, a, state, x)[0], fullgraph=True)
    torch.testing.assert_close(compiled(params, ad, x), lm.apply(params, ad, state, x)[0], rtol=1e-4, atol=1e-4)
