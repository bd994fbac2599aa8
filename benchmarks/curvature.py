"""``python -m benchmarks curvature``: Hessian / GGN products, the top eigenvalue, the trace and the
NTK against the established tools, side by side in one process (paired medians, ratios > 1: vafunc
is faster).

* ``--part products``: one product on resnet18 (eval, batch ``--batch`` @ ``--size``, 10 classes):
  vafunc's ``hvp`` (reverse over reverse with the batch's graph kept, on a tree and on flat
  vectors; the same with the graph
  rebuilt per product; forward over reverse) and ``ggn_vp`` against PyHessian's double backward
  (graph reused / rebuilt, ``cuda=False``), ``jvp(grad)`` written by hand, and curvlinops'
  ``HessianLinearOperator`` / ``GGNLinearOperator`` on torchvision's module with the same weights.
* ``--part eigen``: the top eigenvalue by ``hessian_eigenvalues`` (Lanczos) against PyHessian's
  power iteration (``tol=1e-3``): products, seconds and the value, against a tight reference.
* ``--part ntk``: ``vafunc.ntk.ntk`` (full mode) against the torch.func NTK tutorial's two methods
  on the tutorial's own CNN (its ``--ntk-cnn`` 20 x 5 images @ 32) and on resnet18, 10 classes,
  2 x ``--ntk-small`` images; then resnet18 at 2 x ``--ntk-large`` images (where the tutorial's
  Jacobians do not fit) per mode, each in a fresh process for its time and peak RSS.

Rows are appended to ``benchmarks/results/curvature.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time

import torch
from torch.nn.functional import cross_entropy

import vafunc
from benchmarks.harness import compare_many, machine_info
from vafunc import curvature
from vafunc.ntk import ntk


def _resnet18(batch: int, size: int, seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    module = torchvision.models.resnet18(num_classes=10).eval()
    model = vafunc.get_model("resnet18", num_classes=10)
    params, state = vafunc.from_state_dict(model, module.state_dict())
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return module, model, params, state, x, y


def _row(rows, part, label, ms, ratio=None, note=""):
    rows.append({"part": part, "label": label, "ms": round(ms, 2), "ratio": ratio, "note": note})
    r = "" if ratio is None else f"{ratio:.2f}"
    print(f"| {part} | {label} | {ms:.1f} | {r} | {note} |", flush=True)


def products(args, rows) -> None:
    module, model, params, state, x, y = _resnet18(args.batch, args.size)
    plist = list(module.parameters())
    v = torch.randn(sum(p.numel() for p in plist))
    keep = curvature.CurvatureOperator(model, params, state, [(x, y)], cross_entropy)
    fresh = curvature.CurvatureOperator(model, params, state, [(x, y)], cross_entropy, keep_graphs=False)
    fwd = curvature.CurvatureOperator(model, params, state, [(x, y)], cross_entropy, method="forward")
    ggn = curvature.CurvatureOperator(model, params, state, [(x, y)], cross_entropy, kind="ggn")
    v_tree = keep.unflatten(v)
    fns = {
        "hvp (graph kept)": lambda: keep.matvec(v),
        "hvp tree (graph kept)": lambda: keep(v_tree),
        "hvp (graph rebuilt)": lambda: fresh.matvec(v),
        "hvp (forward over reverse)": lambda: fwd.matvec(v),
        "ggn_vp (graph kept)": lambda: ggn.matvec(v),
    }
    vt = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in plist]), plist)]

    def jvp_grad():
        def loss(p):
            return cross_entropy(torch.func.functional_call(module, p, (x,)), y)

        prm = dict(module.named_parameters())
        return torch.func.jvp(torch.func.grad(loss), (prm,), (dict(zip(prm, vt)),))

    fns["jvp(grad), by hand"] = jvp_grad
    try:
        import pyhessian

        ph = pyhessian.hessian(module, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        fns["PyHessian (graph reused)"] = lambda: torch.autograd.grad(ph.gradsH, ph.params, vt, retain_graph=True)

        def ph_fresh():
            module.zero_grad()
            h = pyhessian.hessian(module, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            return torch.autograd.grad(h.gradsH, h.params, vt)

        fns["PyHessian (graph rebuilt)"] = ph_fresh
    except ImportError:
        print("(PyHessian not installed: pip install pyhessian)")
    try:
        import curvlinops

        data, ce = [(x, y)], torch.nn.CrossEntropyLoss()
        ch = curvlinops.HessianLinearOperator(module, ce, plist, data, check_deterministic=False)
        cg = curvlinops.GGNLinearOperator(module, ce, plist, data, check_deterministic=False)
        fns["curvlinops HessianLinearOperator"] = lambda: ch @ v
        fns["curvlinops GGNLinearOperator"] = lambda: cg @ v
    except ImportError:
        print("(curvlinops not installed: pip install curvlinops-for-pytorch)")
    if args.skip_variants:  # only the pairs with goals
        for name in ("hvp (graph rebuilt)", "hvp (forward over reverse)", "jvp(grad), by hand"):
            fns.pop(name, None)
        fns.pop("PyHessian (graph rebuilt)", None)
    res = compare_many(fns, "hvp (graph kept)", warmup=1, reps=args.reps)
    for name, r in res.items():
        _row(rows, "products", name, r["ms"], None)
    pairs = [
        ("hvp tree (graph kept)", "PyHessian (graph reused)", ">= 1.0"),
        ("hvp (graph kept)", "PyHessian (graph reused)", "flat vectors"),
        ("hvp (graph kept)", "curvlinops HessianLinearOperator", ">= 1.5"),
        ("hvp (graph kept)", "hvp (forward over reverse)", ""),
        ("hvp (graph rebuilt)", "PyHessian (graph rebuilt)", ""),
        ("ggn_vp (graph kept)", "curvlinops GGNLinearOperator", ">= 1.5"),
    ]
    from benchmarks.harness import paired_ratio

    for a, b, goal in pairs:
        if a in res and b in res:
            _row(
                rows,
                "products",
                f"{a} vs {b}",
                res[a]["ms"],
                paired_ratio(res, a, b),
                f"goal {goal}" if goal.startswith(">=") else goal,
            )


def eigen(args, rows, runs: int = 3) -> None:
    """The top eigenvalue to 1e-3 relative: ``hessian_eigenvalues`` against PyHessian's power
    iteration, each timed from the call (PyHessian: from building its ``hessian`` object, which
    runs the batch's forward and first backward, as vafunc's first product does), ``runs``
    alternating runs, medians."""
    import statistics

    module, model, params, state, x, y = _resnet18(args.batch, args.size)
    tight = curvature.hessian_eigenvalues(model, params, state, [(x, y)], cross_entropy, tol=1e-7, progress=False)
    ref = float(tight.values[0])
    try:
        import pyhessian
    except ImportError:
        pyhessian = None
    count = {"n": 0}
    if pyhessian is not None:
        ph_mod = sys.modules["pyhessian.hessian"]  # the module (the package exports the class under its name)
        inner = ph_mod.hessian_vector_product

        def counted(*a, **kw):
            count["n"] += 1
            return inner(*a, **kw)

        ph_mod.hessian_vector_product = counted
    ours, theirs = [], []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            top = curvature.hessian_eigenvalues(model, params, state, [(x, y)], cross_entropy, tol=1e-3, progress=False)
            ours.append(time.perf_counter() - t0)
            if pyhessian is None:
                continue
            torch.manual_seed(0)
            count["n"] = 0
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            ph = pyhessian.hessian(module, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            (val,), _ = ph.eigenvalues(maxIter=100, tol=1e-3)
            theirs.append(time.perf_counter() - t0)
            del ph
    finally:
        if pyhessian is not None:
            ph_mod.hessian_vector_product = inner
    err = abs(float(top.values[0]) - ref) / abs(ref)
    t_ours = statistics.median(ours)
    note = f"{top.products} products, rel err {err:.1e}, median of {runs}"
    _row(rows, "eigen", "hessian_eigenvalues k=1 tol=1e-3", 1e3 * t_ours, None, note)
    if pyhessian is None:
        return
    t_ph = statistics.median(theirs)
    err_ph = abs(val - ref) / abs(ref)
    note = f"{count['n']} products, rel err {err_ph:.1e}, median of {runs}"
    _row(rows, "eigen", "PyHessian power iteration tol=1e-3", 1e3 * t_ph, t_ph / t_ours, note)


def _tutorial_cnn():
    """The torch.func NTK tutorial's network as an ``nn.Module`` and as a vafunc model with the same
    weights (:mod:`benchmarks.ntk_tutorial`, tests/test_ntk.py's oracle)."""
    from benchmarks.ntk_tutorial import CNN, TutorialCNN

    torch.manual_seed(0)
    module = TutorialCNN().eval()
    params, state = vafunc.from_state_dict(CNN, module.state_dict())
    return module, CNN, params, state


def _ntk_child(mode: str, n: int, chunk: int | None) -> None:
    _, model, params, state, _, _ = _resnet18(1, 32)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)
    t0 = time.perf_counter()
    k = ntk(model, params, state, x1, x2, mode=mode, chunk=chunk)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"RESULT {dt:.2f} {peak:.2f} {list(k.shape)}", flush=True)


