"""Benchmarks of the research transforms against what a user would write with torchvision.

* ``ensemble``: ``vafunc.ensemble_apply`` (eager loop, eager vmap, compiled) against a Python loop
  over N torchvision modules, eval (and train) mode.
* ``train``: the functional train step against the nn.Module path (torchvision module,
  ``loss.backward()``, ``torch.optim.SGD``).
* ``psg``: ``vafunc.per_sample_grads`` (fresh and ``out=``), ``per_sample_grad_norms`` and the
  DP-SGD step against a loop of single-sample backward passes through the torchvision module (and
  a plain-torch DP-SGD step); on a GroupNorm ResNet, against Opacus (``GradSampleModule``, ghost
  clipping); a batch-size sweep (:func:`psg_sweep`, :func:`psg_plot`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vafunc
from benchmarks.harness import compare
from vafunc.training import optim
from vafunc.training.train import make_train_step


def _tv(name, **kw):
    import torchvision

    ref = vafunc.get_entry(name).reference
    return getattr(torchvision.models, ref.builder)(**dict(ref.kwargs), **kw)


def ensemble(
    name: str,
    members: int,
    batch: int,
    size: int,
    *,
    train: bool,
    reps: int,
    compiled: bool,
    classes: int = 10,
    methods=("auto", "batched", "loop", "vmap"),
):
    """``ensemble_apply`` by each lowering, the user's own ``torch.vmap(model.apply)``, the
    compiled ensemble and the floor (one torchvision model on the ``N * B`` batch: the same
    arithmetic with no per-member cost), each against a loop over ``members`` torchvision modules
    holding the same weights (eval: under ``torch.inference_mode``)."""
    from vafunc.research.members import covers

    model = vafunc.get_model(name, num_classes=classes)
    tvs = [_tv(name, num_classes=classes).train(train) for _ in range(members)]
    flats = [vafunc.from_state_dict(model, m.state_dict()) for m in tvs]
    params = vafunc.stack([p for p, _ in flats])
    state = vafunc.stack([s for _, s in flats])
    x = torch.randn(batch, 3, size, size)
    rng = vafunc.random.key(0) if train else None
    mode = "train" if train else "eval"
    tag = f"{name} ensemble x{members} {mode}"
    rows = []
    ctx = torch.no_grad() if train else torch.inference_mode()
    with ctx:

        def loop():
            return torch.stack([m(x) for m in tvs])

        for method in methods:
            if method == "batched" and not covers(model):
                continue
            fn = lambda method=method: vafunc.ensemble_apply(
                model, params, state, x, train=train, rng=rng, method=method
            )
            rows.append(compare(f"{tag} {method}", fn, loop, reps=reps))
        if not train:
            user = torch.vmap(lambda p, s: model.apply(p, s, x)[0])
            rows.append(compare(f"{tag} user torch.vmap(model.apply)", lambda: user(params, state), loop, reps=reps))
            big = torch.cat([x] * members)
            rows.append(
                compare(f"{tag} floor: one torchvision model on the N*B batch", lambda: tvs[0](big), loop, reps=reps)
            )
    if compiled and not train:
        with torch.no_grad():
            rows.append(compiled_ensemble(name, model, params, state, x, tvs, train, reps))
    return rows


def compiled_ensemble(name, model, params, state, x, tvs, train, reps):
    """``torch_compat.compile_ensemble`` (method ``auto``) against the eager loop."""
    from torch_compat import compile_ensemble

    fn = compile_ensemble(model, params, state)
    fn(x)
    return compare(
        f"{name} ensemble x{len(tvs)} eval compiled ({fn.method()})",
        lambda: fn(x),
        lambda: torch.stack([m(x) for m in tvs]),
        reps=reps,
    )


def ensemble_train_step(
    name: str, members: int, batch: int, size: int, reps: int, *, classes: int = 10, methods=("auto", "loop", "vmap")
):
    """``make_train_step(ensemble=True, donate=True)`` (SGD with momentum) by each lowering against
    a loop of ``members`` torchvision train steps (module + backward + ``torch.optim.SGD``)."""
    model = vafunc.get_model(name, num_classes=classes)
    tvs = [_tv(name, num_classes=classes).train() for _ in range(members)]
    topts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in tvs]
    flats = [vafunc.from_state_dict(model, m.state_dict()) for m in tvs]
    params = vafunc.stack([p for p, _ in flats])
    state = vafunc.stack([s for _, s in flats])
    opt = optim.sgd(0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))

    def theirs():
        for m, o in zip(tvs, topts):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()

    rows = []
    for method in methods:
        step = make_train_step(model, opt, ensemble=True, ensemble_method=method, donate=True)
        held = [vafunc.tree.tree_map(torch.clone, params), vafunc.tree.tree_map(torch.clone, state), None]
        held[2] = opt.init(held[0])

        def ours(step=step, held=held):
            held[0], held[1], held[2], _ = step(held[0], held[1], held[2], x, y)

        rows.append(compare(f"{name} ensemble x{members} train step {method}", ours, theirs, reps=reps))
    return rows


def train_step(name: str, batch: int, size: int, reps: int):
    return [_train_step(name, batch, size, reps, donate) for donate in (False, True)]


def _train_step(name: str, batch: int, size: int, reps: int, donate: bool):
    ref = _tv(name, num_classes=10).train()
    model = vafunc.get_model(name, num_classes=10)
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    opt = optim.sgd(0.01, momentum=0.9, weight_decay=1e-4)
    holder = {"p": params, "s": state, "o": opt.init(params)}
    step = make_train_step(model, opt, donate=donate)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def ours():
        holder["p"], holder["s"], holder["o"], _ = step(holder["p"], holder["s"], holder["o"], x, y)

    def theirs():
        torch_opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        torch_opt.step()

    return compare(f"{name} train step b{batch}@{size}{' donate' if donate else ''}", ours, theirs, reps=reps)


# ----------------------------------------------------------------------------- per-sample gradients

#: the batch sizes of the per-sample-gradient sweep (the report's psg plot)
PSG_SWEEP = (8, 16, 32, 64)
#: clip norm and noise multiplier of the DP-SGD rows
DP_CLIP, DP_NOISE = 1.0, 1.0


def _timed(fn, device):
    """``fn`` followed by a CUDA synchronize on a GPU (the timed callables must include the work)."""
    if not str(device).startswith("cuda"):
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def psg_problem(name: str, batch: int, size: int, *, norm: str | None = None, device="cpu", seed: int = 0):
    """``(model, params, state, ref, x, y)``: the vafunc model with 10 classes and the torchvision
    module (eval mode) holding the same weights, a batch of ``batch`` images ``size``x``size`` and
    labels. ``norm="group"``: GroupNorm(32, c) in place of BatchNorm on both sides."""
    torch.manual_seed(seed)
    if norm == "group":
        ref = _tv(name, num_classes=10, norm_layer=lambda c: torch.nn.GroupNorm(32, c))
        model = vafunc.get_model(name, num_classes=10, norm="group")
    else:
        ref = _tv(name, num_classes=10)
        model = vafunc.get_model(name, num_classes=10)
    ref = ref.to(device).eval()
    params, state = vafunc.from_state_dict(model, {k: v.detach().clone() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, params, state, ref, x, y


def _sample_grads(ref, x, y):
    """One backward per sample: yields that sample's parameter gradients."""
    ps = list(ref.parameters())
    for i in range(len(x)):
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        yield [p.grad for p in ps]
    ref.zero_grad(set_to_none=True)


