"""The oracle harness: every registered model with a reference implementation is compared with
it, registry-driven (a new family only registers a Reference).

Reference built with random init, every weight and BN statistic perturbed (oracle.perturb), loaded
through vafunc.from_state_dict, then: state_dict names and shapes; parameter counts against the
registry and the oracle; eval outputs at odd, non-square sizes; train-mode outputs and running
statistics; gradients of a scalar loss for every parameter; the state_dict round trip.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.func import grad

import vafunc
from oracle import build_reference, has_reference, main_logits, perturb, test_sizes as sizes_for

MODELS = [n for n in vafunc.list_models() if vafunc.get_entry(n).reference is not None]


def _deterministic(ref: torch.nn.Module) -> torch.nn.Module:
    """Switch off the reference's dropout and stochastic depth (vafunc gets the entry's
    ``deterministic_train`` overrides), so train mode can be compared value for value."""
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif type(m).__name__ in {"StochasticDepth", "DropPath"}:
            for attr in ("p", "drop_prob"):
                if hasattr(m, attr):
                    setattr(m, attr, 0.0)
    return ref


def _train_call(entry, model, ref, size):
    """Train-mode call conventions for models with auxiliary heads (entry.extra["aux_outputs"]:
    pairs (vafunc output name, reference namedtuple field)): vafunc is asked for them with
    aux=True and every output is compared; inputs grow to entry.extra["aux_min_size"]."""
    extra = dict(entry.extra)
    aux = dict(extra.get("aux_outputs", ()))
    m = extra.get("aux_min_size", 0)
    b, h, w = size
    kw = {"aux": True} if aux else {}

    def ref_outputs(out):
        return {"logits": main_logits(out), **{k: getattr(out, f) for k, f in aux.items()}}

    def outputs(out):
        return out if aux else {"logits": out}

    return (b, max(h, m), max(w, m)), kw, ref_outputs, outputs


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in MODELS])
def pair(request):
    name = request.param
    if not has_reference(name):  # a missing oracle is a broken test environment, not a pass
        pytest.fail(f"the oracle package for {name} is not installed (pip install -e '.[test]')")
    torch.manual_seed(1234)
    model = vafunc.get_model(name)
    ref = perturb(build_reference(name), seed=7, size=sizes_for(model)[0])
    live = ref.state_dict()
    sd = collections.OrderedDict((k, v.detach().clone()) for k, v in live.items())
    sd._metadata = live._metadata  # torchvision's MNASNet refuses a state_dict without versions
    params, state = vafunc.from_state_dict(model, sd)
    return name, model, ref, sd, params, state


def _close(a, b, rel, what, floor=1e-6):
    scale = max(float(b.abs().max()), floor)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"


def test_state_dict_names_shapes_and_counts(pair):
    name, model, ref, sd, params, state = pair
    mine = vafunc.to_state_dict(*model.init(device="meta"))
    assert set(mine) == set(sd), (
        f"missing {sorted(set(sd) - set(mine))[:10]}, extra {sorted(set(mine) - set(sd))[:10]}"
    )
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    ref_count = sum(p.numel() for p in ref.parameters())
    assert vafunc.count_params(params) == ref_count == model.metadata["params"]
    # the split into params/state is the reference's split into parameters/buffers
    assert set(vafunc.flatten(params)) == {k for k, _ in ref.named_parameters()}


def test_eval_matches_reference(pair):
    name, model, ref, sd, params, state = pair
    ref.eval()
    for b, h, w in sizes_for(model):
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = main_logits(ref(x))
            got, new_state = model.apply(params, state, x)
        assert new_state is state
        assert got.shape == want.shape
        # the comparison means something only if the output depends on the input
        spread = float((want - want.mean(0)).abs().max())
        assert spread > 1e-3 * float(want.abs().max()), f"{name}: reference output ignores its input"
        _close(got, want, 1e-5, f"{name} eval logits at {b}x3x{h}x{w}")


def test_train_matches_reference(pair):
    name, _, ref, sd, params, state = pair
    entry = vafunc.get_entry(name)
    model = vafunc.get_model(name, **dict(entry.deterministic_train))
    ref = _deterministic(ref)
    ref.load_state_dict(sd)
    ref.train()
    (b, h, w), kw, ref_outputs, outputs = _train_call(entry, model, ref, sizes_for(model)[0])
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
    finally:
        ref.load_state_dict(sd)
        ref.eval()


def test_gradients_match_reference(pair):
    name, _, ref, sd, params, state = pair
    entry = vafunc.get_entry(name)
    model = vafunc.get_model(name, **dict(entry.deterministic_train))
    ref = _deterministic(ref)
    ref.load_state_dict(sd)
    ref.train()
    (b, h, w), kw, ref_outputs, outputs = _train_call(entry, model, ref, sizes_for(model)[1])
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
        for k, g in got.items():
            _close(g, want[k], 1e-4, f"{name} gradient of {k}", floor=floor)
    finally:
        ref.load_state_dict(sd)
        ref.eval()


def test_state_dict_round_trip_is_exact(pair):
    name, model, ref, sd, params, state = pair
    back = vafunc.to_state_dict(params, state)
    assert list(back) == list(sd), "to_state_dict order differs from the reference state_dict"
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
