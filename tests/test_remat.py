"""Rematerialisation (``apply(..., remat=...)``, ``vafunc.core.remat``): gradients equal the plain
apply's in float64 under every differentiation path (``torch.func.grad``, ``vjp``, double backward,
plain autograd, ``vmap`` over an ensemble in both orders, the train step by each lowering), the new
BatchNorm statistics are the plain ones, only the block inputs are kept for the backward, and the
names select the blocks they say. ``torch.utils.checkpoint`` is shown failing where remat works.
Memory and time are measured in ``benchmarks/remat.py``, not here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vafunc
from vafunc.core import remat as R
from vafunc.core.kit import Scope
from vafunc.training import optim
from vafunc.training.train import make_train_step

#: a 2-layer ViT small enough for float64 gradients in the default suite
SMALL_VIT = dict(image_size=32, patch_size=8, num_layers=2, hidden_dim=32, mlp_dim=64, num_heads=2)


def _leaves(t):
    return vafunc.tree.tree_leaves(t)


def _max_diff(a, b) -> float:
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(la, lb))


def _data(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


#: ResNet-10 (one basic block a stage) with stochastic depth: the recomputation must draw the masks again
SMALL_RESNET = dict(layers=(1, 1, 1, 1), drop_path_rate=0.2)


@pytest.fixture(scope="module")
def resnet():
    model = vafunc.get_model("resnet18", num_classes=10, **SMALL_RESNET)
    return model, *model.init(0, dtype=torch.float64)


def _grads(model, p, s, x, y, remat, **kw):
    def loss(p):
        logits, new = model.apply(p, s, x, train=True, rng=vafunc.random.key(1), remat=remat, **kw)
        return F.cross_entropy(logits, y), new

    return torch.func.grad(loss, has_aux=True)(p)


@pytest.mark.parametrize(
    "name, config, exact",
    [
        ("resnet18", SMALL_RESNET, True),
        pytest.param("vit_b_16", SMALL_VIT, False, marks=pytest.mark.slow),  # sums in another order
        pytest.param("swin_t", {}, False, marks=pytest.mark.slow),
        pytest.param("densenet121", {}, True, marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", {}, True, marks=pytest.mark.slow),
        pytest.param("mobilenet_v3_small", {}, True, marks=pytest.mark.slow),
    ],
)
def test_gradients_and_statistics_equal_the_plain_apply(name, config, exact):
    model = vafunc.get_model(name, num_classes=10, **config)
    p, s = model.init(0, dtype=torch.float64)
    x, y = _data()
    g0, s0 = _grads(model, p, s, x, y, None)
    g1, s1 = _grads(model, p, s, x, y, "blocks")
    assert list(vafunc.flatten(g1)) == list(vafunc.flatten(g0)) and list(vafunc.flatten(s1)) == list(vafunc.flatten(s0))
    if exact:  # the same op sequence: bit-equal
        assert _max_diff(g0, g1) == 0 and (not _leaves(s0) or _max_diff(s0, s1) == 0)
    else:
        assert _max_diff(g0, g1) < 1e-12 and (not _leaves(s0) or _max_diff(s0, s1) < 1e-12)
    if name == "resnet18":  # loss.backward() on leaf tensors: the engine's own path, no torch.func level
        leaves = {k: v.clone().requires_grad_() for k, v in vafunc.flatten(p).items()}
        logits, _ = model.apply(vafunc.unflatten(leaves), s, x, train=True, rng=vafunc.random.key(1), remat="blocks")
        F.cross_entropy(logits, y).backward()
        assert _max_diff(g0, vafunc.unflatten({k: v.grad for k, v in leaves.items()})) == 0


@pytest.mark.slow
def test_vjp_and_double_backward(resnet):
    model, p, s = resnet
    x, y = _data()
    f = lambda p, r=None: model.apply(p, s, x, train=True, rng=vafunc.random.key(2), remat=r)[0]  # noqa: E731
    out0, back0 = torch.func.vjp(f, p)
    out1, back1 = torch.func.vjp(lambda p: f(p, "blocks"), p)
    ct = torch.randn_like(out0)
    assert torch.equal(out0, out1) and _max_diff(back0(ct)[0], back1(ct)[0]) == 0
    # a Hessian-vector product, reverse over reverse, eval mode
    v = vafunc.tree_map(torch.randn_like, p)

    def gv(p, r):
        g = torch.func.grad(lambda q: F.cross_entropy(model.apply(q, s, x, remat=r)[0], y))(p)
        return sum((a * b).sum() for a, b in zip(_leaves(g), _leaves(v)))

    h0, h1 = torch.func.grad(gv)(p, None), torch.func.grad(gv)(p, "blocks")
    assert _max_diff(h0, h1) < 1e-10 * max(t.abs().max().item() for t in _leaves(h0))


def test_vmap_over_an_ensemble_both_orders(resnet):
    model, _, _ = resnet
    P, S = vafunc.ensemble_init(model, 2, 0, dtype=torch.float64)
    x, y = _data()
    keys = vafunc.random.split(vafunc.random.key(0), 2)

    def loss(p, s, k, remat=None):
        logits, new = model.apply(p, s, x, train=True, rng=k, remat=remat)
        return F.cross_entropy(logits, y), new

    g0, s0 = torch.vmap(torch.func.grad(loss, has_aux=True))(P, S, keys)
    g1, s1 = torch.vmap(torch.func.grad(loss, has_aux=True), in_dims=(0, 0, 0, None))(P, S, keys, "blocks")

    def ensemble_loss(P):
        losses, new = torch.vmap(lambda p, s, k: loss(p, s, k, "blocks"))(P, S, keys)
        return losses.sum(), new

    g2, s2 = torch.func.grad(ensemble_loss, has_aux=True)(P)
    scale = max(t.abs().max().item() for t in _leaves(g0))
    # under vmap the recorded forward takes the members lowering of a conv (its weights are not
    # tracked there) and the recomputation torch's batching rule: equal within rounding, which
    # train-mode BatchNorm over 2 samples on layer4's 1x1 maps amplifies (float32 rounding: 1e-7)
    for g, st in ((g1, s1), (g2, s2)):
        assert _max_diff(g0, g) < 1e-9 * scale and _max_diff(s0, st) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("method", ["batched", "loop", "vmap", "single-autograd", "single-func"])
def test_train_step_takes_remat_by_every_lowering(resnet, method):
    model, p, s = resnet
    x, y = _data(4)
    opt = optim.sgd(0.1, momentum=0.9)
    if method.startswith("single"):
        kw, args = {"grad": method.split("-")[1]}, (p, s, opt.init(p))
    else:
        P, S = vafunc.ensemble_init(model, 2, 0, dtype=torch.float64)
        kw, args = {"ensemble": True, "ensemble_method": method}, (P, S, opt.init(P))
    plain = make_train_step(model, opt, **kw)(*args, x, y, vafunc.random.key(3))
    remat = make_train_step(model, opt, remat="blocks", **kw)(*args, x, y, vafunc.random.key(3))
    tol = 1e-9 if method == "vmap" else 0.0
    assert _max_diff(plain[0], remat[0]) <= tol and _max_diff(plain[1], remat[1]) <= tol
    assert torch.equal(plain[3]["loss"], remat[3]["loss"]) or method == "vmap"


def _saved_bytes(model, p, s, x, remat) -> int:
    """The bytes autograd keeps for the backward (unique storages), the caller's parameters and
    BatchNorm buffers excluded (they are held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in _leaves(p) + _leaves(s)}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in held:
            seen[st.data_ptr()] = st.nbytes()
        return t

    leaves = {k: v.detach().requires_grad_() for k, v in vafunc.flatten(p).items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.apply(vafunc.unflatten(leaves), s, x, train=True, rng=vafunc.random.key(0), remat=remat)
    return sum(seen.values())


def test_only_block_inputs_are_kept():
    """ResNet-18 has one more basic block a stage than ResNet-10: rematerialised, the backward keeps
    exactly those four blocks' inputs (and their 16-byte keys) more; plain, about 9 tensors a block."""
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    saved = {}
    for layers in ((1, 1, 1, 1), (2, 2, 2, 2)):
        model = vafunc.get_model("resnet18", num_classes=10, layers=layers, drop_path_rate=0.2)
        p, s = model.init(0, dtype=torch.float64)
        saved[layers] = {r: _saved_bytes(model, p, s, x, r) for r in (None, "blocks")}
    shapes = model.feature_shapes(64)  # the input of layer{i}.1 is the output of layer{i}.0
    inputs = sum(4 * torch.Size(shapes[f"layer{i}.0"][1:]).numel() * 8 for i in range(1, 5))
    more = {r: saved[(2, 2, 2, 2)][r] - saved[(1, 1, 1, 1)][r] for r in (None, "blocks")}
    assert more["blocks"] == inputs + 4 * 16, (more, inputs)
    assert more[None] > 3 * inputs and saved[(2, 2, 2, 2)]["blocks"] < 0.6 * saved[(2, 2, 2, 2)][None]
    # the stem (a segment in the model's own scope): its 32x32 maps (the conv output BatchNorm keeps,
    # the activation maxpool keeps) give way to the image
    stem = _saved_bytes(model, p, s, x, None) - _saved_bytes(model, p, s, x, ["stem"])
    assert stem >= 2 * 4 * 64 * 32 * 32 * 8 - x.numel() * 8, stem


def test_names_select_blocks():
    model = vafunc.get_model("resnet18", num_classes=10)
    blocks = R.plan(model.family, model.config, "blocks", Scope)
    assert blocks == {"stem"} | {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}  # the stem: a segment
    vit = vafunc.get_model("vit_b_16", **SMALL_VIT)
    assert R.plan(vit.family, vit.config, "blocks", Scope) == {f"encoder.layers.encoder_layer_{i}" for i in range(2)}
    assert "layer2.0.downsample" in R.block_paths(model.family, model.config, Scope)  # untapped blocks can be named
    two = ["layer2.0.downsample", "layer4"]
    assert R.plan(model.family, model.config, two, Scope) == set(two)
    with pytest.raises(ValueError, match="layer9"):
        R.plan(model.family, model.config, ["layer9"], Scope)
    with pytest.raises(ValueError, match="'blocks' or a list"):
        R.plan(model.family, model.config, "everything", Scope)
    with pytest.raises(TypeError, match="list of block paths"):
        R.plan(model.family, model.config, [3], Scope)


def test_features_ignore_remat(resnet):
    model, p, s = resnet
    x, _ = _data()
    a, _ = model.features(p, s, x, ["layer2.0", "layer3"], remat="blocks")
    b, _ = model.features(p, s, x, ["layer2.0", "layer3"])
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_torch_checkpoint_fails_under_vmap_of_grad_where_remat_works():
    """pytorch issue 165880: torch.utils.checkpoint under torch.func (saved-tensor hooks are
    refused); the same block rematerialised by the kit runs."""
    from torch.utils.checkpoint import checkpoint

    w = torch.randn(3, 4, 4)
    x = torch.randn(2, 4)

    def loss(w):
        return checkpoint(lambda h: torch.tanh(h @ w), x, use_reentrant=False).sum()

    with pytest.raises(RuntimeError):
        torch.vmap(torch.func.grad(loss))(w)
