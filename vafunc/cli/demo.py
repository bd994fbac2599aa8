"""``vafunc demo``: train an ensemble of small networks on real scans in one vectorised call.

Data: scikit-learn's digits (1,797 8x8 scans of handwritten digits, 10 classes), upsampled to
``size`` x ``size`` and repeated over three channels; a fixed 80/20 train/test split.
All members are trained together by one train step per batch (``make_train_step(ensemble=True)``),
each on its own shuffle of the data, with its own initialisation, BatchNorm statistics and keys.

At the end: per-member and ensemble (mean of softmax) test accuracy, a loss/accuracy plot
(``training.png``), metrics (``metrics.json``) and one torchvision-named checkpoint per member
(``member{i}.safetensors``, loadable with ``vafunc.load_weights`` or, as a plain state_dict, by
the torchvision model with the same ``num_classes``).

``--interpolate``: then the straight line between members 0 and 1, ``(1 - t) * w0 + t * w1`` at 21
points (:func:`vafunc.tree.interpolate`), test loss and accuracy with the BatchNorm statistics
interpolated as well and with them recomputed from training batches
(:func:`vafunc.recalibrate_batch_norm`), plotted to ``interpolation.png``.

``--spectrum``: then the spectral density of member 0's training-loss Hessian on one batch of
training digits (:func:`vafunc.curvature.hessian_density`, stochastic Lanczos quadrature) and its
top eigenvalue (:func:`vafunc.curvature.hessian_eigenvalues`), plotted to ``spectrum.png``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vafunc.core import random as vrandom
from vafunc.core import tree as vtree
from vafunc.core.registry import get_model
from vafunc.core.tree import interpolate
from vafunc.research.ensemble import ensemble_apply, ensemble_init
from vafunc.serving.memory import set_malloc_thresholds
from vafunc.training.optim import adamw, sgd, warmup_cosine_schedule
from vafunc.training.recalibrate import recalibrate_batch_norm
from vafunc.training.train import make_train_step

__all__ = ["DemoConfig", "run", "load_digits"]

_HINT = "vafunc demo needs {pkg}: pip install 'vafunc[demo]'"


@dataclass(frozen=True)
class DemoConfig:
    model: str = "resnet18"
    members: int = 4
    epochs: int = 8
    batch_size: int = 64
    size: int = 16
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    out: str = "vafunc-demo"
    ensemble_method: str = "auto"
    #: config overrides of the architecture, ``(("patch_size", 4), ...)``
    config: tuple = ()
    #: "fp32", or "bf16": the precision policy float32 params / bfloat16 compute / float32 logits
    precision: str = "fp32"
    #: "sgd" (Nesterov momentum 0.9) or "adamw" (what transformers are trained with)
    optimizer: str = "sgd"
    #: after training: the linear path between members 0 and 1 (``interpolation.png``)
    interpolate: bool = False
    #: after training: the Hessian spectrum of member 0 (``spectrum.png``)
    spectrum: bool = False


def _require(module: str, pkg: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise SystemExit(_HINT.format(pkg=pkg)) from None


#: the class names of the digits data set
DIGITS = [str(d) for d in range(10)]


def preprocessing(size: int) -> dict:
    """What :func:`load_digits` does to a scan, as the keywords of
    :class:`vafunc.serving.transforms.Transform` (saved in the demo's checkpoints for ``vafunc
    predict``): a bilinear resize to ``size`` x ``size``, three equal channels in ``[-1, 1]``
    (mean 0.5, std 0.5). The scans are light digits on a dark ground."""
    return {
        "resize_size": size,
        "crop_size": size,
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }


def load_digits(size: int, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: digits as ``[N, 3, size, size]`` floats in ``[-1, 1]``."""
    datasets = _require("sklearn.datasets", "scikit-learn")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(0.8 * len(x)))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