def loop_grads(ref, x, y):
    """What a user writes: one backward per sample, keeping each sample's gradients."""
    return list(_sample_grads(ref, x, y))


def loop_norms(ref, x, y):
    """One backward per sample, then the L2 norm of that sample's gradient over all parameters."""
    norms = []
    for grads in _sample_grads(ref, x, y):
        norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    ref.zero_grad(set_to_none=True)
    return torch.stack(norms)


def make_loop_dp_step(ref, lr: float = 0.01, clip: float = DP_CLIP, noise: float = DP_NOISE):
    """A plain-torch DP-SGD step as a user writes it: per-sample backward, clip (Opacus' factor
    ``min(1, C / (n + 1e-6))``), sum, Gaussian noise ``noise * C``, divide by ``B``, SGD."""
    ps = list(ref.parameters())
    opt = torch.optim.SGD(ps, lr=lr)

    def step(x, y):
        acc = [torch.zeros_like(p) for p in ps]
        for i in range(len(x)):
            ref.zero_grad(set_to_none=True)
            F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
            grads = [p.grad for p in ps]
            n = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_add_(acc, torch._foreach_mul(grads, (clip / (n + 1e-6)).clamp(max=1.0)))
        for p, a in zip(ps, acc):
            p.grad = (a + torch.randn_like(a) * (noise * clip)) / len(x)
        opt.step()

    return step


