"""``python -m benchmarks {eager,ensemble,train,psg} [--models ...] [--batch B] [--size S]``

``python -m benchmarks report`` writes the full report (see :mod:`benchmarks.report`);
``python -m benchmarks compat`` times torch_compat's module trees (see :mod:`benchmarks.compat`);
``python -m benchmarks profile --model resnet50`` shows where the time goes.
``python -m benchmarks curvature`` times vafunc.curvature and vafunc.ntk (see :mod:`benchmarks.curvature`).

* ``eager``: inference, vafunc ``apply`` against the torchvision module holding the same weights;
* ``ensemble``: ``ensemble_apply`` by each lowering (auto, batched, loop, vmap), the user's own
  ``torch.vmap(model.apply)``, the floor (one model on the N*B batch), ``torch_compat.compile_ensemble``
  and the ensemble train step, against a Python loop over N torchvision modules (``--members``;
  10 classes);
* ``train``: the functional train step against module + ``loss.backward()`` + ``torch.optim.SGD``;
* ``vit``: the same transforms on timm's ViTs (:func:`bench_vit`; ``--members 16`` for the goals);
* ``psg``: ``per_sample_grads`` (fresh and ``out=``), ``per_sample_grad_norms``, one batched
  backward (the floor) and the DP-SGD step against a loop of single-sample backward passes through
  the torchvision module (resnet18 b32@32 by default); on the GroupNorm ResNet against Opacus
  (``pip install -e .[bench]``; skipped without it); a batch-size sweep (``--sweep``) plotted to
  ``<out>/psg.png``.

Side by side in one process, alternating, after warm-up; prints a markdown table of medians and
paired ratios (>1: vafunc is faster) and appends the rows to ``benchmarks/results/<bench>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

import vafunc
from benchmarks.harness import compare, machine_info


def reference_module(name: str) -> torch.nn.Module:
    """The oracle module (torchvision, timm or pretrainedmodels) with random weights, eval mode."""
    ref = vafunc.get_entry(name).reference
    if ref is None:
        raise SystemExit(f"{name}: no reference implementation to compare with")
    if ref.source == "torchvision":
        import torchvision

        return getattr(torchvision.models, ref.builder)(**dict(ref.kwargs)).eval()
    if ref.source == "timm":
        import timm

        return timm.create_model(ref.builder, pretrained=False).eval()
    import pretrainedmodels

    return getattr(pretrainedmodels, ref.builder)(pretrained=None).eval()


def bench_eager(args) -> list[dict]:
    rows = []
    for name in args.models:
        ref = reference_module(name)
        model = vafunc.get_model(name)
        params, state = vafunc.from_state_dict(model, ref.state_dict())
        size = max(args.size, model.min_size)
        x = torch.randn(args.batch, 3, size, size)
        with torch.inference_mode():
            pair = compare(
                name, lambda: model.apply(params, state, x), lambda: ref(x), warmup=args.warmup, reps=args.reps
            )
        row = {"bench": "eager", "model": name, "batch": args.batch, "size": size, **pair.row()}
        rows.append(row)
        print(
            f"| {name} | {args.batch}x{size} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
            f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |",
            flush=True,
        )
    return rows


def bench_research(args) -> list[dict]:
    from benchmarks import research

    rows = []
    for name in args.models:
        if args.bench == "ensemble":
            pairs = research.ensemble(
                name, args.members, args.batch, args.size, train=False, reps=args.reps, compiled=not args.no_compile
            )
            pairs += research.ensemble(
                name, args.members, args.batch, args.size, train=True, reps=args.reps, compiled=False
            )
            pairs += research.ensemble_train_step(name, args.members, args.batch, args.size, args.reps)
            counts = [int(n) for n in args.members_sweep.split(",") if n.strip()]
            if counts:
                swept = research.ensemble_sweep(name, counts, args.batch, args.size, args.reps)
                rows += [
                    {
                        "bench": "ensemble",
                        "model": name,
                        "batch": args.batch,
                        "size": args.size,
                        **{k: v for k, v in r.items() if k != "members"},
                    }
                    for r in swept
                ]  # the label names N
                os.makedirs(args.out, exist_ok=True)
                path = os.path.join(args.out, "ensemble.png")
                info = machine_info()
                if research.ensemble_plot(
                    swept,
                    path,
                    f"{name} b{args.batch}@{args.size}, eval, against a loop over "
                    f"torchvision modules\n{info['cpu']}, {info['threads']} "
                    f"threads, torch {info['torch']}",
                ):
                    print(f"wrote {path}", flush=True)
        elif args.bench == "train":
            pairs = research.train_step(name, args.batch, args.size, args.reps)
        for pair in pairs:
            rows.append({"bench": args.bench, "model": name, "batch": args.batch, "size": args.size, **pair.row()})
            print(
                f"| {pair.label} | {args.batch}x{args.size} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
                f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |",
                flush=True,
            )
    return rows


def bench_psg(args) -> list[dict]:
    from benchmarks import research

    rows = []

    def emit(pair, model, batch):
        rows.append({"bench": "psg", "model": model, "batch": batch, "size": args.size, **pair.row()})
        print(
            f"| {pair.label} | {batch}x{args.size} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
            f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |",
            flush=True,
        )

    sweep = [int(b) for b in args.sweep.split(",") if b.strip()] if args.sweep else []
    for name in args.models:
        for pair in research.per_sample(name, args.batch, args.size, args.reps, dp=not args.no_dp):
            emit(pair, name, args.batch)
        if not args.no_opacus:
            for pair in research.per_sample_opacus(name, args.batch, args.size, args.reps, dp=not args.no_dp):
                emit(pair, f"{name} norm=group", args.batch)
        for b, pair in research.psg_sweep(name, sweep, args.size, args.reps, skip=(args.batch,)):
            emit(pair, name, b)
    if not args.no_opacus and research.have_opacus():
        import opacus

        agree = research.opacus_agreement(args.models[0], min(args.batch, 8), args.size)
        print(
            f"\nvalues vs Opacus {opacus.__version__} ({args.models[0]} GroupNorm, b{agree['batch']}@{args.size}): "
            f"per-sample grads max rel diff {agree['grads_rel']:.1e} (worst parameter, ||diff|| / ||opacus||), "
            f"norms {agree['norms_rel']:.1e} (worst sample)",
            flush=True,
        )
    if sweep:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "psg.png")
        info = machine_info()
        plotted = [r for r in rows if r["model"] == args.models[0] and r["batch"] in sweep]
        if research.psg_plot(
            plotted,
            path,
            f"{args.models[0]} @{args.size}, per-sample gradients vs a loop of "
            f"single-sample backward passes\n{info['cpu']}, {info['threads']} "
            f"threads, torch {info['torch']}",
        ):
            print(f"wrote {path}", flush=True)
    return rows


def bench_vit(args) -> list[dict]:
    """The ViT rows (research_vit.vit_per_sample, research_vit.vit_ensemble): per-sample gradients and norms
    of a small ViT at 32x32 (patch 4) and DeiT-Tiny at 224, against the loop, one batched backward
    and Opacus; ensembles of 16 ViTs, members mode against the loop."""
    from benchmarks import research, research_vit

    rows = []
    which = tuple(args.vit_parts.split(","))
    psg = [w.removeprefix("psg-") for w in which if w.startswith("psg-")]
    ens = [w.removeprefix("ens-") for w in which if w.startswith("ens-")]
    pairs = research_vit.vit_per_sample(args.reps, which=psg, opacus=not args.no_opacus)  # (each printed as measured)
    pairs += research_vit.vit_ensemble(args.reps, members=args.members, which=ens)
    rows = [{"bench": "vit", "model": "timm_vit", **pair.row()} for pair in pairs]
    if not args.no_opacus and research.have_opacus() and "small" in psg:
        agree = research_vit.vit_opacus_agreement()
        print(f"\nvalues vs Opacus (small ViT b4@32): per-sample grads max rel diff {agree:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from benchmarks import report

        return report.main(argv[1:])
    if argv[:1] == ["compat"]:
        from benchmarks import compat

        return compat.main(argv[1:])
    if argv[:1] == ["profile"]:
        from benchmarks import profile

        return profile.main(argv[1:])
    if argv[:1] == ["curvature"]:
        from benchmarks import curvature

        return curvature.main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # report, compat and profile are dispatched above with their own options; listed here for --help
    p.add_argument(
        "bench",
        nargs="?",
        default="eager",
        choices=["eager", "ensemble", "train", "psg", "vit", "report", "compat", "profile", "curvature"],
        help="the benchmark (default eager); report: the full report, compat: torch_compat's "
        "module trees, profile: where the time goes, curvature: Hessian/GGN products, spectra and "
        "the NTK against PyHessian, curvlinops and the torch.func tutorial (each takes its own options: "
        "python -m benchmarks report --help)",
    )
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--no-compile", action="store_true", help="ensemble: skip the compiled path")
    p.add_argument("--models", nargs="+", default=None, help="default: resnet18 resnet50 (psg: resnet18)")
    p.add_argument("--batch", type=int, default=None, help="default: 8 (psg: 32)")
    p.add_argument("--size", type=int, default=None, help="default: 224 (psg: 32)")
    p.add_argument("--reps", type=int, default=None, help="default: 15 (psg: 5)")
    p.add_argument(
        "--sweep",
        default=",".join(map(str, (8, 16, 32, 64))),
        help="psg: batch sizes of the sweep plotted to <out>/psg.png ('' for none)",
    )
    p.add_argument(
        "--members-sweep",
        default="",
        help="ensemble: member counts of a sweep plotted to <out>/ensemble.png, e.g. 1,2,4,8,16,32",
    )
    p.add_argument("--no-opacus", action="store_true", help="psg, vit: skip the Opacus rows")
    p.add_argument(
        "--vit-parts",
        default="psg-small,ens-small,psg-224,ens-224",
        help="vit: which parts, in order (psg-small, ens-small, psg-224, ens-224)",
    )
    p.add_argument("--no-dp", action="store_true", help="psg: skip the DP-SGD step rows")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--malloc",
        choices=["default", "reuse"],
        default="default",
        help="'reuse': vafunc.serving.memory.set_malloc_thresholds() first, for both sides (glibc)",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    psg = args.bench == "psg"
    args.models = args.models or (["resnet18"] if psg else ["resnet18", "resnet50"])
    args.batch = args.batch or (32 if psg else 8)
    args.size = args.size or (32 if psg else 224)
    args.reps = args.reps or (5 if psg else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "reuse" and not vafunc.serving.memory.set_malloc_thresholds():
        p.error("--malloc reuse needs glibc")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, malloc {args.malloc}")
    print("| case | batch x size | vafunc ms (median) | torchvision ms (median) | ratio tv/vafunc (IQR) |")
    print("|---|---|---:|---:|---:|")
    if args.bench == "eager":
        rows = bench_eager(args)
    elif psg:
        print(
            "(psg baselines: a loop of single-sample backward passes through the torchvision module, or "
            "Opacus where the label says so)"
        )
        rows = bench_psg(args)
    elif args.bench == "vit":
        rows = bench_vit(args)
    else:
        rows = bench_research(args)
    if args.malloc != "default":  # the CSV's columns stay as they are: the label says it
        rows = [{**r, "label": f"{r['label']} (malloc {args.malloc})"} for r in rows]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.bench}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", *rows[0].keys(), *info.keys()])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"date": time.strftime("%Y-%m-%d %H:%M"), **r, **info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
