"""``python -m benchmarks compat [--models ...] [--batch B] [--sizes 224 32] [--compiled] [--before REV]``

torch_compat's module tree against the reference module with the same weights, side by side in
one process (paired medians, >1: the compat module is faster):

* ``compat``: the compat module eager against the reference module eager;
* ``apply``: the pure ``apply`` of this checkout against the ``apply`` of ``--before`` (a git
  revision; default ``bfa5c06``, the last commit before the module trees), loaded from git into a
  package of its own (``vafunc_before``, its ``torch.library`` namespace renamed);
* ``compiled`` (with ``--compiled``): ``torch.compile`` of the compat module against
  ``torch.compile`` of the reference (default mode, each compiled once before timing).

All under ``torch.inference_mode``. Rows go to ``benchmarks/results/compat.csv``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

import torch_compat
import vafunc
from benchmarks.harness import append_rows, compare, machine_info

DEFAULT_MODELS = [
    "convnext_tiny",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "seresnet50",
    "efficientnet_lite0",
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "vit_b_32",
    "swin_t",
]


def vafunc_before(rev: str):
    """The ``vafunc`` package of git revision ``rev`` as the package ``vafunc_before`` (written to a
    temporary folder; its custom operators live in the ``vafunc_before`` namespace)."""
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(__file__),
    ).stdout.strip()
    files = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "vafunc"], capture_output=True, text=True, check=True, cwd=root
    ).stdout.split()
    out = tempfile.mkdtemp(prefix="vafunc_before_")
    for f in files:
        data = subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, check=True, cwd=root).stdout
        if f.endswith(".py"):  # its operators and its absolute imports in its own namespace
            data = data.replace(b"vafunc::", b"vafunc_before::")
            data = re.sub(rb"\b(from|import) vafunc\b", rb"\1 vafunc_before", data)
            data = re.sub(rb"\bvafunc\.(?=[a-z_])", b"vafunc_before.", data)
        path = os.path.join(out, "vafunc_before", f[len("vafunc/") :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    sys.path.insert(0, out)
    return importlib.import_module("vafunc_before")


def run(args) -> list[dict]:
    from benchmarks.__main__ import reference_module

    old = vafunc_before(args.before) if args.before else None
    rows = []
    for name in args.models:
        ref = reference_module(name)
        model = vafunc.get_model(name)
        params, state = vafunc.from_state_dict(model, ref.state_dict())
        compat = torch_compat.from_model(model, params, state).eval()
        for size in args.sizes:
            size = max(size, model.min_size)
            if getattr(model.config, "image_size", None) or name.startswith(("maxvit", "coatnet")):
                size = 224  # references built for one size
            x = torch.randn(args.batch, 3, size, size)
            cases = [] if args.apply_only else [("compat eager / reference eager", lambda: compat(x), lambda: ref(x))]
            if old is not None:
                om = old.get_model(name)
                op, os_ = old.from_state_dict(om, ref.state_dict())
                cases.append(
                    ("apply now / apply before", lambda: model.apply(params, state, x), lambda: om.apply(op, os_, x))
                )
            if args.compiled:
                cc, cr = torch.compile(compat), torch.compile(ref)
                with torch.inference_mode():
                    cc(x), cr(x)
                cases.append(("compat compiled / reference compiled", lambda: cc(x), lambda: cr(x)))
            for label, fa, fb in cases:
                with torch.inference_mode():
                    pair = compare(label, fa, fb, warmup=args.warmup, reps=args.reps, min_seconds=args.min_seconds)
                rows.append({"bench": "compat", "model": name, "batch": args.batch, "size": size, **pair.row()})
                print(
                    f"| {name} | {label} | {args.batch}x{size} | {pair.median_a_ms:.2f} | {pair.median_b_ms:.2f} | "
                    f"{pair.ratio:.3f} ({pair.ratio_q1:.3f}-{pair.ratio_q3:.3f}) |",
                    flush=True,
                )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks compat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=4.0, help="time each case for at least this long")
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--apply-only", action="store_true", help="only the apply now / apply before rows")
    p.add_argument("--before", default="bfa5c06", help="git revision for the apply row ('' to skip)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    print("| model | case | batch x size | vafunc ms | baseline ms | ratio baseline/vafunc (IQR) |")
    print("|---|---|---|---:|---:|---:|")
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    append_rows(
        os.path.join(args.out, "compat.csv"), [{"date": time.strftime("%Y-%m-%d %H:%M"), **r, **info} for r in rows]
    )
    return 0
