"""``python -m benchmarks [eager] --models resnet18 resnet50 --batch 8 --size 224``

Eager inference, vafunc ``apply`` against the torchvision module holding the same weights, in
one process, alternating; prints a markdown table of medians and paired ratios (>1: vafunc is
faster) and appends the rows to ``benchmarks/results/eager.csv``.
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
    entry = vafunc.get_entry(name)
    ref = entry.reference
    if ref is None or ref.source != "torchvision":
        raise SystemExit(f"{name}: no torchvision reference to compare with")
    import torchvision

    return getattr(torchvision.models, ref.builder)(**dict(ref.kwargs)).eval()


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", default="eager", choices=["eager"])
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
    print("| model | batch x size | vafunc ms (median) | torchvision ms (median) | ratio tv/vafunc (IQR) |")
    print("|---|---|---:|---:|---:|")
    rows = bench_eager(args)
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