def _dp_step(model, params, state, *, train: bool, device):
    """vafunc's DP-SGD step (SGD lr 0.01) as a callable ``f(x, y)`` keeping its own state and a
    fresh key per step."""
    from vafunc.training.train import make_dp_train_step

    opt = optim.sgd(0.01)
    step = make_dp_train_step(model, opt, F.cross_entropy, clip_norm=DP_CLIP, noise_multiplier=DP_NOISE, train=train)
    holder = {"p": params, "s": state, "o": opt.init(params), "i": 0}

    def run(x, y):
        holder["i"] += 1
        holder["p"], holder["s"], holder["o"], _ = step(
            holder["p"], holder["s"], holder["o"], x, y, vafunc.random.key(holder["i"], device=device)
        )

    return run


def per_sample(name: str, batch: int, size: int, reps: int, *, device="cpu", dp: bool = True):
    """Rows a-e (BatchNorm model in eval mode), each against the loop over the torchvision module:
    per-sample grads fresh, with ``out=`` reused, per-sample norms, the floor (one batched backward
    of the mean loss, torchvision), and the DP-SGD step against the plain-torch DP-SGD step."""
    model, params, state, ref, x, y = psg_problem(name, batch, size, device=device)
    t = lambda f: _timed(f, device)  # noqa: E731
    tag = f"b{batch}@{size}"
    loop = t(lambda: loop_grads(ref, x, y))
    rows = [
        compare(
            f"{name} per-sample grads fresh {tag}",
            t(lambda: vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)),
            loop,
            reps=reps,
        )
    ]
    buf = vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)
    rows.append(
        compare(
            f"{name} per-sample grads out= {tag}",
            t(lambda: vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy, out=buf)),
            loop,
            reps=reps,
        )
    )
    buf = None  # freed (lambdas above still name them)
    rows.append(
        compare(
            f"{name} per-sample grad norms {tag}",
            t(lambda: vafunc.per_sample_grad_norms(model, params, state, x, y, F.cross_entropy)),
            t(lambda: loop_norms(ref, x, y)),
            reps=reps,
        )
    )

    def floor():
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()

    rows.append(compare(f"{name} floor: one batched backward (torchvision) {tag}", t(floor), loop, reps=reps))
    ref.zero_grad(set_to_none=True)
    if dp:
        ours = _dp_step(model, params, state, train=False, device=device)
        theirs = make_loop_dp_step(ref)
        rows.append(
            compare(f"{name} DP-SGD step eval {tag}", t(lambda: ours(x, y)), t(lambda: theirs(x, y)), reps=reps)
        )
    return rows


def psg_sweep(name: str, batches, size: int, reps: int, *, device="cpu", skip=()):
    """``[(batch, Pair)]``: per-sample grads fresh, with ``out=``, and norms against the loop at
    each batch size (``skip``: batch sizes measured elsewhere, e.g. by :func:`per_sample`)."""
    import gc

    out = []
    for b in batches:
        if b in skip:
            continue
        model, params, state, ref, x, y = psg_problem(name, b, size, device=device)
        t = lambda f: _timed(f, device)  # noqa: E731
        loop = t(lambda: loop_grads(ref, x, y))
        tag = f"b{b}@{size}"
        out.append(
            (
                b,
                compare(
                    f"{name} per-sample grads fresh {tag}",
                    t(lambda: vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)),
                    loop,
                    reps=reps,
                ),
            )
        )
        buf = vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)
        out.append(
            (
                b,
                compare(
                    f"{name} per-sample grads out= {tag}",
                    t(lambda: vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy, out=buf)),
                    loop,
                    reps=reps,
                ),
            )
        )
        buf = None  # freed (lambdas above still name them)
        out.append(
            (
                b,
                compare(
                    f"{name} per-sample grad norms {tag}",
                    t(lambda: vafunc.per_sample_grad_norms(model, params, state, x, y, F.cross_entropy)),
                    t(lambda: loop_norms(ref, x, y)),
                    reps=reps,
                ),
            )
        )
        model = params = state = ref = x = y = None  # freed (lambdas above still name them)
        gc.collect()
    return out


