"""AlexNet, VGG, GoogLeNet and Inception v3: the features the registry-driven oracle harness does
not reach, each checked against torchvision.

- ``transform_input`` reproduces torchvision's per-channel arithmetic (bit for bit on the input,
  1e-5 x scale on the logits);
- auxiliary heads (``apply(..., aux=True)``): outputs, updated BatchNorm statistics and gradients
  of every parameter equal torchvision's train mode; eval-mode aux outputs equal torchvision's
  aux modules run in eval mode;
- checkpoints with aux heads load into models built without them (``Family.remap``), with a note;
- the documented minimum input size is tight (torchvision fails one pixel below it) and vafunc
  names it in its error;
- feature taps equal the outputs of the torchvision modules of the same name;
- the init schemes draw from torchvision's distributions (mean and std per tensor).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from oracle import perturb
from torch.func import grad

import vafunc
from vafunc.core import layers as L
from vafunc.models.googlenet import IMAGENET_MEAN, IMAGENET_STD, transform_input


def _close(a, b, rel, what):
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"


def _reference(name: str, seed: int = 7, **kw) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's GoogLeNet/Inception init notice
        torch.manual_seed(1234)
        ref = getattr(torchvision.models, name)(**kw)
    return perturb(ref, seed=seed).eval()


@torch.no_grad()
def _calibrate(ref: torch.nn.Module, h: int, w: int) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of a random batch.

    With perturbed running statistics and GoogLeNet's std-0.01 weights the signal dies out
    layer by layer and the eval logits do not depend on the input (Inception v3's std-0.1 ones
    blow up instead); calibrated statistics keep eval comparisons meaningful.
    """
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    aux = getattr(ref, "AuxLogits", None)
    if aux is not None and min(h, w) < 299:
        ref.AuxLogits = None  # its 5x5 conv needs >= 299 inputs; keep its perturbed stats
    for m in bns:
        m.momentum = 1.0
    ref.train()
    ref(torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(11)))
    for m in bns:
        m.momentum = 0.1
    if aux is not None:
        ref.AuxLogits = aux
    return ref.eval()


def _pair(name: str, size: tuple[int, int], **kw):
    """A perturbed, calibrated torchvision model and the vafunc model with the same config and
    weights (``size``: the H, W of the calibration batch)."""
    ref = _calibrate(_reference(name, **kw), *size)
    model = vafunc.get_model(name, **kw)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    params, state = vafunc.from_state_dict(model, sd)
    return ref, model, params, state


# --------------------------------------------------------------------------- transform_input


def test_transform_input_is_torchvisions_arithmetic_bit_for_bit():
    ref = _reference("googlenet", transform_input=True)
    x = torch.randn(2, 3, 17, 19)
    want = ref._transform_input(x)
    assert torch.equal(transform_input(x), want)
    # the algebraically equal one-liner rounds differently: the bitwise check can tell them apart
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert not torch.equal((x * std + mean - 0.5) / 0.5, want)


@pytest.mark.parametrize(
    "name, kw, size", [("googlenet", {}, (45, 52)), ("inception_v3", {"aux_logits": False}, (80, 91))]
)
def test_transform_input_matches_reference(name, kw, size):
    ref, model, params, state = _pair(name, size, transform_input=True, **kw)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref(x)
        got, _ = model.apply(params, state, x)
    _close(got, want, 1e-5, f"{name} transform_input=True logits")
    # and the transform is really applied (the same weights without it give other logits)
    plain = vafunc.get_model(name, transform_input=False, **kw)
    with torch.no_grad():
        other, _ = plain.apply(params, state, x)
    assert float((other - want).abs().max()) > 1e-2


# --------------------------------------------------------------------------- auxiliary heads

#: name, vafunc aux output -> torchvision namedtuple field, input size, deterministic overrides
AUX_CASES = [
    ("googlenet", {"aux1": "aux_logits1", "aux2": "aux_logits2"}, (2, 40, 47), {"dropout": 0.0, "dropout_aux": 0.0}),
    ("inception_v3", {"aux": "aux_logits"}, (2, 299, 301), {"dropout": 0.0}),
]


@pytest.mark.parametrize("name, fields, size, det", AUX_CASES, ids=[c[0] for c in AUX_CASES])
def test_aux_outputs_state_and_gradients_match_reference_train_mode(name, fields, size, det):
    b, h, w = size
    ref, model, params, state = _pair(name, (h, w), **det)
    x = torch.randn(b, 3, h, w)
    ref.train()
    out = ref(x)
    want = {"logits": out.logits, **{k: getattr(out, f) for k, f in fields.items()}}
    weights = {k: torch.randn(v.shape) for k, v in want.items()}
    sum(((want[k] * weights[k]).sum() for k in want), torch.zeros(())).backward()

    got, new_state = model.apply(params, state, x, train=True, aux=True)
    assert isinstance(got, dict) and list(got) == ["logits", *fields]
    for k in want:
        _close(got[k].detach(), want[k].detach(), 1e-5, f"{name} train output {k}")
    buffers = dict(ref.named_buffers())
    flat_new = vafunc.flatten(new_state)
    assert set(flat_new) == set(buffers)
    assert any(k.startswith(("aux", "AuxLogits")) for k in flat_new)
    for k, v in flat_new.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(buffers[k]), k
        else:
            _close(v, buffers[k], 1e-5, f"{name} updated buffer {k}")

    def loss(p):
        o, _ = model.apply(p, state, x, train=True, aux=True)
        return sum((o[k] * weights[k]).sum() for k in weights)

    grads = vafunc.flatten(grad(loss)(params))
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    assert set(grads) == set(ref_grads)
    for k, g in grads.items():
        assert ref_grads[k] is not None, k
        _close(g, ref_grads[k], 1e-4, f"{name} gradient of {k}")


