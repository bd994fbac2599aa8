"""bf16 compiled inference with and without ``fold_norm``: ``python -m benchmarks.fold_norm
[--models ...] [--batch 8] [--size 224] [--threads 2]``.

Three functions on the same calibrated weights, timed round-robin in one process:

* ``ref bf16``: the reference module, ``.to(torch.bfloat16)``, channels_last, ``torch.compile``
  with inductor freezing (which folds BatchNorm into the bf16 conv weights);
* ``vafunc bf16``: ``vafunc.compile(model, params, state, dtype=torch.bfloat16)``, BatchNorm kept
  in float32 after each bf16 conv (the default: the better agreement with float32);
* ``vafunc bf16 fold``: the same with ``fold_norm=True``, BatchNorm folded into the conv weights
  in float32 and cast once.

Prints paired median ratios (>1: faster than the reference) and appends them to
``benchmarks/results/fold_norm.csv``. ``python -m benchmarks.lite_bf16 --compiled`` measures what
the fold does to the top-1 agreement on the trained EfficientNet-Lite0.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import vafunc
from benchmarks.harness import append_rows, compare_many, fix_malloc_thresholds, machine_info, paired_ratio

RESULTS = os.path.join(os.path.dirname(__file__), "results", "fold_norm.csv")
DEFAULT_MODELS = ("shufflenet_v2_x0_5", "regnet_x_400mf", "efficientnet_lite0")


def measure(name: str, *, batch: int, size: int, reps: int, min_seconds: float) -> dict:
    from benchmarks.__main__ import reference_module
    from benchmarks.photos import photo_crops, realistic_random
    from benchmarks.report import _compile_module

    model = vafunc.get_model(name)
    ref = reference_module(name)
    realistic_random(ref, photo_crops(size)[::3])
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    x = torch.randn(batch, 3, size, size)
    fns = {"ref bf16": _compile_module(ref, torch.bfloat16)}
    fns["ref bf16"](x)
    fns["vafunc bf16"] = vafunc.compile(model, params, state, dtype=torch.bfloat16, example=x)
    fns["vafunc bf16 fold"] = vafunc.compile(model, params, state, dtype=torch.bfloat16, fold_norm=True, example=x)
    with torch.no_grad():
        full = model.apply(params, state, x)[0]
        err = {k: float((fns[k](x) - full).abs().max()) / float(full.abs().max()) for k in fns}
        res = compare_many(
            {k: (lambda f=f: f(x)) for k, f in fns.items()}, "ref bf16", warmup=2, reps=reps, min_seconds=min_seconds
        )
    return {
        "model": name,
        "batch": batch,
        "size": size,
        **{f"{k} ms": round(v["ms"], 3) for k, v in res.items()},
        "vafunc bf16 vs ref bf16": round(res["vafunc bf16"]["ratio"], 3),
        "fold vs ref bf16": round(res["vafunc bf16 fold"]["ratio"], 3),
        "fold vs vafunc bf16": round(paired_ratio(res, "vafunc bf16 fold", "vafunc bf16"), 3),
        **{f"{k} max rel err": f"{v:.2e}" for k, v in err.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--min-seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fix_malloc_thresholds()
    info = machine_info()
    rows = []
    print("| model | vafunc bf16 vs ref bf16 | fold vs ref bf16 | fold vs vafunc bf16 |\n|---|---:|---:|---:|")
    for name in args.models:
        r = measure(name, batch=args.batch, size=args.size, reps=args.reps, min_seconds=args.min_seconds)
        print(
            f"| {name} | {r['vafunc bf16 vs ref bf16']:.2f} | {r['fold vs ref bf16']:.2f} "
            f"| {r['fold vs vafunc bf16']:.2f} |",
            flush=True,
        )
        rows.append(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "cpu": info["cpu"],
                "threads": args.threads,
                "torch": torch.__version__,
                **r,
            }
        )
    if not args.no_write and rows:
        append_rows(RESULTS, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