#: sweep labels -> plot series
PSG_SERIES = (
    ("per-sample grads fresh", "grads, fresh (out=None)"),
    ("per-sample grads out=", "grads, out= reused"),
    ("per-sample grad norms", "norms (ghost)"),
)


def psg_plot(rows: list[dict], path: str, title: str = "") -> bool:
    """Ratio against the loop of single-sample backward passes vs batch size, one line per method,
    from rows with ``label``, ``batch`` and ``ratio`` (the psg CSV's rows). False without matplotlib."""
    return sweep_plot(
        rows,
        path,
        "batch",
        PSG_SERIES,
        title or "per-sample gradients",
        "batch size",
        "speed ratio vs loop of single-sample backward (>1: vafunc faster)",
    )


#: ensemble sweep labels -> plot series
ENSEMBLE_SERIES = (
    ("eval auto", "ensemble_apply (auto)"),
    ("eval batched", "members mode"),
    ("eval loop", "loop"),
    ("eval user torch.vmap", "user's torch.vmap(model.apply)"),
    ("eval floor", "floor: one model on N*B"),
)


def ensemble_sweep(name: str, members_list, batch: int, size: int, reps: int) -> list[dict]:
    """Rows (``members``, ``label``, ``ratio``, ...) of :func:`ensemble` in eval mode, without the
    compiled path and the vmap method, for each ensemble size."""
    rows = []
    for n in members_list:
        for pair in ensemble(
            name, n, batch, size, train=False, reps=reps, compiled=False, methods=("auto", "batched", "loop")
        ):
            rows.append({"members": n, **pair.row()})
            print(
                f"| {pair.label} | {batch}x{size} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
                f"{pair.ratio:.3f} |",
                flush=True,
            )
    return rows


def ensemble_plot(rows: list[dict], path: str, title: str = "") -> bool:
    """Ratio against the loop over torchvision modules vs the number of members."""
    return sweep_plot(
        rows,
        path,
        "members",
        ENSEMBLE_SERIES,
        title or "ensembles",
        "members",
        "speed ratio vs loop over torchvision modules (>1: vafunc faster)",
    )


def sweep_plot(rows: list[dict], path: str, x_key: str, series, title: str, xlabel: str, ylabel: str) -> bool:
    """One line per ``(label key, legend)`` of ``series``: ``ratio`` against ``rows[x_key]`` on a
    log2 axis, written atomically to ``path``. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; no plot {path}", flush=True)
        return False
    import os

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = sorted({int(r[x_key]) for r in rows})
    for key, label in series:
        pts = sorted((int(r[x_key]), float(r["ratio"])) for r in rows if f" {key}" in r["label"])
        if pts:
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(b) for b in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.yaxis.label.set_size(8)
    ax.set_title(title, fontsize=8, loc="left")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- Opacus, the peer


def have_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def _basic_block_forward(self, x):
    """torchvision's ``BasicBlock.forward`` with ``out = out + identity`` for ``out += identity``."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


def _bottleneck_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


def _opacus_copy(ref):
    """A train-mode copy of ``ref`` without in-place ops on layer outputs (Opacus' full backward
    hooks refuse an in-place op on a hooked module's output): ReLU(inplace=False) and the ResNet
    blocks' residual sum out of place. Same values, same weights."""
    import copy
    import types

    from torchvision.models.resnet import BasicBlock, Bottleneck

    m = copy.deepcopy(ref).train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
        elif isinstance(mod, BasicBlock):
            mod.forward = types.MethodType(_basic_block_forward, mod)
        elif isinstance(mod, Bottleneck):
            mod.forward = types.MethodType(_bottleneck_forward, mod)
    return m


def _opacus_modules(ref):
    """Opacus' per-sample gradient module (hooks grad sampler) and its ghost-clipping module for
    the per-sample norms, each on its own copy of ``ref`` (train mode: Opacus' hooks only run on a
    training module; a GroupNorm ResNet has no train/eval difference), per-sample (``sum``) losses."""
    import warnings

    from opacus import GradSampleModule, GradSampleModuleFastGradientClipping

    # the first layer's input needs no gradient: torch says so on every backward
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gsm = GradSampleModule(_opacus_copy(ref), batch_first=True, loss_reduction="sum")
    fgc = GradSampleModuleFastGradientClipping(
        _opacus_copy(ref), batch_first=True, loss_reduction="sum", max_grad_norm=DP_CLIP, use_ghost_clipping=True
    )

    def grads(x, y):
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        return [p.grad_sample for p in gsm.parameters()]

    def norms(x, y):
        fgc.zero_grad(set_to_none=True)
        F.cross_entropy(fgc(x), y, reduction="sum").backward()
        return fgc.get_norm_sample()

    return gsm, grads, norms


