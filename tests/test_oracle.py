"""The oracle harness: every registered model with a reference implementation is compared with
it, registry-driven (a new family only registers a Reference).

Reference built with random init, every weight and BN statistic perturbed (oracle.perturb), loaded
through vafunc.from_state_dict, then: state_dict names, shapes and key order; parameter counts
against the registry and the oracle; eval outputs at an odd, non-square size; the state_dict round
trip. Those run for every model in the default suite. The heavier batteries (eval at more sizes,
train-mode outputs and running statistics, gradients of a scalar loss for every parameter) run on
one representative per family by default (oracle.representatives) and on every model with
``-m slow``.

Models above oracle.META_THRESHOLD parameters take the cheap path by default: names, shapes, key
order and counts with both sides built on the meta device, plus one eval at the minimum size; the
full harness runs on them with ``-m slow``. The meta comparison runs for every model (it is cheap),
so the path is known to work on a family before its first giant arrives.
"""

from __future__ import annotations

import collections
import gc

import pytest
import torch
from oracle import (
    AUX_OUTPUTS,
    ORACLE_SIZES,
    build_reference,
    build_reference_fast,
    build_reference_meta,
    deterministic_overrides,
    deterministic_reference,
    has_reference,
    heavy_params,
    is_big,
    main_logits,
    min_eval_size,
    module_tree_problems,
    perturb,
    representatives,
)
from oracle import sizes_to_test as sizes_for
from torch.func import grad

import torch_compat
import vafunc

MODELS = [n for n in vafunc.list_models() if vafunc.get_entry(n).reference is not None]


def _group(n):
    return f"oracle-{n}"


#: every model: the cheap part of the full harness (names, shapes, counts, one eval, round trip);
#: models above the meta threshold run it under -m slow (the meta path below stands in by default)
ALL = [
    pytest.param(n, marks=[pytest.mark.xdist_group(_group(n))] + ([pytest.mark.slow] if is_big(n) else []), id=n)
    for n in MODELS
]
#: the heavier batteries: family representatives by default, every model under -m slow. The same
#: models in the same order as ALL, so pytest keeps one module-scoped pair per model.
HEAVY = heavy_params(MODELS, group=_group)
#: the gradient check also runs by default on a bottleneck ResNet (resnet18 has basic blocks only)
#: and on EfficientNet v2's fused MBConv blocks (efficientnet_b0 has none)
GRAD_ALSO = ("resnet50", "efficientnet_v2_s")
HEAVY_GRAD = heavy_params(MODELS, also=GRAD_ALSO, group=_group)

