"""The oracle side of the tests: build the reference implementation of a registered model and
give it non-trivial weights. Test-only (torchvision / timm / pretrainedmodels are test extras)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re

import pytest
import torch

import vafunc

# --------------------------------------------------------------------------- test-only facts

#: (batch, H, W) of the oracle comparisons for references that run only at some sizes (a
#: fixed-size head): the reference's 7x7 average pool + flatten runs at 223..230 only.
ORACLE_SIZES = {
    "inception_v2": ((2, 223, 230), (3, 224, 224)),
    # torchvision's MaxViT runs at its build size only (square: its grid partition reads H);
    # timm's CoAtNets at img_size only (relative position biases over the whole map)
    **{n: ((2, 224, 224), (3, 224, 224)) for n in ("maxvit_t", "coatnet_0_224", "coatnet_0_rw_224")},
}

#: pytorchcv's Residual Attention Networks end in AvgPool2d(7) (a 7x7 map: inputs of 221..224 only); the
#: oracle gets the global pool vafunc has, equal to it at 224 (tests/test_resattnet.py checks that on the
#: unmodified network), and runs wherever its mask branch halves exactly: stage-1 maps divisible by 8
PYTORCHCV_GLOBAL_POOL = ("resattnet56", "resattnet92")
ORACLE_SIZES.update({n: ((2, 64, 61), (3, 32, 32)) for n in PYTORCHCV_GLOBAL_POOL})

#: Auxiliary outputs compared in train mode: model -> ((vafunc output name, reference namedtuple
#: field), ...); vafunc is asked for them with ``aux=True`` (inputs grow to
#: ``entry.extra["aux_min_size"]``, a user-visible fact).
AUX_OUTPUTS = {
    "googlenet": (("aux1", "aux_logits1"), ("aux2", "aux_logits2")),
    "inception_v3": (("aux", "aux_logits"),),
}

#: Config fields that are rates of randomness in train mode: dropout, drop path, stochastic depth.
_RATE_FIELD = re.compile(r"drop|stochastic_depth")


def _is_rate(f: dataclasses.Field) -> bool:
    default = f.default
    if isinstance(default, bool):
        return False
    return bool(_RATE_FIELD.search(f.name)) and (isinstance(default, float) or "float" in str(f.type))


def deterministic_overrides(name: str) -> dict[str, float]:
    """Config overrides that switch off dropout and stochastic depth, so train mode can be compared
    to the (equally switched-off) reference value for value: every float config field of the
    family named like a dropout / drop-path / stochastic-depth rate, set to 0."""
    config = vafunc.get_entry(name).family.config
    return {f.name: 0.0 for f in dataclasses.fields(config) if _is_rate(f)}


def deterministic_reference(ref: torch.nn.Module) -> torch.nn.Module:
    """Switch off the reference's dropout and stochastic depth (vafunc gets
    oracle.deterministic_overrides), so train mode can be compared value for value."""
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif type(m).__name__ in {"StochasticDepth", "DropPath"}:
            for attr in ("p", "drop_prob"):
                if hasattr(m, attr):
                    setattr(m, attr, 0.0)
    return ref


# --------------------------------------------------------------------------- which models run what

#: family -> its representative in the heavier batteries, where the family's smallest model (by
#: parameter count, the default pick) misses a feature of the family.
REPRESENTATIVE_OVERRIDES = {
    "vgg": "vgg11_bn",  # vgg11 has no BatchNorm: train-mode statistics would go unchecked
    "vit": "vit_b_32",  # vit_b_16 has fewer parameters but 4x the tokens (17.6 vs 4.4 GFLOPs)
}

#: Models with more parameters than this take the cheap oracle path by default (names, shapes,
#: key order and counts on the meta device, one eval at the minimum size); the full harness runs
#: on them under ``-m slow``.
META_THRESHOLD = 150_000_000


def representatives() -> dict[str, str]:
    """family name -> the model that stands for it in the heavier batteries of the default suite
    (train mode, gradients, more sizes, properties, ensembles, transforms, features): the
    override if the family has one, else its smallest registered model (ties: by name)."""
    smallest: dict[str, tuple[int, str]] = {}
    for name in vafunc.list_models():
        entry = vafunc.get_entry(name)
        fam = entry.family.name
        smallest[fam] = min(smallest.get(fam, (entry.params, name)), (entry.params, name))
    reps = {fam: name for fam, (_, name) in sorted(smallest.items())}
    for fam, name in REPRESENTATIVE_OVERRIDES.items():
        if fam in reps:  # a family that is not registered (yet) has no representative
            assert vafunc.get_entry(name).family.name == fam, (name, fam)
            reps[fam] = name
    return reps


def heavy_params(names, also=(), group=None) -> list:
    """``names`` as pytest parameters for a heavier battery: the family representatives (and the
    models in ``also``) run by default, the others under ``-m slow``; so do models above
    META_THRESHOLD, representatives or not. ``group(name)``: an xdist group for the model's
    parameter (``--dist loadgroup`` keeps a group on one worker, so a module-scoped fixture of
    the model is built once)."""
    default = set(representatives().values()) | set(also)
    out = []
    for n in names:
        marks = [pytest.mark.xdist_group(group(n))] if group is not None else []
        if n not in default or is_big(n):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(n, marks=marks, id=n))
    return out


def is_big(name: str) -> bool:
    """Whether the default suite checks ``name`` on the cheap meta path (see META_THRESHOLD)."""
    return vafunc.get_entry(name).params > META_THRESHOLD


def has_reference(name: str) -> bool:
    ref = vafunc.get_entry(name).reference
    if ref is None:
        return False
    mod = {
        "torchvision": "torchvision",
        "timm": "timm",
        "pretrainedmodels": "pretrainedmodels",
        "pytorchcv": "pytorchcv",
        "monai": "monai",
    }[ref.source]
    try:
        importlib.import_module(mod)
    except ImportError:
        return False
    return True


def convnext(block_setting, **kwargs) -> torch.nn.Module:
    """torchvision's ``ConvNeXt`` class from plain data: ``block_setting`` as
    ``(input_channels, out_channels, num_layers)`` triples (the class wants ``CNBlockConfig``
    objects, which a registry ``Reference`` does not hold)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(*s) for s in block_setting], **kwargs)


