"""Where the time goes: ``python -m benchmarks profile --model resnet50 [--dtype bf16] [--eager]``.

Runs ``vafunc.compile`` (or eager ``apply``) under ``torch.profiler`` and prints the operators that
take the most self time, grouped into convolutions/matmuls (oneDNN, MKL), inductor's generated
kernels and everything else, with the achieved GFLOP/s against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import vafunc
from benchmarks.harness import matmul_peak
from benchmarks.report import flops_per_image


def classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("convolution", "conv2d", "mkldnn", "linear", "addmm", "mm", "matmul", "onednn")):
        return "conv / matmul"
    if "cpp_fused" in n or "kernel" in n or "graph_" in n:
        return "generated kernels"
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--eager", action="store_true", help="profile eager apply instead of vafunc.compile")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    model = vafunc.get_model(args.model)
    params, state = model.init(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    if args.eager:
        cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t
        p_, s_ = vafunc.tree_map(cast, params), vafunc.tree_map(cast, state)
        xx = cast(x)

        def fn():
            with torch.no_grad():
                return model.apply(p_, s_, xx)[0]
    else:
        f = vafunc.compile(model, params, state, dtype=dtype, example=x)

        def fn():
            return f(x)

    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            fn()
    wall = (time.perf_counter() - t0) / args.reps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[classify(e.key)] = groups.get(classify(e.key), 0.0) + e.self_cpu_time_total
    flops = flops_per_image(model, params, state, args.size) * args.batch
    peak = matmul_peak(torch.bfloat16 if dtype is not None else torch.float32)
    print(
        f"{args.model} b{args.batch}@{args.size} {args.dtype} {'eager' if args.eager else 'compiled'}: "
        f"{1e3 * wall:.1f} ms per call (profiled), {flops / wall / 1e9:.0f} GFLOP/s = "
        f"{flops / wall / 1e9 / peak:.0%} of the measured {peak:.0f} GFLOP/s matmul peak"
    )
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<18} {t / total:6.1%} of self time")
    print(f"  top {args.top} operators by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"    {e.self_cpu_time_total / total:6.1%}  {e.count // args.reps:4d}x  {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