#: Dropout / stochastic depth fields known per model (taken from the registry's former
#: Entry.deterministic_train): oracle.deterministic_overrides must switch each of them off.
KNOWN_RATE_FIELDS = {
    "alexnet": ("dropout",),
    **{n: ("drop_rate",) for n in ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")},
    **{
        f"efficientnet_{v}": ("dropout", "stochastic_depth_prob")
        for v in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "v2_s", "v2_m", "v2_l")
    },
    "googlenet": ("dropout", "dropout_aux"),
    "inception_v3": ("dropout",),
    **{n: ("dropout",) for n in ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3")},
    "mobilenet_v2": ("dropout",),
    "mobilenet_v3_large": ("dropout",),
    "mobilenet_v3_small": ("dropout",),
    **{f"vgg{d}{bn}": ("dropout",) for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    "xception": ("drop_rate",),
}


def _train_call(entry, size):
    """Train-mode call conventions for models with auxiliary heads (oracle.AUX_OUTPUTS: pairs
    (vafunc output name, reference namedtuple field)): vafunc is asked for them with aux=True and
    every output is compared; inputs grow to entry.extra["aux_min_size"]."""
    aux = dict(AUX_OUTPUTS.get(entry.name, ()))
    m = dict(entry.extra).get("aux_min_size", 0)
    b, h, w = size
    kw = {"aux": True} if aux else {}

    def ref_outputs(out):
        return {"logits": main_logits(out), **{k: getattr(out, f) for k, f in aux.items()}}

    def outputs(out):
        return out if aux else {"logits": main_logits(out)}

    return (b, max(h, m), max(w, m)), kw, ref_outputs, outputs


def _require_reference(name):
    if not has_reference(name):  # a missing oracle is a broken test environment, not a pass
        pytest.fail(f"the oracle package for {name} is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def pair(request):
    """The model's name. Module-scoped and parametrized so that pytest runs one model's tests
    together; the built pair lives in _pair's one-entry cache only, so building the next model's
    frees the previous (a fixture holding it would keep two giants alive at once)."""
    name = request.param
    _require_reference(name)
    return name


#: float32 gradient tolerances above the default 1e-4: the biases in front of MaxViT's / CoAtNet's
#: train-mode BatchNorms have exactly cancelling gradients, left as float32 noise on both sides
#: (against a float64 run: vafunc 1.1e-4 off, torchvision 2.1e-4); test_maxvit compares them in
#: float64 to 1e-8; so do the conv biases in front of basic_unet's instance norms (test_basic_unet: float64)
GRAD_RTOL = {"maxvit_t": 5e-4, "coatnet_0_224": 5e-4, "coatnet_0_rw_224": 5e-4, "basic_unet": 5e-4}

#: the models whose pair is built with the reference's own initialisation: those the gradient
#: check runs on by default. The others get the cheap fill (build_reference_fast; their own init
#: costs more than their tests), and the gradient check builds them its own way under -m slow.
OWN_INIT = frozenset(representatives().values()) | frozenset(GRAD_ALSO)


_LAST: dict = {}


def _pair(name, own_init=None):
    """``(name, model, ref, sd, params, state)`` for ``name``, kept for the last model only:
    building a large reference again costs seconds, and keeping two costs memory (a giant's pair
    and its gradients need 10+ GB). The previous pair is dropped before the next is built.
    ``own_init``: the reference's own initialisation (default: for OWN_INIT models), else the
    cheap fill; ``"any"``: whichever pair of ``name`` is cached."""
    if own_init == "any":
        hit = next((v for (n, _), v in _LAST.items() if n == name), None)
        return hit if hit is not None else _pair(name)
    own = name in OWN_INIT if own_init is None else own_init
    if (name, own) not in _LAST:
        _LAST.clear()
        gc.collect()  # modules can hold reference cycles: free the previous pair's tensors now
        _LAST[(name, own)] = _build_pair(name, own)
    return _LAST[(name, own)]


def release_caches():
    """Drop the cached pair (tests/conftest.py calls it after a run of tests that need the machine
    to themselves, so a giant's pair is not held while the other workers resume)."""
    _LAST.clear()
    gc.collect()


def _build_pair(name, own):
    torch.manual_seed(1234)
    model = vafunc.get_model(name)
    ref = perturb((build_reference if own else build_reference_fast)(name), seed=7, size=sizes_for(model)[0])
    live = ref.state_dict()
    sd = collections.OrderedDict((k, v.detach().clone()) for k, v in live.items())
    sd._metadata = live._metadata  # torchvision's MNASNet refuses a state_dict without versions
    params, state = vafunc.from_state_dict(model, sd)
    return name, model, ref, sd, params, state


def _close(a, b, rel, what, floor=1e-6):
    scale = max(float(b.abs().max()), floor)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_state_dict_names_shapes_and_counts(pair):
    name, model, ref, sd, params, state = _pair(pair)
    mine = vafunc.to_state_dict(*model.init(device="meta"))
    assert set(mine) == set(sd), f"missing {sorted(set(sd) - set(mine))[:10]}, extra {sorted(set(mine) - set(sd))[:10]}"
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    ref_count = sum(p.numel() for p in ref.parameters())
    assert vafunc.count_params(params) == ref_count == model.metadata["params"]
    # the split into params/state is the reference's split into parameters/buffers
    assert set(vafunc.flatten(params)) == {k for k, _ in ref.named_parameters()}


def _same_as_apply(compat, a, b, what):
    """A torch_compat module's output is the pure apply's, bit for bit: the same ops run through
    the modules. torch's ``nn.MultiheadAttention`` (ViT) computes attention its own way, so where
    the tree holds one the two agree to float rounding."""
    if any(isinstance(mod, torch.nn.MultiheadAttention) for mod in compat.modules()):
        _close(a.detach(), b.detach(), 1e-5, what)
    else:
        assert torch.equal(a, b), what


def _check_eval(name, model, ref, params, state, size):
    b, h, w = size
    x = torch.randn(b, 3, h, w)
    with torch.no_grad():
        want = main_logits(ref(x))
        got, new_state = model.apply(params, state, x)
    got = main_logits(got)  # a segmentation model's dict: its "out"
    assert new_state is state
    assert got.shape == want.shape
    # the torch_compat module over the same tensors runs the same ops through its modules
    compat = torch_compat.from_model(model, params, state).eval()
    with torch.no_grad():
        _same_as_apply(compat, main_logits(compat(x)), got, f"{name}: torch_compat module vs apply")
    # the comparison means something only if the output depends on the input
    spread = float((want - want.mean(0)).abs().max())
    assert spread > 1e-3 * float(want.abs().max()), f"{name}: reference output ignores its input"
    _close(got, want, 1e-5, f"{name} eval logits at {b}x3x{h}x{w}")


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_eval_matches_reference(pair):
    """At the first (odd, non-square) size, the one the BatchNorm statistics were calibrated at."""
    name, model, ref, sd, params, state = _pair(pair)
    ref.eval()
    _check_eval(name, model, ref, params, state, sizes_for(model)[0])


@pytest.mark.parametrize("pair", HEAVY, indirect=True)
def test_eval_matches_reference_at_more_sizes(pair):
    name, model, ref, sd, params, state = _pair(pair)
    ref.eval()
    for size in sizes_for(model)[1:]:
        _check_eval(name, model, ref, params, state, size)


@pytest.mark.parametrize("pair", HEAVY, indirect=True)
def test_train_matches_reference(pair):
    name, _, ref, sd, params, state = _pair(pair)
    entry = vafunc.get_entry(name)
    model = vafunc.get_model(name, **deterministic_overrides(name))
    ref = deterministic_reference(ref)
    ref.load_state_dict(sd)
    ref.train()
    (b, h, w), kw, ref_outputs, outputs = _train_call(entry, sizes_for(model)[0])
    x = torch.randn(b, 3, h, w)
    state_before = vafunc.tree_map(lambda t: t.clone(), state)
    try:
        with torch.no_grad():
            want = ref_outputs(ref(x))
        got, new_state = model.apply(params, state, x, train=True, **kw)
        got = outputs(got)
        assert list(got) == list(want)
        for k in want:
            _close(got[k].detach(), want[k], 1e-5, f"{name} train {k}")
        ref_buffers = dict(ref.named_buffers())
        flat_new = vafunc.flatten(new_state)
        assert set(flat_new) == set(ref_buffers)
        for k, v in flat_new.items():
            if k.endswith("num_batches_tracked"):
                assert int(v) == int(ref_buffers[k]), k
            else:
                _close(v, ref_buffers[k], 1e-5, f"{name} updated buffer {k}")
        # the caller's state was not touched
        for k, v in vafunc.flatten(state).items():
            assert torch.equal(v, vafunc.flatten(state_before)[k]), f"apply mutated input state {k}"
        # the torch_compat module (on copies: its BatchNorms update their buffers in place)
        compat = torch_compat.from_model(model, params, state_before).train()
        with torch.no_grad():  # as apply's tensors (no gradient: some kernels differ with one)
            mine = outputs(compat(x, **kw))
        for k in want:
            _same_as_apply(compat, mine[k], got[k], f"{name}: torch_compat train {k} vs apply")
        buffers = dict(compat.named_buffers())
        for k, v in flat_new.items():
            assert torch.equal(buffers[k], v), f"{name}: torch_compat buffer {k} != apply"
    finally:
        ref.load_state_dict(sd)
        ref.eval()


@pytest.mark.parametrize("pair", HEAVY_GRAD, indirect=True)
def test_gradients_match_reference(pair):
    # -m slow: the reference's own init conditions the comparison (_pair(name) is that for OWN_INIT)
    name, _, ref, sd, params, state = _pair(pair, True)
    entry = vafunc.get_entry(name)
    model = vafunc.get_model(name, **deterministic_overrides(name))
    ref = deterministic_reference(ref)
    ref.load_state_dict(sd)
    ref.train()
    (b, h, w), kw, ref_outputs, outputs = _train_call(entry, sizes_for(model)[1])
    x = torch.randn(b, 3, h, w)
    try:
        out = ref_outputs(ref(x))
        weights = {k: torch.randn(v.shape) for k, v in out.items()}
        ref.zero_grad()
        sum((out[k] * weights[k]).sum() for k in out).backward()
        want = {k: p.grad for k, p in ref.named_parameters()}

        def loss(p):
            o = outputs(model.apply(p, state, x, train=True, **kw)[0])
            return sum((o[k] * weights[k]).sum() for k in weights)

        got = vafunc.flatten(grad(loss)(params))
        assert set(got) == set(want)
        assert all(want[k] is not None for k in got), "reference has no gradient for some parameters"
        # Parameters whose exact gradient is 0 (a BatchNorm bias before a BatchNorm) hold only
        # rounding noise on both sides; a floor at 1e-3 of the largest gradient keeps the
        # comparison relative for all the others.
        floor = 1e-3 * max(float(v.abs().max()) for v in want.values())
        rel = GRAD_RTOL.get(name, 1e-4)
        for k, g in got.items():
            _close(g, want[k], rel, f"{name} gradient of {k}", floor=floor)
    finally:
        ref.load_state_dict(sd)
        ref.eval()


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_state_dict_round_trip_is_exact(pair):
    name, model, ref, sd, params, state = _pair(pair, "any")  # either init: no rebuild after the gradient check
    back = vafunc.to_state_dict(params, state)
    assert list(back) == list(sd), "to_state_dict order differs from the reference state_dict"
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


# --------------------------------------------------------------------------- the meta path


@pytest.mark.parametrize("name", MODELS)
def test_meta_state_dict_matches_reference(name):
    """Both sides on the meta device (no memory, no init cost): names, shapes, dtypes and key
    order of the state_dict, parameter counts, and the split into parameters / buffers."""
    _require_reference(name)
    model = vafunc.get_model(name)
    params, state = model.init(device="meta")
    mine = vafunc.to_state_dict(params, state)
    ref = build_reference_meta(name)
    theirs = ref.state_dict()
    assert all(t.is_meta for t in theirs.values()), "the reference was not built on the meta device"
    assert list(mine) == list(theirs), (
        f"missing {sorted(set(theirs) - set(mine))[:10]}, extra {sorted(set(mine) - set(theirs))[:10]}"
        if set(mine) != set(theirs)
        else "same names, different key order"
    )
    for k, v in theirs.items():
        assert tuple(mine[k].shape) == tuple(v.shape) and mine[k].dtype == v.dtype, k
    ref_count = sum(p.numel() for p in ref.parameters())
    assert vafunc.count_params(params) == ref_count == model.metadata["params"]
    assert set(vafunc.flatten(params)) == {k for k, _ in ref.named_parameters()}
    assert set(vafunc.flatten(state)) == {k for k, _ in ref.named_buffers()}
    # the torch_compat module tree: the reference's modules, containers and classes
    compat = torch_compat.from_model(model, params, state)
    assert list(compat.state_dict()) == list(theirs)
    problems = module_tree_problems(compat, ref)
    assert not problems, f"{len(problems)} differences from the reference's module tree: {problems[:8]}"


def META_EVAL_CONFIG(model) -> dict:
    """Config overrides of the meta path's one eval: a ViT giant (a reference fixed to its
    ``image_size``) is built on both sides for a 2x2 patch grid instead of 224 (ViT-H/14 at 224:
    167 GFLOPs an image); the weights and the code path are the same but the position embedding."""
    if getattr(model.config, "image_size", None) is not None:
        return {"image_size": 2 * model.size_multiple}
    if model.family.name == "timm_vit":  # timm's ViT giants (1.1B parameters): two of their identical
        return {"depth": 2}  # blocks on both sides, every other tensor and the code path the same
    return {}


#: the big models, plus the smallest model as a canary so the meta path's eval always runs once
META_EVAL = [n for n in MODELS if is_big(n)] + [min(MODELS, key=lambda n: (vafunc.get_entry(n).params, n))]


#: the eval of the largest giants (10-30 s each on 2 cores) runs under -m slow; their meta checks stay
GIANT_EVAL = 250_000_000


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.slow] if vafunc.get_entry(n).params > GIANT_EVAL else [])
        for n in dict.fromkeys(META_EVAL)
    ],
)
def test_meta_path_eval_at_minimum_size(name):
    """The cheap path's one eval: a perturbed, calibrated reference at the minimum oracle size,
    loaded without a copy of its state_dict (a 640M-parameter model costs its weights once)."""
    _require_reference(name)
    torch.manual_seed(1234)
    cfg = META_EVAL_CONFIG(vafunc.get_model(name))
    model = vafunc.get_model(name, **cfg)
    size = min_eval_size(model)
    ref = perturb(build_reference_fast(name, **cfg), seed=7, size=size)
    with torch.no_grad():
        params, state = vafunc.from_state_dict(model, ref.state_dict())
        _check_eval(name, model, ref, params, state, size)


