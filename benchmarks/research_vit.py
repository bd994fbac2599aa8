"""The research transforms on timm's ViTs (``python -m benchmarks vit``): per-sample gradients and
norms of a small ViT at 32x32 (patch 4) and DeiT-Tiny at 224 against the loop of single-sample
backward passes, one plain batched backward and Opacus' ``GradSampleModule``; ensembles of ViTs,
members mode against the loop. Uses :mod:`benchmarks.research`'s loop baselines; the figures are in
benchmarks/README.md ("ViTs (timm's layouts)")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vafunc
from benchmarks.harness import compare
from benchmarks.research import have_opacus, loop_grads, loop_norms

#: the small ViT of the per-op-bound rows: DeiT-Tiny's widths (192, 12 blocks, 3 heads) on 32x32
#: images in 4x4 patches (64 patch tokens + the class token), 10 classes
SMALL_VIT = ("deit_tiny_patch16_224", dict(patch_size=4, img_size=32))


def _say(pair):
    """Print one measured pair as a markdown row as soon as it is measured (the ViT rows are slow)."""
    print(
        f"| {pair.label} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
        f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |",
        flush=True,
    )
    return pair


def vit_problem(name: str, batch: int, size: int, *, cfg: dict | None = None, seed: int = 0):
    """``(model, params, state, ref, x, y)`` for a timm ViT: the vafunc model with 10 classes and
    timm's module (``timm.create_model(name, **cfg)``, eval mode, no dropout) holding the same
    weights, a batch of ``batch`` images ``size``x``size`` and labels."""
    import timm

    cfg = dict(cfg or {})
    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False, num_classes=10, **cfg).eval()
    model = vafunc.get_model(name, num_classes=10, **cfg)
    params, state = vafunc.from_state_dict(model, {k: v.detach().clone() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, params, state, ref, x, y


def _gsm_grads(ref):
    """Opacus' ``GradSampleModule`` (hooks) on a copy of timm's module: per-sample gradients of
    the summed loss, as ``f(x, y)``."""
    import copy
    import warnings

    from opacus import GradSampleModule

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gsm = GradSampleModule(copy.deepcopy(ref).train(), batch_first=True, loss_reduction="sum")

    def grads(x, y):
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        return [p.grad_sample for p in gsm.parameters()]

    return grads


def vit_per_sample(
    reps: int, *, which=("small", "224"), small_batch: int = 32, big_batch: int = 16, opacus: bool = True
):
    """The ViT rows of the research-transforms goals (issue 29), each printed when measured:
    per-sample grads (fresh; ``out=`` reused at 224) and norms of the small ViT (:data:`SMALL_VIT`)
    at b32@32 against the loop of single-sample backward passes through timm's module (``"small"``);
    DeiT-Tiny b16@224 against one plain batched backward (timm's, the floor: ratio floor / vafunc,
    goal grads >= 1/1.2, norms >= 1/1.1; ``"224"``); both against Opacus' ``GradSampleModule`` on
    the same timm module."""
    rows = []
    name, cfg = SMALL_VIT
    problems = {
        "small": ("small ViT (deit_tiny p4)", cfg, small_batch, 32, "loop"),
        "224": ("deit_tiny", {}, big_batch, 224, "floor"),
    }
    for key in which:
        label, c, b, size, base = problems[key]
        model, params, state, ref, x, y = vit_problem(name, b, size, cfg=c)
        tag = f"b{b}@{size}"
        warm = 2 if base == "loop" else 1

        def add(what, fa, fb, warm=warm, tag=tag, label=label):
            rows.append(_say(compare(f"{label} {what} {tag}", fa, fb, reps=reps, warmup=warm)))

        def floor(ref=ref, x=x, y=y):
            ref.zero_grad(set_to_none=True)
            F.cross_entropy(ref(x), y).backward()

        def grads(model=model, params=params, state=state, x=x, y=y, out=None):
            return vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy, method="tape", out=out)

        def norms(model=model, params=params, state=state, x=x, y=y):
            return vafunc.per_sample_grad_norms(model, params, state, x, y, F.cross_entropy)

        if base == "loop":
            loop = lambda ref=ref, x=x, y=y: loop_grads(ref, x, y)  # noqa: E731
            add("per-sample grads vs loop", grads, loop)
            add("per-sample norms vs loop", norms, lambda ref=ref, x=x, y=y: loop_norms(ref, x, y))
            add("floor (one batched backward) vs loop", floor, loop)
        else:
            add("per-sample grads vs one batched backward", grads, floor)
            buf = grads()
            add("per-sample grads out= vs one batched backward", lambda buf=buf: grads(out=buf), floor)
            buf = None
            add("per-sample norms vs one batched backward", norms, floor)
        ref.zero_grad(set_to_none=True)
        if opacus and have_opacus():
            theirs = _gsm_grads(ref)
            add("per-sample grads vs Opacus GradSampleModule", grads, lambda theirs=theirs, x=x, y=y: theirs(x, y))
    return rows


def vit_opacus_agreement(batch: int = 4) -> float:
    """Max relative difference (worst parameter) between vafunc's taped per-sample gradients and
    Opacus' ``GradSampleModule`` on the small ViT: the two compute the same thing."""
    name, cfg = SMALL_VIT
    model, params, state, ref, x, y = vit_problem(name, batch, 32, cfg=cfg)
    ours = vafunc.flatten(vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy, method="tape"))
    theirs = _gsm_grads(ref)(x, y)
    names = [k for k, _ in ref.named_parameters()]
    return max(float((ours[k] - t).norm() / t.norm().clamp_min(1e-30)) for k, t in zip(names, theirs))


def vit_ensemble(reps: int, *, members: int = 16, batch: int = 8, which=("small", "224")):
    """``ensemble_apply`` on ViTs, eval, each row printed when measured: members mode and ``auto``
    against ``method="loop"`` (and the loop over timm modules) for ``members`` small ViTs at b8@32
    (goal >= 1.5x; ``"small"``); at 224 (DeiT-Tiny, ``"224"``) members mode against the loop, and
    which lowering ``auto`` picks there (the label says it)."""
    import timm

    from vafunc.research.members import prefer

    rows = []
    name, cfg = SMALL_VIT
    cases = {"small": ("small ViT (deit_tiny p4)", cfg, 32), "224": ("deit_tiny", {}, 224)}
    for key in which:
        label, c, size = cases[key]
        model = vafunc.get_model(name, num_classes=10, **c)
        refs = [timm.create_model(name, pretrained=False, num_classes=10, **c).eval() for _ in range(members)]
        flats = [vafunc.from_state_dict(model, m.state_dict()) for m in refs]
        params, state = vafunc.stack([p for p, _ in flats]), vafunc.stack([s for _, s in flats])
        x = torch.randn(batch, 3, size, size)
        picks = "batched" if prefer(model, members, x) else "loop"
        tag = f"x{members} b{batch}@{size}"
        warm = 2 if size <= 64 else 1

        def run(method, params=params, state=state, model=model, x=x):
            return vafunc.ensemble_apply(model, params, state, x, method=method)

        def timm_loop(refs=refs, x=x):
            return [m(x) for m in refs]

        def add(what, fa, fb, warm=warm, tag=tag, label=label):
            rows.append(_say(compare(f"{label} ensemble {tag} {what}", fa, fb, reps=reps, warmup=warm)))

        with torch.inference_mode():
            add("batched vs loop", lambda: run("batched"), lambda: run("loop"))
            add(f"auto (picks {picks}) vs loop", lambda: run("auto"), lambda: run("loop"))
            add("batched vs loop over timm modules", lambda: run("batched"), timm_loop)
    return rows