def _tutorial(module, x1, x2):
    """The tutorial's two methods (full mode), as tests/test_ntk.py runs them."""
    from benchmarks.ntk_tutorial import ntk_jacobian_contraction, ntk_vector_products

    params = {k: v.detach() for k, v in module.named_parameters()}
    return (
        lambda: ntk_jacobian_contraction(module, params, x1, x2, ["full"])["full"],
        lambda: ntk_vector_products(module, params, x1, x2, "full"),
    )


def _ntk_case(rows, label, module, model, params, state, x1, x2, reps) -> None:
    from benchmarks.harness import paired_ratio

    contraction, prods = _tutorial(module, x1, x2)
    fns = {
        "ntk full": lambda: ntk(model, params, state, x1, x2),
        "tutorial: Jacobian contraction": contraction,
        "tutorial: NTK-vector products": prods,
    }
    res = compare_many(fns, "ntk full", warmup=1, reps=reps)
    for name, r in res.items():
        ratio = None if name == "ntk full" else paired_ratio(res, "ntk full", name)
        _row(rows, "ntk", f"{name}, {label}", r["ms"], ratio)
    faster = min(list(fns)[1:], key=lambda n: res[n]["ms"])
    _row(
        rows,
        "ntk",
        f"ntk full vs the faster tutorial method ({faster.split(': ')[1]}), {label}",
        res["ntk full"]["ms"],
        paired_ratio(res, "ntk full", faster),
        "goal >= 2",
    )