#: torchvision classes whose arguments are objects: ``Reference.builder`` -> a builder of plain data
TORCHVISION_CLASSES = {"ConvNeXt": convnext}


def timm_block_args(block_args) -> dict:
    """timm ResNet's ``block_args`` from a registry ``Reference``'s plain data: ``(key, value)``
    pairs, where an ``attn_layer`` given as ``(name, ((key, value), ...))`` is timm's attention
    class ``name`` with those keywords (``functools.partial``; cbam_resnet50's ``mlp_bias=True``),
    which the registry cannot hold without importing timm."""
    import functools

    from timm.layers import get_attn

    out = dict(block_args)
    attn = out.get("attn_layer")
    if isinstance(attn, tuple):
        out["attn_layer"] = functools.partial(get_attn(attn[0]), **dict(attn[1]))
    return out


def build_reference(name: str, **config) -> torch.nn.Module:
    """The reference module for ``name`` with the same config keywords, random init, eval mode."""
    ref = vafunc.get_entry(name).reference
    if ref is None:
        raise LookupError(f"{name} has no reference implementation")
    kwargs = {**dict(ref.kwargs), **config}
    if ref.source == "torchvision":
        import torchvision

        builder = (
            TORCHVISION_CLASSES.get(ref.builder)
            or getattr(torchvision.models, ref.builder, None)
            or getattr(torchvision.models.segmentation, ref.builder)
        )
        module = builder(**kwargs)
    elif ref.source == "timm":
        import timm

        if isinstance(kwargs.get("block_args"), tuple):
            kwargs["block_args"] = timm_block_args(kwargs["block_args"])
        module = timm.create_model(ref.builder, pretrained=False, **kwargs)
        # timm's index tables (CoAtNet), rotary frequencies and zero key biases (EVA-02) are
        # non-persistent buffers: not state
        if ref.builder.startswith(("coatnet", "eva02")):
            for mod in module.modules():
                for b in list(getattr(mod, "_non_persistent_buffers_set", ())):
                    t = mod._buffers.pop(b)
                    mod._non_persistent_buffers_set.discard(b)
                    if t is not None and t.is_meta:  # a meta build: the data (to_empty would not fill an attribute)
                        if b == "bands":  # RotaryEmbeddingCat's frequencies
                            with torch.device("cpu"):
                                t = mod._compute_bands()
                        elif b == "k_bias":  # EvaAttention's zero key bias
                            t = torch.zeros(t.shape, dtype=t.dtype, device="cpu")
                        else:
                            from timm.layers.pos_embed_rel import gen_relative_position_index

                            t = gen_relative_position_index(mod.window_size, device="cpu").view(-1)
                    object.__setattr__(mod, b, t)
    elif ref.source == "pretrainedmodels":
        import pretrainedmodels as pm

        module = getattr(pm, ref.builder)(pretrained=None, **kwargs)
    elif ref.source == "pytorchcv":
        from pytorchcv.model_provider import get_model

        module = get_model(ref.builder, pretrained=False, **kwargs)
        if name in PYTORCHCV_GLOBAL_POOL:
            module.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
    elif ref.source == "monai":
        import monai.networks.nets as nets

        module = getattr(nets, ref.builder)(**kwargs)
    else:  # pragma: no cover - registry entries are validated by test_registry
        raise LookupError(f"unknown reference source {ref.source!r}")
    return module.eval()


