"""The oracle side of the tests: build the reference implementation of a registered model and
give it non-trivial weights. Test-only (torchvision / timm / pretrainedmodels are test extras)."""

from __future__ import annotations

import importlib

import torch

import vafunc


def has_reference(name: str) -> bool:
    ref = vafunc.get_entry(name).reference
    if ref is None:
        return False
    mod = {"torchvision": "torchvision", "timm": "timm", "pretrainedmodels": "pretrainedmodels"}[ref.source]
    try:
        importlib.import_module(mod)
    except ImportError:
        return False
    return True


def build_reference(name: str, **config) -> torch.nn.Module:
    """The reference module for ``name`` with the same config keywords, random init, eval mode."""
    ref = vafunc.get_entry(name).reference
    if ref is None:
        raise LookupError(f"{name} has no reference implementation")
    kwargs = {**dict(ref.kwargs), **config}
    if ref.source == "torchvision":
        import torchvision

        builder = getattr(torchvision.models, ref.builder)
        module = builder(**kwargs)
    elif ref.source == "timm":
        import timm
        module = timm.create_model(ref.builder, pretrained=False, **kwargs)
    elif ref.source == "pretrainedmodels":
        import pretrainedmodels as pm
        module = getattr(pm, ref.builder)(pretrained=None, **kwargs)
    else:  # pragma: no cover - registry entries are validated by test_registry
        raise LookupError(f"unknown reference source {ref.source!r}")
    return module.eval()


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0, size: tuple[int, int, int] | None = None):
    """Move every parameter and BatchNorm statistic away from its init values.

    Default init makes BN weights 1, biases 0 and running stats 0/1 (and zero_init_residual
    zeros), so an equality test over it can pass by accident. Weights get multiplicative noise,
    1-D parameters additive noise; then (``size`` = (batch, H, W) of a calibration batch) every
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
        elif t.dim() <= 1:
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
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


def main_logits(out):
    """Reference outputs that are namedtuples (GoogLeNet/Inception train mode) -> main logits."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return out["logits"]
    raise TypeError(f"cannot read logits from {type(out).__name__}")


def test_sizes(model) -> list[tuple[int, int, int]]:
    """(batch, H, W): small, odd and non-square, all at or above the model's minimum."""
    fixed = dict(vafunc.get_entry(model.name).extra).get("oracle_sizes")
    if fixed is not None:  # references that run only at some sizes (a fixed-size head)
        return [tuple(int(v) for v in size) for size in fixed]
    m = max(model.min_size, 32)
    return [(2, m + 7, m + 20), (3, m, m)]