@pytest.mark.parametrize("name, fields, size, det", AUX_CASES, ids=[c[0] for c in AUX_CASES])
def test_aux_outputs_in_eval_mode_match_reference_aux_modules(name, fields, size, det):
    ref, model, params, state = _pair(name, size[1:])
    heads = {"aux1": ("inception4a", "aux1"), "aux2": ("inception4d", "aux2"), "aux": ("Mixed_6e", "AuxLogits")}
    seen = {}
    hooks = [
        getattr(ref, after).register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.clone()))
        for k, (after, _) in heads.items()
        if k in fields
    ]
    b, h, w = size
    x = torch.randn(1, 3, h, w)
    try:
        with torch.no_grad():
            want_logits = ref(x)
            want = {k: getattr(ref, heads[k][1])(seen[k]) for k in fields}
            got, new_state = model.apply(params, state, x, aux=True)
    finally:
        for hk in hooks:
            hk.remove()
    assert new_state is state
    _close(got["logits"], want_logits, 1e-5, f"{name} eval logits with aux=True")
    for k in fields:
        _close(got[k], want[k], 1e-5, f"{name} eval aux output {k}")
    # the default call returns the plain logits tensor, in eval and train mode alike
    with torch.no_grad():
        plain, _ = model.apply(params, state, x)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, got["logits"])


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_aux_requested_without_aux_heads_is_an_error(name):
    model = vafunc.get_model(name, aux_logits=False)
    params, state = model.init(0)
    x = torch.randn(2, 3, 80, 80)
    with pytest.raises(ValueError, match="aux_logits=True"):
        model.apply(params, state, x, aux=True)
    logits, _ = model.apply(params, state, x, train=True, rng=vafunc.random.key(0))  # a plain tensor
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 1000)


def test_inception_aux_head_minimum_is_299():
    ref = _reference("inception_v3").train()
    with pytest.raises(RuntimeError):  # torchvision's own limit: the aux head's 5x5 conv
        ref(torch.randn(2, 3, 298, 320))
    model = vafunc.get_model("inception_v3")
    params, state = model.init(0)
    x = torch.randn(1, 3, 298, 320)
    with pytest.raises(ValueError, match="299x299"):
        model.apply(params, state, x, aux=True)
    logits, _ = model.apply(params, state, x)  # the main network is fine at that size
    assert logits.shape == (1, 1000)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "name, heads, n_dropped, size",
    [("googlenet", r"aux1\.\*, aux2\.\*", 20, 40), ("inception_v3", r"AuxLogits\.\*", 14, 80)],
)
def test_checkpoint_with_aux_heads_loads_into_model_without(name, heads, n_dropped, size):
    ref = _calibrate(_reference(name), size, size + 3)  # aux_logits=True: it has aux tensors
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    model = vafunc.get_model(name, aux_logits=False)
    with pytest.warns(UserWarning, match=rf"dropped {n_dropped} .*\({heads}\).*aux_logits=False"):
        params, state = vafunc.from_state_dict(model, sd)
    flat = vafunc.to_state_dict(params, state)
    assert len(flat) == len(sd) - n_dropped
    assert not any(k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in flat)
    # what torchvision's builder leaves after deleting its aux heads: same names, same order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        no_aux = getattr(torchvision.models, name)(aux_logits=False)
    assert list(flat) == list(no_aux.state_dict())
    assert vafunc.count_params(params) == sum(p.numel() for p in no_aux.parameters())
    x = torch.randn(2, 3, size, size + 3)
    with torch.no_grad():
        _close(model.apply(params, state, x)[0], ref(x), 1e-5, f"{name} without aux heads")
    # the other way round is a strict error naming the missing aux tensors
    with pytest.raises(vafunc.StateDictMismatch, match=r"missing keys .*(aux1|AuxLogits)\."):
        vafunc.from_state_dict(vafunc.get_model(name), flat)


# --------------------------------------------------------------------------- minimum sizes

MIN_SIZES = [("alexnet", 63), ("vgg11", 32), ("googlenet", 15), ("inception_v3", 75)]