# --------------------------------------------------------------------------- the test-only facts


def test_deterministic_overrides_cover_the_known_rate_fields():
    """The derived overrides switch off every dropout / stochastic-depth field known per model."""
    assert set(KNOWN_RATE_FIELDS) <= set(vafunc.list_models())
    for name, fields in KNOWN_RATE_FIELDS.items():
        derived = deterministic_overrides(name)
        assert set(fields) <= set(derived), (name, fields, derived)


def test_deterministic_overrides_cover_every_rate_field():
    """A family's float fields named like a rate are all switched off; nothing else is touched."""
    import dataclasses

    for name in vafunc.list_models():
        derived = deterministic_overrides(name)
        fields = dataclasses.fields(vafunc.get_entry(name).family.config)
        assert set(derived) <= {f.name for f in fields}, name
        for f in fields:
            if f.name in derived:
                assert "drop" in f.name or "stochastic_depth" in f.name, (name, f.name)


def test_test_only_tables_name_registered_models():
    names = set(vafunc.list_models())
    assert set(ORACLE_SIZES) <= names and set(AUX_OUTPUTS) <= names
    for name, sizes in ORACLE_SIZES.items():
        m = vafunc.get_model(name).min_size
        assert all(len(s) == 3 and min(s[1:]) >= m for s in sizes), (name, sizes)
    for name, aux in AUX_OUTPUTS.items():
        assert getattr(vafunc.get_model(name).config, "aux_logits", False), name


def test_every_family_has_a_representative():
    reps = representatives()
    # the heavier batteries see each family by default
    assert {vafunc.get_entry(p.values[0]).family.name for p in HEAVY if not any(m.name == "slow" for m in p.marks)} >= {
        fam for fam, n in reps.items() if n in MODELS and not is_big(n)
    }
