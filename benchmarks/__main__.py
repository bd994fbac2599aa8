"""``python -m benchmarks {eager,ensemble,train,psg} [--models ...] [--batch B] [--size S]``

``python -m benchmarks report`` writes the full report (see :mod:`benchmarks.report`);
``python -m benchmarks profile --model resnet50`` shows where the time goes.

* ``eager``: inference, vafunc ``apply`` against the torchvision module holding the same weights;
* ``ensemble``: ``ensemble_apply`` (loop, vmap) and ``torch_compat.compile_ensemble`` against a
  Python loop over N torchvision modules (``--members``);
* ``train``: the functional train step against module + ``loss.backward()`` + ``torch.optim.SGD``;
* ``psg``: ``per_sample_grads`` against a loop of single-sample backward passes.

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
                name,
                lambda: model.apply(params, state, x),
                lambda: ref(x),
                warmup=args.warmup,
                reps=args.reps,
            )
        row = {"bench": "eager", "model": name, "batch": args.batch, "size": size, **pair.row()}
        rows.append(row)
        print(f"| {name} | {args.batch}x{size} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
              f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |", flush=True)
    return rows


def bench_research(args) -> list[dict]:
    from benchmarks import research

    rows = []
    for name in args.models:
        if args.bench == "ensemble":
            pairs = research.ensemble(name, args.members, args.batch, args.size, train=False, reps=args.reps,
                                      compiled=not args.no_compile)
            pairs += research.ensemble(name, args.members, args.batch, args.size, train=True, reps=args.reps,
                                       compiled=False)
        elif args.bench == "train":
            pairs = research.train_step(name, args.batch, args.size, args.reps)
        else:
            pairs = research.per_sample(name, args.batch, args.size, args.reps)
        for pair in pairs:
            rows.append({"bench": args.bench, "model": name, "batch": args.batch, "size": args.size, **pair.row()})
            print(f"| {pair.label} | {args.batch}x{args.size} | {pair.median_a_ms:.1f} | {pair.median_b_ms:.1f} | "
                  f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |", flush=True)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from benchmarks import report

        return report.main(argv[1:])
    if argv[:1] == ["profile"]:
        from benchmarks import profile

        return profile.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", default="eager", choices=["eager", "ensemble", "train", "psg"])
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--no-compile", action="store_true", help="ensemble: skip the compiled path")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    print("| case | batch x size | vafunc ms (median) | torchvision ms (median) | ratio tv/vafunc (IQR) |")
    print("|---|---|---:|---:|---:|")
    if args.bench == "eager":
        rows = bench_eager(args)
    else:
        rows = bench_research(args)
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