def opacus_agreement(name: str = "resnet18", batch: int = 8, size: int = 32, *, device="cpu") -> dict:
    """One run on the GroupNorm model: the largest relative difference between vafunc's and
    Opacus' per-sample gradients (per parameter, ``||diff|| / ||opacus||``, the worst parameter)
    and norms (``|diff| / opacus``, the worst sample)."""
    model, params, state, ref, x, y = psg_problem(name, batch, size, norm="group", device=device)
    gsm, grads, norms = _opacus_modules(ref)
    theirs = dict(zip([k.removeprefix("_module.") for k, _ in gsm.named_parameters()], grads(x, y)))
    ours = vafunc.flatten(vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy))
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    g_rel = max(
        float(torch.linalg.vector_norm(ours[k] - theirs[k]) / torch.linalg.vector_norm(theirs[k]).clamp_min(1e-30))
        for k in ours
    )
    n_ours = vafunc.per_sample_grad_norms(model, params, state, x, y, F.cross_entropy)
    n_theirs = norms(x, y)
    n_rel = float(((n_ours - n_theirs).abs() / n_theirs).max())
    return {"grads_rel": g_rel, "norms_rel": n_rel, "batch": batch, "size": size}


def per_sample_opacus(name: str, batch: int, size: int, reps: int, *, device="cpu", dp: bool = True):
    """vafunc against Opacus 1.6 on the GroupNorm model: per-sample grads (fresh and ``out=``)
    against ``GradSampleModule`` (hooks), norms against ``GradSampleModuleFastGradientClipping``
    (ghost clipping: Opacus has ghost norms for Linear and Embedding only, its convolutions and
    GroupNorm instantiate each layer's per-sample gradients), and the DP-SGD step (train mode)
    against Opacus' ghost-clipping step (``DPOptimizerFastGradientClipping`` +
    ``DPLossFastGradientClipping``). ``[]`` with a note without opacus."""
    if not have_opacus():
        print("note: opacus is not installed (pip install -e .[bench]); skipping the Opacus rows", flush=True)
        return []
    model, params, state, ref, x, y = psg_problem(name, batch, size, norm="group", device=device)
    _, grads, norms = _opacus_modules(ref)
    t = lambda f: _timed(f, device)  # noqa: E731
    tag = f"b{batch}@{size}"
    label = f"{name} GroupNorm"
    rows = [
        compare(
            f"{label} per-sample grads fresh vs Opacus {tag}",
            t(lambda: vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)),
            t(lambda: grads(x, y)),
            reps=reps,
        )
    ]
    buf = vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)
    rows.append(
        compare(
            f"{label} per-sample grads out= vs Opacus {tag}",
            t(lambda: vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy, out=buf)),
            t(lambda: grads(x, y)),
            reps=reps,
        )
    )
    buf = None  # freed (lambdas above still name them)
    rows.append(
        compare(
            f"{label} per-sample grad norms vs Opacus ghost clipping {tag}",
            t(lambda: vafunc.per_sample_grad_norms(model, params, state, x, y, F.cross_entropy)),
            t(lambda: norms(x, y)),
            reps=reps,
        )
    )
    if dp:
        from opacus import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        fgc = GradSampleModuleFastGradientClipping(
            _opacus_copy(ref), batch_first=True, loss_reduction="mean", max_grad_norm=DP_CLIP, use_ghost_clipping=True
        )
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(fgc.parameters(), lr=0.01),
            noise_multiplier=DP_NOISE,
            max_grad_norm=DP_CLIP,
            expected_batch_size=batch,
            loss_reduction="mean",
        )
        crit = DPLossFastGradientClipping(fgc, opt, torch.nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean")

        def opacus_step():
            opt.zero_grad(set_to_none=True)
            crit(fgc(x), y).backward()
            opt.step()

        ours = _dp_step(model, params, state, train=True, device=device)
        rows.append(
            compare(
                f"{label} DP-SGD step train vs Opacus ghost clipping {tag}",
                t(lambda: ours(x, y)),
                t(opacus_step),
                reps=reps,
            )
        )
    return rows