_BN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}


@torch.no_grad()
def build_reference_fast(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """``build_reference`` without the reference's own initialisation, which for the large
    models costs more than the test itself (vgg19_bn: seconds of kaiming/normal draws): built on
    the meta device, materialised empty, then filled with variance-preserving normals (BatchNorm
    weights 1, biases and running means 0, running variances 1). The harness perturbs and
    calibrates afterwards, so outputs depend on every tensor either way; the reference's init
    distributions are checked on their own (test_classic_a, test_mobile). Models with other
    buffers (position indices, masks) are built the slow way."""
    meta = build_reference_meta(name, **config)
    if any(n.rsplit(".", 1)[-1] not in _BN_BUFFERS for n, _ in meta.named_buffers()):
        return build_reference(name, **config)
    module = meta.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for n, t in module.state_dict(keep_vars=True).items():
        t = t.data if isinstance(t, torch.nn.Parameter) else t
        leaf = n.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t.zero_()
        elif leaf == "running_var":
            t.fill_(1.0)
        elif t.dim() >= 2:
            t.normal_(0.0, (2.0 / max(1, t[0].numel())) ** 0.5, generator=g)
        elif leaf == "weight":
            t.fill_(1.0)
        else:
            t.zero_()
    return module.eval()


#: tensor names of layer scale (ConvNeXt's ``layer_scale``, timm's ``gamma``), set to O(1) values
LAYER_SCALES = {"layer_scale", "gamma"}


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0, size: tuple[int, int, int] | None = None):
    """Move every parameter and BatchNorm statistic away from its init values.

    Default init makes BN weights 1, biases 0 and running stats 0/1 (and zero_init_residual
    zeros), so an equality test over it can pass by accident. Weights get multiplicative noise,
    1-D parameters additive noise, layer scales O(1) values; then (``size`` = (batch, H, W) of a calibration
    batch) every
    BatchNorm's running statistics are set from the activations it actually sees, layer by layer,
    and jittered. Without calibration, random statistics can make a deep network's eval output
    vanish or stop depending on the input (GoogLeNet: spread 3e-8 across a batch), and an
    equality test over such outputs checks nothing.
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict(keep_vars=True).items():
        t = t.data if isinstance(t, torch.nn.Parameter) else t
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t.fill_(int(torch.randint(1, 1000, (), generator=g)))
        elif not t.is_floating_point():
            continue
        elif leaf == "running_var":
            t.copy_(torch.empty(t.shape).uniform_(0.5, 1.5, generator=g))
        elif leaf == "running_mean":
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif leaf in LAYER_SCALES:  # starts near 1e-6: noise on that scale would leave blocks invisible
            t.copy_(torch.empty(t.shape).uniform_(0.3, 0.7, generator=g))
        elif t.dim() <= 1:
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
        elif not t.any():  # zero-initialised (ViT's head and class token): noise would stay zero
            t.copy_(torch.randn(t.shape, generator=g) * t[0].numel() ** -0.5)
        else:
            t.mul_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
    if size is not None:
        _calibrate(module, size, g)
    return module


@torch.no_grad()
def _calibrate(module: torch.nn.Module, size, g: torch.Generator) -> None:
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return

    def set_stats(bn, args):
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims)
        # the statistics it sees, jittered: non-trivial, but keeping activations at a sane scale
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=g))
        var = var.clamp_min(1e-2 * float(var.mean()) + 1e-6)  # no near-zero variances to amplify noise
        bn.running_var.copy_(var * torch.empty(var.shape).uniform_(0.8, 1.25, generator=g))

    was_training = module.training
    handles = [bn.register_forward_pre_hook(set_stats) for bn in bns]
    try:
        module.eval()
        b, h, w = size
        # a batch of 8 at least: statistics of 2 samples on a 1x1 map describe nothing
        module(torch.randn(max(b, 8), 3, h, w, generator=g))
    finally:
        for hd in handles:
            hd.remove()
        module.train(was_training)


def module_outputs(ref: torch.nn.Module, names, x) -> dict:
    """The output of each named submodule of ``ref`` on ``x`` (a copy taken when the module
    returns, before any later in-place op can change it): what a feature name means."""
    out, handles = {}, []
    for n in names:

        def hook(module, args, y, n=n):
            out[n] = y.detach().clone()

        handles.append(ref.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            ref(x)
    finally:
        for h in handles:
            h.remove()
    return out


def build_reference_meta(name: str, **config) -> torch.nn.Module:
    """``build_reference`` on the meta device: names and shapes without memory or init cost.

    Under torch's ``torch.device("meta")`` context; builders that compute their layout with
    tensors (torchvision's RegNet widths, read back with ``.tolist()``) cannot run there, and are
    built with each parameter and buffer moved to the meta device as it is registered instead
    (their arithmetic stays on the CPU, their weights are never initialised in memory)."""
    try:
        with torch.device("meta"):
            return build_reference(name, **config)
    except NotImplementedError:  # "Cannot copy out of meta tensor": data-dependent construction
        with _registered_on_meta():
            return build_reference(name, **config)


@contextlib.contextmanager
def _registered_on_meta():
    Module = torch.nn.Module
    register_parameter, register_buffer = Module.register_parameter, Module.register_buffer

    def on_meta_parameter(self, name, param):
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def on_meta_buffer(self, name, tensor, persistent=True):
        if tensor is not None and not tensor.is_meta:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    Module.register_parameter, Module.register_buffer = on_meta_parameter, on_meta_buffer
    try:
        yield
    finally:
        Module.register_parameter, Module.register_buffer = register_parameter, register_buffer


def main_logits(out):
    """Reference outputs that are namedtuples (GoogLeNet/Inception train mode) -> main logits."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):  # torchvision's segmentation models: {"out", "aux"}
        return out["out"] if "out" in out else out["logits"]
    raise TypeError(f"cannot read logits from {type(out).__name__}")


def classes_config(name: str, n: int) -> dict:
    """The config keyword that sets ``name``'s number of classes to ``n``: ``num_classes``, or the
    reference builder's own name for it (MONAI's ``out_channels``)."""
    fields = {f.name for f in dataclasses.fields(vafunc.get_entry(name).family.config)}
    return {"num_classes" if "num_classes" in fields else "out_channels": n}


def logits_shape(model, b: int, h: int, w: int, classes: int) -> tuple:
    """The shape of ``model``'s logits for a ``[b, C, h, w]`` batch: ``(b, classes)`` for a classifier,
    per-pixel ``(b, classes, h, w)`` for a segmentation model (the unpadded U-Net: its centre map)."""
    if vafunc.get_entry(model.name).task == "classification":
        return (b, classes)
    if getattr(model.config, "padding", None) == "valid":
        from vafunc.models.unet import output_size

        n = len(model.config.widths)
        return (b, classes, output_size(h, n), output_size(w, n))
    return (b, classes, h, w)


def fit(model, s: int) -> int:
    """The smallest valid input side of ``model`` that is at least ``s`` (at least the minimum
    size, rounded up to the size multiple: a patch or window size), capped at a maximum (CoAtNet)."""
    k = model.size_multiple
    s = -(-max(int(s), model.min_size) // k) * k
    return s if model.max_size is None else min(s, model.max_size)


def sizes_to_test(model) -> list[tuple[int, int, int]]:
    """(batch, H, W): small, odd and non-square, all at or above the model's minimum."""
    fixed = ORACLE_SIZES.get(model.name)
    if fixed is not None:  # references that run only at some sizes (a fixed-size head)
        return [tuple(int(v) for v in size) for size in fixed]
    fixed_size = getattr(model.config, "image_size", None)
    if fixed_size is not None:  # the reference runs at the size it was built for (ViT)
        return [(2, fixed_size, fixed_size), (3, fixed_size, fixed_size)]
    k = model.size_multiple
    m = -(-max(model.min_size, 32) // k) * k
    if k > 1:  # sizes divisible by k (patch embeddings, window partitions), one non-square
        return [(2, m, m + k), (3, m, m)]
    return [(2, m + 7, m + 20), (3, m, m)]


def min_eval_size(model) -> tuple[int, int, int]:
    """(batch, H, W) of the meta path's one eval: the smallest oracle size of the model."""
    fixed = ORACLE_SIZES.get(model.name)
    if fixed is not None:
        return min((tuple(int(v) for v in s) for s in fixed), key=lambda s: (s[1] * s[2], s))
    if getattr(model.config, "image_size", None) is None and model.size_multiple == 1:
        m = max(model.min_size, 32)
        return (2, m, m)
    _, h, w = min(sizes_to_test(model), key=lambda s: (s[1] * s[2], s))
    return (2, h, w)  # two samples at least: the check that the output depends on the input needs them


# --------------------------------------------------------------------------- torch_compat trees


def module_tree_problems(compat: torch.nn.Module, ref: torch.nn.Module) -> list[str]:
    """How a torch_compat tree differs from the reference's module tree: every module of the
    reference with its own parameters or buffers, and every ``nn.Sequential``, must exist at the
    same path, with the reference's class where that is torch's own (``nn.Conv2d``,
    ``nn.BatchNorm2d``, ...) and as an ``nn.Sequential`` where the reference has one; and no
    module of the compat tree may be a bare container its forward never calls (its hooks could
    not fire)."""
    from torch import nn

    mine = dict(compat.named_modules())
    problems = []
    for path, r in ref.named_modules():
        if not path:
            continue
        own = next(r.parameters(recurse=False), None) is not None or next(r.buffers(recurse=False), None) is not None
        if not (own or isinstance(r, nn.Sequential)):
            continue
        m = mine.get(path)
        if m is None:
            problems.append(f"missing {path} ({type(r).__name__})")
        elif isinstance(r, nn.Sequential) and not isinstance(m, nn.Sequential):
            problems.append(f"{path}: {type(m).__name__}, the reference has an nn.Sequential")
        elif type(r).__module__.startswith("torch.nn") and not isinstance(m, type(r)):
            problems.append(f"{path}: {type(m).__name__}, the reference has torch's {type(r).__name__}")
    # (a container at the path of the reference's ModuleList/ModuleDict: neither forward is called)
    lists = {p for p, r in ref.named_modules() if isinstance(r, (nn.ModuleList, nn.ModuleDict))}
    problems += [
        f"{p}: a container its forward never calls" for p, m in mine.items() if type(m) is nn.Module and p not in lists
    ]
    return problems


def per_sample_loop(model, params, state, x, y):
    """Per-sample gradients the slow way, the oracle of the per-sample tape: one ``torch.func.grad``
    of the cross-entropy per sample, on a batch of one; a list of flat ``{name: grad}``."""
    outs = []
    for i in range(len(x)):

        def loss(p, i=i):
            return torch.nn.functional.cross_entropy(model.apply(p, state, x[i : i + 1])[0], y[i : i + 1])

        outs.append(vafunc.flatten(torch.func.grad(loss)(params)))
    return outs


def check_tape_against_loop(model, params, state, x, y, *, reached=False, norms_rtol=1e-9):
    """The per-sample tape's gradients and norms (float64) equal :func:`per_sample_loop`'s; with
    ``reached``, every parameter also gets a nonzero gradient (else the comparison could be empty)."""
    from vafunc.research import persample

    loss = torch.nn.functional.cross_entropy
    assert persample.tape_covers(model) and persample.tape_covers(model, "norms")
    got = vafunc.flatten(vafunc.per_sample_grads(model, params, state, x, y, loss, method="tape"))
    want = per_sample_loop(model, params, state, x, y)
    for i, w in enumerate(want):
        assert list(w) == list(got)
        for k, v in w.items():
            if reached:
                assert v.abs().max() > 0, f"{k}: no gradient reaches it (the check would be empty)"
            torch.testing.assert_close(got[k][i], v, rtol=1e-9, atol=1e-12, msg=k)
    norms = vafunc.per_sample_grad_norms(model, params, state, x, y, loss)
    want_norms = torch.stack([torch.cat([t.flatten() for t in w.values()]).norm() for w in want])
    torch.testing.assert_close(norms, want_norms, rtol=norms_rtol, atol=1e-12)


def check_intermediate_shapes(model, params, state, x, ref, cases):
    """``model.intermediates`` returns the shapes timm's ``forward_intermediates(intermediates_only=True)``
    returns on ``ref`` for every ``(indices, keywords)`` case (NLC: timm's NCHW maps as row-major tokens)."""
    for indices, kw in cases:
        with torch.no_grad():
            want = ref.forward_intermediates(x.float(), indices, intermediates_only=True, norm=kw.get("norm", False))
            got = model.intermediates(params, state, x, indices, **kw)
        if kw.get("output_fmt") == "NLC":
            want = [w.flatten(2).transpose(1, 2) for w in want]
        assert [g.shape for g in got] == [w.shape for w in want], (indices, kw)