def ntk_bench(args, rows) -> None:
    g = torch.Generator().manual_seed(1)
    module, model, params, state = _tutorial_cnn()
    n1, n2 = args.ntk_cnn
    x1, x2 = torch.randn(n1, 3, 32, 32, generator=g), torch.randn(n2, 3, 32, 32, generator=g)
    _ntk_case(rows, f"tutorial CNN, {n1} x {n2} @32", module, model, params, state, x1, x2, args.ntk_reps)
    module, model, params, state, _, _ = _resnet18(1, 32)
    n = args.ntk_small
    x1, x2 = torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)
    _ntk_case(rows, f"resnet18, 2 x {n} @32", module, model, params, state, x1, x2, args.ntk_reps)
    for mode in args.ntk_modes:
        cmd = [sys.executable, "-m", "benchmarks", "curvature", "--ntk-child", mode, str(args.ntk_large)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        line = [s for s in out.stdout.splitlines() if s.startswith("RESULT")]
        if not line:
            print(out.stderr[-2000:])
            continue
        _, dt, peak, shape = line[0].split(" ", 3)
        _row(
            rows,
            "ntk",
            f"ntk {mode}, resnet18, 2 x {args.ntk_large} @32 (fresh process)",
            1e3 * float(dt),
            None,
            f"peak RSS {peak} GiB (goal <= 8), {shape}",
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks curvature", description=__doc__)
    p.add_argument("--part", nargs="+", default=["products", "eigen", "ntk"], choices=["products", "eigen", "ntk"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--ntk-small", type=int, default=4, help="images per side of the case the tutorial fits")
    p.add_argument("--ntk-cnn", nargs=2, type=int, default=[20, 5], help="images per side, tutorial CNN")
    p.add_argument("--ntk-large", type=int, default=64, help="images per side of the case it does not")
    p.add_argument("--ntk-modes", nargs="*", default=["full", "trace", "diagonal"], help="none: skip the large case")
    p.add_argument("--skip-variants", action="store_true", help="products: only the pairs that have goals")
    p.add_argument("--ntk-reps", type=int, default=3)
    p.add_argument("--ntk-child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ntk_child:
        _ntk_child(args.ntk_child[0], int(args.ntk_child[1]), None)
        return 0
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    print("| part | case | ms (median) | ratio (other / vafunc) | note |")
    print("|---|---|---:|---:|---|")
    rows: list[dict] = []
    for part in args.part:
        {"products": products, "eigen": eigen, "ntk": ntk_bench}[part](args, rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "curvature.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "batch", "size", *rows[0].keys(), *info.keys()])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch, "size": args.size, **r, **info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
