"""The contract of docs/design.md: init, apply purity, state_dict conversion, errors, registry."""

import pytest
import torch
import torchvision
from oracle import build_reference, perturb

import torch_compat
import vafunc


@pytest.fixture(scope="module")
def r18():
    model = vafunc.get_model("resnet18")
    return model, *model.init(0)


# ------------------------------------------------------------------ init


def test_init_is_deterministic_and_key_or_seed(r18):
    model, params, state = r18
    p2, _ = model.init(vafunc.random.key(0))
    p3, _ = model.init(0)
    for a, b in zip(vafunc.tree.tree_leaves(p2), vafunc.tree.tree_leaves(p3)):
        assert torch.equal(a, b)
    p4, _ = model.init(1)
    assert not torch.equal(p4["conv1"]["weight"], p3["conv1"]["weight"])


def test_init_meta_and_dtype():
    model = vafunc.get_model("resnet50")
    p, s = model.init(device="meta")
    assert all(t.is_meta for t in vafunc.tree.tree_leaves(p))
    assert vafunc.count_params(p) == 25_557_032
    p16, s16 = vafunc.get_model("resnet18").init(0, dtype=torch.float64)
    assert p16["conv1"]["weight"].dtype == torch.float64
    assert s16["bn1"]["running_var"].dtype == torch.float64
    assert s16["bn1"]["num_batches_tracked"].dtype == torch.int64
    with pytest.raises(TypeError, match="floating torch.dtype"):
        model.init(0, dtype=torch.int32)


def test_init_scheme_matches_torchvision_statistics():
    """Per-tensor mean and std of vafunc's init equal torchvision's scheme (kaiming fan_out for
    convs, torch's default Linear init, BN 1/0) within sampling error."""
    torch.manual_seed(0)
    ref = dict(torchvision.models.resnet50().state_dict())
    mine = vafunc.to_state_dict(*vafunc.get_model("resnet50").init(3))
    for k, v in mine.items():
        r = ref[k]
        if not v.is_floating_point() or v.numel() == 1 or float(r.std()) == 0:
            assert torch.equal(v, r), k  # constants: BN weight 1 / bias 0, running stats
            continue
        if v.numel() < 1000:
            continue  # too few samples for a statistical comparison (fc.bias)
        assert abs(float(v.std()) / float(r.std()) - 1) < 0.1, k
        assert abs(float(v.mean()) - float(r.mean())) < 0.1 * float(r.std()), k


def test_zero_init_residual():
    p, _ = vafunc.get_model("resnet50", zero_init_residual=True).init(0)
    assert torch.equal(p["layer1"]["0"]["bn3"]["weight"], torch.zeros(256))
    assert torch.equal(p["layer1"]["0"]["bn1"]["weight"], torch.ones(64))
    p, _ = vafunc.get_model("resnet18", zero_init_residual=True).init(0)
    assert torch.equal(p["layer2"]["1"]["bn2"]["weight"], torch.zeros(128))


# ------------------------------------------------------------------ apply


def test_apply_is_pure_and_train_updates_like_torch(r18):
    model, params, state = r18
    before = {k: v.clone() for k, v in vafunc.to_state_dict(params, state).items()}
    x = torch.randn(4, 3, 40, 40)
    x0 = x.clone()
    _, new = model.apply(params, state, x, train=True)
    for k, v in vafunc.to_state_dict(params, state).items():
        assert torch.equal(v, before[k]), f"apply mutated {k}"
    assert torch.equal(x, x0)
    assert int(new["bn1"]["num_batches_tracked"]) == int(state["bn1"]["num_batches_tracked"]) + 1
    # momentum 0.1 and the unbiased batch variance, as torch.nn.BatchNorm2d
    bn = torch.nn.BatchNorm2d(64).train()
    bn.load_state_dict({**params["bn1"], **state["bn1"]})
    conv = torch.nn.functional.conv2d(x, params["conv1"]["weight"], stride=2, padding=3)
    bn(conv)
    assert torch.allclose(new["bn1"]["running_mean"], bn.running_mean, atol=1e-6)
    assert torch.allclose(new["bn1"]["running_var"], bn.running_var, atol=1e-6)