class _Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str, width: int = 28):
        self.total, self.label, self.width = total, label, width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, note: str = "") -> None:
        if not self.tty and done not in (self.total,):
            return
        frac = done / self.total
        fill = int(self.width * frac)
        bar = "#" * fill + "-" * (self.width - fill)
        secs = time.perf_counter() - self.start
        end = "\n" if done == self.total else ""
        print(f"\r{self.label} [{bar}] {done}/{self.total} {secs:5.1f}s {note}", end=end, file=sys.stderr, flush=True)


def _policy(cfg: DemoConfig):
    from vafunc.core.precision import Policy

    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}")
    return Policy.bf16() if cfg.precision == "bf16" else None


def parse_config(items) -> tuple:
    """``["patch_size=4", "dropout=0.1"]`` -> ``(("patch_size", 4), ("dropout", 0.1))``: ints,
    floats, ``None``/``true``/``false``, else the string."""
    out = []
    for item in items or ():
        for part in str(item).split(","):
            if not part:
                continue
            k, sep, v = part.partition("=")
            if not sep or not k:
                raise ValueError(f"config overrides are KEY=VALUE, got {part!r}")
            low = v.lower()
            if low in ("none", "true", "false"):
                val = {"none": None, "true": True, "false": False}[low]
            else:
                try:
                    val = int(v)
                except ValueError:
                    try:
                        val = float(v)
                    except ValueError:
                        val = v
            out.append((k.strip(), val))
    return tuple(out)


def _evaluate(model, params, state, x, y, batch: int = 512, policy=None):
    with torch.no_grad():
        logits = torch.cat(
            [
                ensemble_apply(
                    model, params, state, x[i : i + batch], **({} if policy is None else {"policy": policy})
                )[0]
                for i in range(0, len(x), batch)
            ],
            dim=1,
        )
    member_acc = (logits.argmax(-1) == y).float().mean(1)
    ens_acc = (logits.softmax(-1).mean(0).argmax(-1) == y).float().mean()
    return member_acc, ens_acc


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a hint) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(_HINT.format(pkg="matplotlib") + " (skipping the plot)", file=sys.stderr)
        return None
    return plt


