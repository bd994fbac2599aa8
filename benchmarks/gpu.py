"""The GPU check: ``python -m benchmarks.gpu [--out benchmarks/results/gpu.md]`` (about 5 minutes on one GPU).

1. Parity of every registered model with its oracle (torchvision, timm or Cadene's
   pretrainedmodels) on the GPU: eval mode, float32 with TF32 off, random weights moved away from
   their init values (BatchNorm statistics calibrated on the GPU, as the test suite does on the
   CPU), 2 images at the model's natural size (the default checkpoint's crop, else 224). Per model
   the largest absolute logit difference and that difference relative to the largest reference
   logit, against ``--tol`` (default 1e-4 on CUDA: the two sides' cuDNN / cuBLAS calls pick their
   algorithms independently; the CPU test suite asks for 1e-5). Smallest models first; after
   ``--budget`` seconds (default 180) the rest are listed as skipped.
2. Speed, side by side, alternating, synchronised (``benchmarks.harness.compare``): the ensemble
   (``ensemble_apply`` loop and vmap against a loop over 16 torchvision resnet18, batch 8 @32) and
   the per-sample-gradient rows of ``python -m benchmarks psg`` (:mod:`benchmarks.research`),
   Opacus rows where opacus is installed.
3. A markdown report with the device, torch version and the tables (``--out``).

Without CUDA it says so and exits (status 0, nothing written). ``--device cpu --models
resnet18,vit_b_16 --quick`` is a smoke run of the script itself on the CPU (small sizes and
batches, few repetitions).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import vafunc  # noqa: E402
from benchmarks.harness import compare  # noqa: E402

_BN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}


def log(msg: str, t0: list = [time.perf_counter()]) -> None:  # noqa: B006 - process start time
    print(f"[{time.perf_counter() - t0[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- oracles


def _oracle():
    """tests/oracle.py (the test suite's reference builders) where it imports (it needs pytest)."""
    try:
        from tests import oracle
    except Exception:  # noqa: BLE001 - pytest or a test extra missing: the fallback builder
        return None
    return oracle


def build_reference(name: str, device) -> torch.nn.Module:
    """The reference module on ``device``, eval mode: built on the meta device and filled there with
    variance-preserving normals where its only buffers are BatchNorm statistics (as the test
    suite's ``build_reference_fast``, but on the GPU), else built with its own init and moved."""
    oracle = _oracle()
    if oracle is None:
        from benchmarks.__main__ import reference_module

        return reference_module(name).to(device).eval()
    meta = oracle.build_reference_meta(name)
    if any(n.rsplit(".", 1)[-1] not in _BN_BUFFERS for n, _ in meta.named_buffers()):
        return oracle.build_reference(name).to(device).eval()
    module = meta.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
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


@torch.no_grad()
def perturb(module: torch.nn.Module, size: tuple[int, int], device, seed: int = 0) -> None:
    """The test suite's ``oracle.perturb`` on ``device``: every tensor away from its init value
    (multiplicative noise on weights, additive on vectors, O(1) layer scales, zero tensors filled),
    then BatchNorm statistics set from the activations each layer sees on a batch of 8, jittered."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g, device=device, dtype=t.dtype)

    for name, t in module.state_dict(keep_vars=True).items():
        t = t.data if isinstance(t, torch.nn.Parameter) else t
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t.fill_(7)
        elif not t.is_floating_point():
            continue
        elif leaf == "running_var":
            t.uniform_(0.5, 1.5, generator=g)
        elif leaf == "running_mean":
            t.copy_(randn(t) * 0.1)
        elif leaf in ("layer_scale", "gamma"):
            t.uniform_(0.3, 0.7, generator=g)
        elif t.dim() <= 1:
            t.add_(randn(t) * 0.1)
        elif not t.any():
            t.copy_(randn(t) * t[0].numel() ** -0.5)
        else:
            t.mul_(1.0 + 0.1 * randn(t))
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return

    def set_stats(bn, args):
        x = args[0]
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())))
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=g, device=device))
        var = var.clamp_min(1e-2 * float(var.mean()) + 1e-6)
        bn.running_var.copy_(var * torch.empty(var.shape, device=device).uniform_(0.8, 1.25, generator=g))

    handles = [bn.register_forward_pre_hook(set_stats) for bn in bns]
    try:
        module(torch.randn(8, 3, *size, generator=g, device=device))
    finally:
        for h in handles:
            h.remove()


def main_logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out["logits"]


def eval_size(name: str, model, quick: bool) -> tuple[int, int]:
    """(H, W): the test suite's fixed size where the reference runs at one size only, a ViT's
    build size, else the default checkpoint's crop size (224 without one; ``quick``: 64), fitted
    to the model's minimum size and size multiple."""
    oracle = _oracle()
    fixed = oracle.ORACLE_SIZES.get(name) if oracle is not None else None
    if fixed:
        _, h, w = min(fixed, key=lambda s: (s[1] != s[2], s[1] * s[2]))
        return int(h), int(w)
    image_size = getattr(model.config, "image_size", None)
    if image_size is not None:
        return image_size, image_size
    if name in ("maxvit_t", "coatnet_0_224", "coatnet_0_rw_224", "inception_v2"):  # without tests/oracle.py
        return 224, 224
    if quick:
        s = 64
    else:
        try:
            s = vafunc.hub.get_weights(name, "DEFAULT").transforms().crop_size
        except (KeyError, ValueError, AttributeError, LookupError):
            s = 224
    k = model.size_multiple
    s = -(-max(int(s), model.min_size) // k) * k
    return s, s


def parity(name: str, device, quick: bool) -> dict:
    """One model against its oracle: build, perturb, load into vafunc, 2 images, compare logits."""
    t0 = time.perf_counter()
    model = vafunc.get_model(name)
    h, w = eval_size(name, model, quick)
    ref = build_reference(name, device)
    perturb(ref, (h, w), device)
    sd = ref.state_dict()
    params, state = vafunc.from_state_dict(model, {k: v.detach().clone() for k, v in sd.items()})
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 3, h, w, generator=g, device=device)
    with torch.no_grad():
        want = main_logits(ref(x)).float()
        got = model.apply(params, state, x)[0].float()
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    spread = float((want - want.mean(0)).abs().max())
    return {
        "model": name,
        "size": f"2x3x{h}x{w}",
        "params_m": vafunc.get_entry(name).params / 1e6,
        "max_abs": err,
        "rel": err / max(scale, 1e-12),
        "scale": scale,
        "depends_on_input": spread > 1e-3 * scale,
        "seconds": time.perf_counter() - t0,
    }


def run_parity(names, device, quick: bool, tol: float, budget: float) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    start = time.perf_counter()
    # smallest first: a budget cut leaves out the few largest models, not half the registry
    order = sorted(names, key=lambda n: (vafunc.get_entry(n).params, n))
    for i, name in enumerate(order):
        if time.perf_counter() - start > budget:
            skipped = order[i:]
            log(f"parity: time budget of {budget:.0f}s spent; skipping {len(skipped)} models")
            break
        try:
            r = parity(name, device, quick)
            r["ok"] = r["rel"] <= tol and r["depends_on_input"]
            r["note"] = "" if r["depends_on_input"] else "reference output ignores its input"
        except Exception as e:  # noqa: BLE001 - one broken model must not stop the report
            traceback.print_exc()
            r = {
                "model": name,
                "size": "-",
                "params_m": vafunc.get_entry(name).params / 1e6,
                "max_abs": float("nan"),
                "rel": float("nan"),
                "scale": float("nan"),
                "depends_on_input": False,
                "seconds": float("nan"),
                "ok": False,
                "note": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
            }
        rows.append(r)
        log(f"parity {i + 1}/{len(order)} {name}: rel {r['rel']:.2e} {'ok' if r['ok'] else 'FAIL'} {r['note']}")
        gc.collect()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return rows, skipped


# ----------------------------------------------------------------------------------- speed


def bench_ensemble(device, members: int, batch: int, size: int, reps: int) -> list:
    import torchvision

    from benchmarks.research import _timed

    torch.manual_seed(0)
    model = vafunc.get_model("resnet18")
    tvs = [torchvision.models.resnet18().to(device).eval() for _ in range(members)]
    flats = [vafunc.from_state_dict(model, m.state_dict()) for m in tvs]
    params = vafunc.stack([p for p, _ in flats])
    state = vafunc.stack([s for _, s in flats])
    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    with torch.no_grad():
        loop = _timed(lambda: torch.stack([m(x) for m in tvs]), device)
        for method in ("auto", "batched", "loop", "vmap"):
            fn = _timed(lambda method=method: vafunc.ensemble_apply(model, params, state, x, method=method), device)
            rows.append(compare(f"resnet18 ensemble x{members} eval {method} b{batch}@{size}", fn, loop, reps=reps))
        user = torch.vmap(lambda p, s: model.apply(p, s, x)[0])
        rows.append(
            compare(
                f"resnet18 ensemble x{members} eval user torch.vmap(model.apply) b{batch}@{size}",
                _timed(lambda: user(params, state), device),
                loop,
                reps=reps,
            )
        )
    return rows


def bench_psg(device, batch: int, size: int, sweep, reps: int) -> tuple[list, dict | None]:
    from benchmarks import research

    rows = research.per_sample("resnet18", batch, size, reps, device=device)
    rows += research.per_sample_opacus("resnet18", batch, size, reps, device=device)
    rows += [p for _, p in research.psg_sweep("resnet18", sweep, size, reps, device=device, skip=(batch,))]
    agree = (
        research.opacus_agreement("resnet18", min(batch, 8), size, device=device) if research.have_opacus() else None
    )
    return rows, agree


# ----------------------------------------------------------------------------------- report


def _g(v, fmt="{:.2e}"):
    return "-" if v != v else fmt.format(v)  # NaN


def markdown(info: dict, parity_rows, skipped, tol, speed: dict, agree) -> str:
    lines = [
        f"# vafunc on {info['device']}",
        "",
        f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, Python {info['python']}; "
        f"{info['date']}; `{info['command']}` ({info['seconds']:.0f}s).",
        "",
    ]
    if parity_rows or skipped:
        n_ok = sum(r["ok"] for r in parity_rows)
        lines += [
            "## Parity with the oracles",
            "",
            f"Eval mode, float32, TF32 off (`torch.backends.cuda.matmul.allow_tf32 = False`, "
            f"`torch.backends.cudnn.allow_tf32 = False`); random weights perturbed away from their init "
            f"values, BatchNorm statistics calibrated; 2 images. *rel* is the largest absolute logit "
            f"difference over the largest absolute reference logit; pass: rel <= {tol:g} and the reference "
            f"output depends on the input. {n_ok}/{len(parity_rows)} pass"
            + (f"; {len(skipped)} skipped (time budget): {', '.join(skipped)}" if skipped else "")
            + ".",
            "",
            "| model | params (M) | input | max abs diff | max abs logit | rel | pass | s | note |",
            "|---|---:|---|---:|---:|---:|---|---:|---|",
        ]
        for r in parity_rows:
            lines.append(
                f"| {r['model']} | {r['params_m']:.1f} | {r['size']} | {_g(r['max_abs'])} | "
                f"{_g(r['scale'], '{:.3g}')} | {_g(r['rel'])} | {'yes' if r['ok'] else '**no**'} | "
                f"{_g(r['seconds'], '{:.1f}')} | {r['note']} |"
            )
        lines.append("")
    for title, pairs in speed.items():
        lines += [
            f"## {title}",
            "",
            "Side by side in one process, alternating, after warm-up (on CUDA, `torch.cuda.synchronize()` "
            "inside each timed call); ratio: median of the per-repetition baseline/vafunc ratios (>1: vafunc faster).",
            "",
            "| case | vafunc ms | baseline ms | ratio (IQR) | reps |",
            "|---|---:|---:|---:|---:|",
        ]
        for p in pairs:
            lines.append(
                f"| {p.label} | {p.median_a_ms:.2f} | {p.median_b_ms:.2f} | {p.ratio:.2f} "
                f"({p.ratio_q1:.2f}-{p.ratio_q3:.2f}) | {p.reps} |"
            )
        lines.append("")
        if title.startswith("Per-sample"):
            lines.append(
                "Baselines: a Python loop of single-sample backward passes through the torchvision module "
                "holding the same weights (keeping each sample's gradients; for the norms, their norms; for "
                "the DP-SGD step, clip + sum + noise + SGD); *vs Opacus*: Opacus' `GradSampleModule` "
                "(hooks) for per-sample gradients, `GradSampleModuleFastGradientClipping` (ghost clipping) "
                "for norms and the DP-SGD step, on the GroupNorm ResNet-18."
            )
            if agree is not None:
                lines.append(
                    f"Values against Opacus {agree['version']} (b{agree['batch']}@{agree['size']}, GroupNorm "
                    f"ResNet-18): per-sample gradients differ by at most {agree['grads_rel']:.1e} "
                    f"(||diff|| / ||opacus||, worst parameter), norms by {agree['norms_rel']:.1e} "
                    f"(worst sample)."
                )
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="all", help="comma-separated model names for the parity table, or 'all'")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: inputs of 64 where the model allows, psg batch 8 and sweep 4,8, ensemble x4, 2 reps",
    )
    p.add_argument("--tol", type=float, default=None, help="parity tolerance on rel (default 1e-4 CUDA, 1e-5 CPU)")
    p.add_argument("--budget", type=float, default=180.0, help="seconds for the parity checks before skipping the rest")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 10; --quick 2)")
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu.md"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); nothing measured, nothing "
            "written. Run it on a GPU machine, or `--device cpu --quick` for a smoke run of the script."
        )
        return 0
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": the current device (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    tol = args.tol if args.tol is not None else (1e-4 if device.type == "cuda" else 1e-5)
    reps = args.reps or (2 if args.quick else 10)
    import platform

    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    log(f"{info['device']}, torch {info['torch']}")

    names = vafunc.list_models() if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        vafunc.get_entry(n)  # unknown names fail now
    names = [n for n in names if vafunc.get_entry(n).reference is not None]
    parity_rows, skipped = ([], []) if args.no_parity else run_parity(names, device, args.quick, tol, args.budget)

    speed, agree = {}, None
    if not args.no_speed:
        members, batch, sweep = (4, 8, (4, 8)) if args.quick else (16, 32, (8, 16, 32, 64))
        log("ensemble")
        speed[f"Ensemble: resnet18 x{members}, batch 8 @32, eval"] = bench_ensemble(device, members, 8, 32, reps)
        log("per-sample gradients")
        speed[f"Per-sample gradients: resnet18 @32, batch {batch} (sweep {', '.join(map(str, sweep))})"], agree = (
            bench_psg(device, batch, 32, sweep, reps)
        )
        if agree is not None:
            import opacus

            agree["version"] = opacus.__version__
    info["seconds"] = time.perf_counter() - t_start
    md = markdown(info, parity_rows, skipped, tol, speed, agree)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, args.out)
    print(md)
    log(f"wrote {args.out}")
    fails = [r["model"] for r in parity_rows if not r["ok"]]
    if fails:
        log(f"parity failures: {', '.join(fails)}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