def test_features_via_taps_match_torchvision_resnet(r18):
    from torchvision.models.feature_extraction import create_feature_extractor

    model, params, state = r18
    ref = torchvision.models.resnet18().eval()
    ref.load_state_dict(vafunc.to_state_dict(params, state))
    names = ["maxpool", "layer1.1", "layer2", "layer4"]
    extractor = create_feature_extractor(ref, names)
    x = torch.randn(2, 3, 64, 48)
    taps = vafunc.core.layers.Taps(names)
    with torch.no_grad():
        logits, _ = model.family.apply(model.config, params, state, x, train=False, taps=taps)
        want = extractor(x)
    assert logits is None  # stopped before the head
    for n in names:
        assert torch.equal(taps.got[n], want[n]), n


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "x, exc, msg",
    [
        (torch.randn(2, 4, 32, 32), ValueError, "expects 3 input channels, got 4"),
        (torch.randn(3, 32, 32), ValueError, r"4-D batch \[N, C, H, W\], got a 3-D"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point.*uint8"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_errors(r18, x, exc, msg):
    model, params, state = r18
    with pytest.raises(exc, match=msg):
        model.apply(params, state, x)


def test_input_on_another_device_names_both(r18):
    model, params, state = r18
    mp, ms = model.init(0, device="meta")
    with pytest.raises(ValueError, match="input is on cpu but the parameters are on meta"):
        model.apply(mp, ms, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="input is on meta but the parameters are on cpu"):
        model.apply(params, state, torch.randn(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="input is on meta but the parameters are on cpu"):
        model.features(params, state, torch.randn(1, 3, 32, 32, device="meta"), "layer1")
    y, _ = model.apply(mp, ms, torch.randn(1, 3, 32, 32, device="meta"))  # same device: fine
    assert y.shape == (1, 1000) and y.is_meta


def test_too_small_image_names_the_minimum():
    model = vafunc.get_model("resnet18")  # ResNet accepts 1x1; the check itself:
    from vafunc.core.registry import check_image

    with pytest.raises(ValueError, match="at least 75x75, got 60x80"):
        check_image(torch.randn(1, 3, 60, 80), name="inception_v3", in_channels=3, min_size=75)
    assert model.min_size == 1


def test_train_must_be_bool(r18):
    model, params, state = r18
    with pytest.raises(TypeError, match="train must be a bool"):
        model.apply(params, state, torch.randn(1, 3, 8, 8), train="yes")


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean resnet50"):
        vafunc.get_model("resnet5O")
    with pytest.raises(TypeError, match="unknown config keywords \\['num_clases'\\]"):
        vafunc.get_model("resnet18", num_clases=10)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        vafunc.get_model("resnet18", num_classes=0)


def test_state_dict_mismatch_lists_every_problem(r18):
    model, params, state = r18
    flat = vafunc.to_state_dict(params, state)
    del flat["fc.bias"], flat["layer1.0.bn1.running_mean"]
    flat["extra.weight"] = torch.zeros(1)
    flat["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(vafunc.StateDictMismatch) as err:
        vafunc.from_state_dict(model, flat)
    msg = str(err.value)
    for piece in [
        "missing keys (2)",
        "fc.bias",
        "layer1.0.bn1.running_mean",
        "unexpected keys (1): extra.weight",
        "conv1.weight (checkpoint [64, 3, 3, 3], model [64, 3, 7, 7])",
    ]:
        assert piece in msg
    with pytest.raises(TypeError, match="mapping"):
        vafunc.from_state_dict(model, [1, 2])


def test_from_state_dict_non_strict_ignores_only_extras(r18):
    model, params, state = r18
    flat = vafunc.to_state_dict(params, state)
    p, s = vafunc.from_state_dict(model, {**flat, "junk": torch.zeros(1)}, strict=False)
    assert vafunc.count_params(p) == vafunc.count_params(params)
    flat.pop("fc.weight")
    with pytest.raises(vafunc.StateDictMismatch, match="fc.weight"):
        vafunc.from_state_dict(model, flat, strict=False)


# ------------------------------------------------------------------ tree helpers


def test_tree_stack_unstack_round_trip(r18):
    model, params, state = r18
    p1, _ = model.init(1)
    stacked = vafunc.stack([params, p1])
    assert stacked["conv1"]["weight"].shape == (2, 64, 3, 7, 7)
    back = vafunc.unstack(stacked)
    assert torch.equal(back[1]["fc"]["bias"], p1["fc"]["bias"])
    assert vafunc.unflatten(vafunc.flatten(params)).keys() == params.keys()
    with pytest.raises(ValueError, match="differs from tree 0"):
        vafunc.stack([params, {"x": torch.zeros(1)}])


# ------------------------------------------------------------------ torch_compat


def test_compat_loads_torchvision_strict_and_matches_in_train_mode():
    torch.manual_seed(0)
    tv = perturb(build_reference("resnet18"), seed=3)
    m = torch_compat.create("resnet18")
    assert list(m.state_dict()) == list(tv.state_dict())
    m.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(3, 3, 48, 40)
    m.eval(), tv.eval()
    with torch.no_grad():
        assert torch.equal(m(x), tv(x))
    m.train(), tv.train()
    out, want = m(x), tv(x)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    for (k, a), (_, b) in zip(m.state_dict().items(), tv.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    # autograd through the module works like the reference
    out.sum().backward()
    want.sum().backward()
    assert torch.allclose(m.fc.weight.grad, tv.fc.weight.grad, atol=1e-4, rtol=1e-4)
    assert isinstance(m.get_submodule("layer1.0.conv1"), torch.nn.Module)


@pytest.mark.parametrize(
    "name, kw, exc, msg",
    [
        ("alexnet", {"dropout": 1.5}, ValueError, r"dropout must be a number in \[0, 1\], got 1.5"),
        ("efficientnet_b0", {"stochastic_depth_prob": -0.1}, ValueError, "stochastic_depth_prob must be"),
        ("googlenet", {"aux_logits": "yes"}, TypeError, "aux_logits must be a bool"),
        ("densenet121", {"growth_rate": 0}, ValueError, "growth_rate must be a positive int"),
        ("mobilenet_v3_small", {"num_classes": True}, ValueError, "num_classes must be a positive int"),
        ("xception", {"in_channels": 2.0}, ValueError, "in_channels must be a positive int"),
    ],
)
def test_bad_config_values_name_the_field(name, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        vafunc.get_model(name, **kw)


# ------------------------------------------------------------------ host memory

_REUSE_PROBE = """
import resource, torch, vafunc
print(vafunc.serving.memory.set_malloc_thresholds() if {apply} else 'default')
faults = []
for _ in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16, 512, 512, 3, 3).fill_(1.0)     # 151 MB, allocated and freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(faults[0], min(faults[1:]))
"""


@pytest.mark.slow  # 7 s of large allocations: the default suite's budget
@pytest.mark.skipif(not vafunc.serving.memory._LIBC, reason="glibc only (mallopt)")
def test_set_malloc_thresholds_reuses_large_buffers():
    """With the thresholds set, a large buffer freed and allocated again is served from pages that
    are already resident: the repeats fault in a small share of what the first allocation did
    (glibc's defaults map and fault it in afresh every time)."""
    import subprocess
    import sys

    out = {}
    for apply in (False, True):
        r = subprocess.run(
            [sys.executable, "-c", _REUSE_PROBE.format(apply=apply)], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        head, counts = r.stdout.split("\n")[:2]
        out[apply] = (head, *map(int, counts.split()))
    pages = 16 * 512 * 512 * 9 * 4 // 4096
    assert out[True][0] == "True"
    assert out[False][2] > pages // 2  # the default: every allocation faults afresh
    assert out[True][2] < pages // 10  # reused: resident pages


def test_set_malloc_thresholds_rejects_bad_values():
    with pytest.raises(TypeError, match="mmap_threshold must be an int"):
        vafunc.serving.memory.set_malloc_thresholds(1.5)
    with pytest.raises(TypeError, match="trim_threshold must be an int"):
        vafunc.serving.memory.set_malloc_thresholds(1 << 20, True)
    with pytest.raises(ValueError, match=r"mmap_threshold must be in 1\.\.2147483647 bytes .* got 4294967296"):
        vafunc.serving.memory.set_malloc_thresholds(1 << 32)
    with pytest.raises(ValueError, match="trim_threshold must be in"):
        vafunc.serving.memory.set_malloc_thresholds(1 << 20, 0)


@pytest.mark.parametrize("chunk", [1, 3 * 6 * 9 * 11 * 4, 1 << 30], ids=["per-sample", "3-samples", "whole"])
@pytest.mark.parametrize(
    "k,s,p,d,ceil", [(3, 2, 1, 1, False), (3, 2, 0, 1, True), (2, 2, 0, 1, False), (3, 1, 1, 2, True)]
)
def test_max_pool_in_channels_last_chunks_is_torchs_pool(monkeypatch, chunk, k, s, p, d, ceil):
    """layers.max_pool2d pools a contiguous NCHW input in channels_last, POOL_CHUNK_BYTES of it at
    a time, into an NCHW output: bit-equal to F.max_pool2d (a maximum is exact), also with a last
    chunk shorter than the others, under torch.vmap, and on the recorded path with a gradient."""
    import torch.nn.functional as F

    from vafunc.core import layers as L

    monkeypatch.setattr(L, "POOL_CHUNK_BYTES", chunk)
    x = torch.randn(5, 6, 9, 11)
    want = F.max_pool2d(x, k, s, p, d, ceil)
    got = L.max_pool2d(x, k, s, p, ceil_mode=ceil, dilation=d)
    assert got.is_contiguous() and torch.equal(got, want)
    xs = torch.randn(2, 5, 6, 9, 11)
    got = torch.vmap(lambda t: L.max_pool2d(t, k, s, p, ceil_mode=ceil, dilation=d))(xs)
    assert torch.equal(got, torch.stack([F.max_pool2d(t, k, s, p, d, ceil) for t in xs]))
    xg = x.clone().requires_grad_()
    L.max_pool2d(xg, k, s, p, ceil_mode=ceil, dilation=d).sum().backward()
    xr = x.clone().requires_grad_()
    F.max_pool2d(xr, k, s, p, d, ceil).sum().backward()
    assert torch.equal(xg.grad, xr.grad)


# ------------------------------------------------------------------ layers


def test_layers_conv2d_and_linear_are_torchs():
    from vafunc.core import layers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 11, generator=g)
    w, b = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, generator=g)
    got = layers.conv2d({"weight": w, "bias": b}, x, stride=2, padding=1, dilation=1, groups=2)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, b, 2, 1, 1, 2))
    got = layers.conv2d({"weight": w[:, :1].repeat(1, 4, 1, 1)}, x, padding="same")
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w[:, :1].repeat(1, 4, 1, 1), None, padding="same"))
    v = torch.randn(3, 5, 7, generator=g)
    lw, lb = torch.randn(4, 7, generator=g), torch.randn(4, generator=g)
    torch.testing.assert_close(layers.linear({"weight": lw, "bias": lb}, v), torch.nn.functional.linear(v, lw, lb))
    torch.testing.assert_close(layers.linear({"weight": lw}, v), v @ lw.T)


def test_size_multiple_is_the_lcm_of_the_declared_multiples():
    from vafunc.core.registry import Family
    from vafunc.core.sizes import min_size, size_multiple

    def probe(cfg, ini, size=None, sizes=None):
        if sizes is not None:  # a patch of 4 and a window of 6: sides must be multiples of 12
            sizes.extend([4, 6])
        elif size % 12:
            raise ValueError(f"{size} is not a multiple of 12")

    fam = Family(name="_lcm_probe", config=tuple, init=None, apply=None, min_size=None, probe=probe)
    assert size_multiple(fam, ()) == 12
    assert min_size(fam, ()) == 12