def _save_figure(plt, fig, path: Path) -> bool:
    """Lay out and write ``fig`` to ``path`` atomically (a temporary file, then renamed)."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def _plot(history: dict, path: Path, cfg: DemoConfig) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    losses = torch.tensor(history["loss"])  # [steps, members]
    steps = torch.arange(1, len(losses) + 1) / history["steps_per_epoch"]
    for m in range(losses.shape[1]):
        ax1.plot(steps, losses[:, m], lw=0.8, label=f"member {m}")
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (cross-entropy)")
    ax1.legend(fontsize=8)
    epochs = range(1, len(history["test_member_acc"]) + 1)
    accs = torch.tensor(history["test_member_acc"])
    for m in range(accs.shape[1]):
        ax2.plot(epochs, 100 * accs[:, m], "o-", lw=0.8, ms=3, alpha=0.6, label=f"member {m}")
    ax2.plot(epochs, [100 * a for a in history["test_ensemble_acc"]], "k*-", lw=1.5, label="ensemble")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(max(0.0, 100 * float(accs.min()) - 5), 100.5)
    ax2.legend(fontsize=8)
    fig.suptitle(f"vafunc demo: {cfg.members} x {cfg.model} on scikit-learn digits ({cfg.size}x{cfg.size})")
    return _save_figure(plt, fig, path)


def interpolation_path(model, params, state, x_tr, x_te, y_te, *, points=21, calibration=8, batch=128, policy=None):
    """Test loss and accuracy along ``(1 - t) * w0 + t * w1`` between members 0 and 1 of a stacked
    ensemble, at ``points`` values of ``t`` in ``[0, 1]``: with the BatchNorm statistics interpolated
    like the weights (``loss``, ``accuracy``), and recomputed from ``calibration`` training batches
    of ``batch`` images (``loss_recalibrated``, ``accuracy_recalibrated``)."""
    (p0, p1), (s0, s1) = vtree.unstack(params)[:2], vtree.unstack(state)[:2]
    kw = {} if policy is None else {"policy": policy}
    calib = [x_tr[i : i + batch] for i in range(0, min(len(x_tr), calibration * batch), batch)]
    ts = [j / (points - 1) for j in range(points)]
    rows: dict = {"t": ts, "loss": [], "accuracy": [], "loss_recalibrated": [], "accuracy_recalibrated": []}
    bar = _Progress(points, "interpolating")
    for j, t in enumerate(ts):
        p = interpolate(p0, p1, t)
        recalibrated = recalibrate_batch_norm(model, p, s0, calib, **kw)
        for suffix, s in (("", interpolate(s0, s1, t)), ("_recalibrated", recalibrated)):
            with torch.no_grad():
                logits = model.apply(p, s, x_te, **kw)[0].float()
            rows["loss" + suffix].append(float(F.cross_entropy(logits, y_te)))
            rows["accuracy" + suffix].append(float((logits.argmax(-1) == y_te).float().mean()))
        bar.update(j + 1)
    return rows


def _plot_path(rows: dict, path: Path, cfg: DemoConfig) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curves = (("", "BatchNorm statistics interpolated", "o-"), ("_recalibrated", "statistics recalibrated", "s-"))
    for suffix, label, style in curves:
        ax1.plot(rows["t"], rows["loss" + suffix], style, ms=3, label=label)
        ax2.plot(rows["t"], [100 * a for a in rows["accuracy" + suffix]], style, ms=3, label=label)
    ax1.set_yscale("log")
    ax1.set_ylabel("test loss (cross-entropy)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(0, 100.5)
    for ax in (ax1, ax2):
        ax.set_xlabel("t: (1 - t) * member 0 + t * member 1")
        ax.legend(fontsize=8)
    fig.suptitle(f"vafunc demo: the line between two {cfg.model} members on the digits")
    return _save_figure(plt, fig, path)


def hessian_spectrum(model, params, state, x, y, *, batch=32, probes=2, steps=12):
    """The Hessian of the mean cross-entropy at member 0 of a stacked ensemble, on the first
    ``batch`` images of ``x``, in the parameters' dtype (no precision policy): ``{"top": the largest
    eigenvalue (Lanczos, 1e-2 relative), "grid", "density": the smoothed spectral density
    (stochastic Lanczos quadrature), "nodes": its Ritz values [probes, steps]}``."""
    from vafunc.research import curvature

    p, s = vtree.unstack(params)[0], vtree.unstack(state)[0]
    data = [(x[:batch], y[:batch])]
    top = curvature.hessian_eigenvalues(model, p, s, data, F.cross_entropy, k=1, tol=1e-2, max_iter=30)
    spec = curvature.hessian_density(model, p, s, data, F.cross_entropy, key=0, probes=probes, steps=steps)
    grid, density = spec.density(points=2000)
    nodes = spec.nodes.tolist()
    return {"top": float(top.values[0]), "grid": grid.tolist(), "density": density.tolist(), "nodes": nodes}


def _plot_spectrum(res: dict, path: Path, cfg: DemoConfig) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(res["grid"], torch.tensor(res["density"]).clamp_min(1e-8))
    ax.axvline(res["top"], color="k", ls=":", label=f"top eigenvalue {res['top']:.3g}")
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.set_xlabel("eigenvalue of the training-loss Hessian")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(f"vafunc demo: Hessian spectrum of {cfg.model} member 0 on the digits")
    return _save_figure(plt, fig, path)


def run(cfg: DemoConfig) -> dict:
    """Train, evaluate and save; returns the metrics (also written to ``metrics.json``)."""
    if cfg.members < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"members, epochs and batch size must be positive, got {cfg}")
    if cfg.interpolate and cfg.members < 2:
        raise ValueError(f"--interpolate needs two members to interpolate between, got members={cfg.members}")
    _require("safetensors", "safetensors")
    from vafunc.io.hub import save_weights

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_digits(cfg.size, cfg.seed)
    model = get_model(cfg.model, **{"num_classes": 10, **dict(cfg.config)})
    policy = _policy(cfg)
    size = max(cfg.size, model.min_size)
    if size != cfg.size:
        x_tr, y_tr, x_te, y_te = load_digits(size, cfg.seed)
    key = vrandom.key(cfg.seed)
    k_init, key = vrandom.split(key)
    params, state = ensemble_init(model, cfg.members, k_init)
    steps_per_epoch = len(x_tr) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    schedule = warmup_cosine_schedule(cfg.lr, min(steps_per_epoch, total - 1), total)
    if cfg.optimizer == "sgd":
        opt = sgd(schedule, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = adamw(schedule, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    opt_state = opt.init(params)
    step = make_train_step(model, opt, ensemble=True, ensemble_method=cfg.ensemble_method, donate=True, policy=policy)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    print(
        f"vafunc demo: {cfg.members} x {cfg.model} ({vtree.count_params(params) // cfg.members:,} parameters each), "
        f"digits {len(x_tr)} train / {len(x_te)} test at {size}x{size}, {cfg.epochs} epochs",
        file=sys.stderr,
    )
    history: dict = {"loss": [], "test_member_acc": [], "test_ensemble_acc": [], "steps_per_epoch": steps_per_epoch}
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.stack([torch.randperm(len(x_tr), generator=gen) for _ in range(cfg.members)])
        bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        for b in range(steps_per_epoch):
            idx = order[:, b * cfg.batch_size : (b + 1) * cfg.batch_size]  # [members, batch]
            key, k_step = vrandom.split(key)
            params, state, opt_state, metrics = step(params, state, opt_state, x_tr[idx], y_tr[idx], k_step)
            history["loss"].append(metrics["loss"].tolist())
            bar.update(b + 1, f"loss {float(metrics['loss'].mean()):.3f}")
        member_acc, ens_acc = _evaluate(model, params, state, x_te, y_te, policy=policy)
        history["test_member_acc"].append(member_acc.tolist())
        history["test_ensemble_acc"].append(float(ens_acc))
        print(
            f"  test accuracy: members {' '.join(f'{100 * a:.1f}%' for a in member_acc.tolist())}, "
            f"ensemble {100 * float(ens_acc):.2f}%",
            file=sys.stderr,
        )
    seconds = time.perf_counter() - t0
    paths = []
    for i, (p, s) in enumerate(zip(vtree.unstack(params), vtree.unstack(state))):
        paths.append(
            str(
                save_weights(
                    p,
                    s,
                    out / f"member{i}.safetensors",
                    metadata={
                        "model": cfg.model,
                        "num_classes": "10",
                        "transform": json.dumps(preprocessing(size)),
                        "categories": json.dumps(DIGITS),
                        **({"config": json.dumps(dict(cfg.config))} if cfg.config else {}),
                    },
                )
            )
        )
    plotted = _plot(history, out / "training.png", cfg)
    result = {
        "config": asdict(cfg),
        "train_seconds": round(seconds, 1),
        "test_member_accuracy": history["test_member_acc"][-1],
        "test_ensemble_accuracy": history["test_ensemble_acc"][-1],
        "checkpoints": paths,
        "plot": str(out / "training.png") if plotted else None,
        "history": history,
    }
    if cfg.interpolate:
        result["interpolation"] = interpolation_path(model, params, state, x_tr, x_te, y_te, policy=policy)
        result["interpolation_plot"] = str(out / "interpolation.png")
        if not _plot_path(result["interpolation"], out / "interpolation.png", cfg):
            result["interpolation_plot"] = None
    if cfg.spectrum:
        result["spectrum"] = hessian_spectrum(model, params, state, x_tr, y_tr)
        plotted_spectrum = _plot_spectrum(result["spectrum"], out / "spectrum.png", cfg)
        result["spectrum_plot"] = str(out / "spectrum.png") if plotted_spectrum else None
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "metrics.json")
    members = ", ".join(f"{100 * a:.1f}%" for a in result["test_member_accuracy"])
    print(f"\ntrained {cfg.members} x {cfg.model} in {seconds:.0f}s")
    print(f"test accuracy per member: {members}")
    print(f"test accuracy of the ensemble: {100 * result['test_ensemble_accuracy']:.2f}%")
    print(f"wrote {out}/member*.safetensors, {out}/metrics.json" + (f", {out}/training.png" if plotted else ""))
    if cfg.interpolate:
        r, mid = result["interpolation"], len(result["interpolation"]["t"]) // 2
        print(
            f"halfway between members 0 and 1: test accuracy {100 * r['accuracy'][mid]:.1f}% with interpolated "
            f"BatchNorm statistics, {100 * r['accuracy_recalibrated'][mid]:.1f}% recalibrated "
            f"(worst on the path: {100 * min(r['accuracy']):.1f}% / {100 * min(r['accuracy_recalibrated']):.1f}%)"
            + (f"; wrote {out}/interpolation.png" if result["interpolation_plot"] else "")
        )
    if cfg.spectrum:
        print(
            f"Hessian of member 0: top eigenvalue {result['spectrum']['top']:.4g}"
            + (f"; wrote {out}/spectrum.png" if result["spectrum_plot"] else "")
        )
    return result


def add_parser(sub) -> None:
    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train an ensemble on scikit-learn's digits (the quick start's main job)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default=d.model, help=f"registered architecture (default {d.model})")
    p.add_argument("--members", type=int, default=d.members, help=f"ensemble size (default {d.members})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training split (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per member per step")
    p.add_argument("--size", type=int, default=d.size, help="image side after upsampling the 8x8 scans")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the keys and the shuffles")
    p.add_argument("--out", default=d.out, help="output folder (checkpoints, plot, metrics)")
    p.add_argument(
        "--ensemble-method",
        choices=["auto", "batched", "loop", "vmap"],
        default=d.ensemble_method,
        help="lowering of the ensemble train step (vmap: one torch.vmap over members)",
    )
    p.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="architecture config overrides, e.g. patch_size=4 num_layers=4 hidden_dim=128",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=d.precision,
        help="bf16: the precision policy float32 params / bfloat16 compute / float32 logits",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default=d.optimizer,
        help="sgd (Nesterov momentum 0.9, the default) or adamw",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    p.add_argument(
        "--malloc",
        choices=["reuse", "default"],
        default="reuse",
        help="reuse (default): glibc keeps large freed blocks for the next step "
        "(vafunc.serving.memory.set_malloc_thresholds; this process only)",
    )
    p.add_argument(
        "--interpolate",
        action="store_true",
        help="after training: test loss and accuracy on the line between members 0 and 1, with and without "
        "recalibrating BatchNorm (interpolation.png)",
    )
    p.add_argument(
        "--spectrum",
        action="store_true",
        help="after training: the Hessian spectral density and top eigenvalue of member 0 (spectrum.png)",
    )
    p.set_defaults(fn=_main)


def _main(a) -> int:
    if a.malloc == "reuse" and set_malloc_thresholds():
        print(
            "host memory: large freed blocks are kept for reuse (vafunc.serving.memory.set_malloc_thresholds; "
            "--malloc default turns it off)",
            flush=True,
        )
    cfg = DemoConfig(
        a.model,
        a.members,
        a.epochs,
        a.batch_size,
        a.size,
        a.lr,
        a.weight_decay,
        a.seed,
        a.out,
        a.ensemble_method,
        parse_config(a.config),
        a.precision,
        a.optimizer,
        a.interpolate,
        a.spectrum,
    )
    return 0 if run(cfg) else 1