@pytest.mark.parametrize("name, m", MIN_SIZES, ids=[n for n, _ in MIN_SIZES])
def test_documented_minimum_size_is_tight_and_named_in_the_error(name, m):
    model = vafunc.get_model(name)
    assert model.min_size == m
    ref = _calibrate(_reference(name), m, m)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    with torch.no_grad():
        want = ref(torch.randn(1, 3, m, m))  # torchvision accepts the minimum ...
        x = torch.randn(2, 3, m, m + 1)
        _close(model.apply(params, state, x)[0], ref(x), 1e-5, f"{name} at its minimum size")
        with pytest.raises(RuntimeError):  # ... and fails one pixel below it
            ref(torch.randn(1, 3, m - 1, m - 1))
    assert want.shape == (1, 1000)
    for h, w in [(m - 1, m - 1), (m - 1, m + 40), (m + 40, m - 1)]:
        with pytest.raises(ValueError, match=rf"at least {m}x{m}, got {h}x{w}"):
            model.apply(params, state, torch.randn(1, 3, h, w))


# --------------------------------------------------------------------------- feature taps

TAP_CASES = [
    ("alexnet", {}, ["features.0", "features.5", "features.12"], 70),
    ("vgg11_bn", {}, ["features.0", "features.1", "features.7", "features.28"], 40),
    ("googlenet", {"aux_logits": False}, ["conv1", "maxpool2", "inception4a", "maxpool4", "inception5b"], 50),
    ("inception_v3", {"aux_logits": False}, ["Conv2d_2b_3x3", "maxpool1", "Mixed_5b", "Mixed_6e", "Mixed_7c"], 90),
]


@pytest.mark.parametrize("name, kw, names, size", TAP_CASES, ids=[c[0] for c in TAP_CASES])
def test_feature_taps_match_reference_modules(name, kw, names, size):
    ref, model, params, state = _pair(name, (size, size + 5), **kw)
    modules = dict(ref.named_modules())
    seen = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.clone())) for n in names]
    x = torch.randn(2, 3, size, size + 5)
    try:
        with torch.no_grad():
            ref(x)
            taps = L.Taps(names)
            out, new_state = model.apply(params, state, x, taps=taps)
    finally:
        for hk in hooks:
            hk.remove()
    assert out is None and new_state is state  # stopped after the last feature stage
    assert set(taps.got) == set(names)
    for n in names:
        assert taps.got[n].shape == seen[n].shape, n
        _close(taps.got[n], seen[n], 1e-5, f"{name} tap {n}")


# --------------------------------------------------------------------------- init schemes

INIT_CASES = [
    ("alexnet", {}),
    ("vgg11_bn", {}),
    ("vgg11_bn", {"init_weights": False}),
    ("googlenet", {}),
    ("googlenet", {"init_weights": False}),
    ("inception_v3", {}),
    ("inception_v3", {"init_weights": False}),
]


#: vgg11_bn (133M parameters drawn twice, with and without its init scheme) runs under -m slow: googlenet
#: and inception_v3 check both paths by default
_INIT_SLOW = {("vgg11_bn", False), ("vgg11_bn", True)}


@pytest.mark.parametrize(
    "name, kw",
    [
        pytest.param(
            n, kw, id=f"{n}-{kw}", marks=[pytest.mark.slow] if (n, kw.get("init_weights", True)) in _INIT_SLOW else []
        )
        for n, kw in INIT_CASES
    ],
)
def test_init_draws_from_the_reference_distributions(name, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(0)
        ref = getattr(torchvision.models, name)(**kw)
    params, state = vafunc.get_model(name, **kw).init(3)
    mine = vafunc.to_state_dict(params, state)
    theirs = ref.state_dict()
    assert list(mine) == list(theirs)
    for k, t in theirs.items():
        if not t.is_floating_point() or t.numel() < 500:
            continue  # small tensors: too few draws for a statistical comparison
        a, b = mine[k].double(), t.double()
        sa, sb, ma, mb = float(a.std()), float(b.std()), float(a.mean()), float(b.mean())
        # std: 10% (its sampling error is ~1/sqrt(2n) < 3.2%); mean: 5 standard errors
        assert abs(sa - sb) <= 0.1 * sb + 1e-7, f"{name} {k}: std {sa:.4g} vs {sb:.4g}"
        assert abs(ma - mb) <= 5 * sb / t.numel() ** 0.5 + 0.05 * abs(mb) + 1e-7, (
            f"{name} {k}: mean {ma:.4g} vs {mb:.4g}"
        )
        assert float(a.abs().max()) <= float(b.abs().max()) * 1.5 + 1e-7, f"{name} {k}: range"


# --------------------------------------------------------------------------- dropout


def test_dropout_needs_a_key_in_train_mode_and_is_reproducible():
    model = vafunc.get_model("googlenet", num_classes=10)
    params, state = model.init(0)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, state, x, train=True)
    k = vafunc.random.key(1)
    a, _ = model.apply(params, state, x, train=True, rng=k, aux=True)
    b, _ = model.apply(params, state, x, train=True, rng=k, aux=True)
    c, _ = model.apply(params, state, x, train=True, rng=vafunc.random.key(2), aux=True)
    for name in ("logits", "aux1", "aux2"):
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name
