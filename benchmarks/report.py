"""The benchmark report: ``python -m benchmarks report``.

Per model, side by side in one process on the same weights (round-robin, warm-up, medians, paired
ratios against torchvision eager):

* images/s of the reference (torchvision, timm or Cadene) and of vafunc, eager and compiled
  (inductor freezing), contiguous and ``channels_last``, fp32 and bf16;
* peak memory of one inference call against the reference's, eager and compiled;
* the share of this machine's measured matmul peak of each dtype (FLOPs counted by
  ``torch.utils.flop_counter``, 2 per multiply-add);
* for bf16, agreement with fp32 on real photographs (scikit-image's samples, 10 crops each):
  top-1 agreement and the largest logit error relative to the largest fp32 logit.

Then an ensemble against a Python loop of modules, and the functional train step against the
``nn.Module`` path. Writes ``report.md``, ``report.csv`` and ``report.png`` to ``--out`` and, with
``--readme``, puts the markdown between the README's ``bench:start``/``bench:end`` markers.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import sys
import time

import torch

import vafunc
from benchmarks.harness import (
    compare_many,
    fix_malloc_thresholds,
    machine_info,
    matmul_peak,
    paired_ratio,
    peak_memory_mb,
)

SEEDS = (
    "alexnet",
    "vgg16",
    "vgg19",
    "googlenet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "inception_v2",
    "densenet121",
    "densenet169",
    "densenet201",
    "densenet264",
    "xception",
    "mobilenet_v1",
    "mobilenet_v2",
    "mnasnet1_0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    *(f"efficientnet_b{i}" for i in range(8)),
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "efficientnet_v2_l",
)
QUICK = (
    "alexnet",
    "vgg16",
    "googlenet",
    "resnet18",
    "resnet50",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mnasnet1_0",
    "efficientnet_b0",
)
SETS = {"quick": QUICK, "seeds": SEEDS}

#: a forward pass of about this many GFLOP per batch decides the batch size of large models
BATCH_BUDGET_GFLOP = 70.0


def log(msg: str, t0: float = [time.perf_counter()]) -> None:  # noqa: B006 - process start time
    print(f"[{time.perf_counter() - t0[0]:7.1f}s] {msg}", file=sys.stderr, flush=True)


def input_size(name: str) -> int:
    """The crop size of the model's default published checkpoint, else 224."""
    try:
        return vafunc.hub.get_weights(name, "DEFAULT").transforms().crop_size
    except (KeyError, ValueError, AttributeError):
        return max(224, vafunc.get_model(name).min_size)


def flops_per_image(model, params, state, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.in_channels, size, size)
    with torch.no_grad():
        model.apply(params, state, x)  # a model's first call probes its shapes once: not counted
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.apply(params, state, x)
    return float(fc.get_total_flops())


def _compile_module(mod: torch.nn.Module, dtype):
    mod = copy.deepcopy(mod).to(memory_format=torch.channels_last)
    if dtype is not None:
        mod = mod.to(dtype)
    compiled = torch.compile(mod)

    def run(x):
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            x = x.to(dtype) if dtype is not None else x
            return compiled(x.contiguous(memory_format=torch.channels_last)).float()

    return run


def _chunked(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``x`` in batches of exactly ``batch`` (the last one padded), so a compiled
    function sees one shape."""
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        n = len(xb)
        if n < batch:
            xb = torch.cat([xb, xb[:1].expand(batch - n, *xb.shape[1:])])
        outs.append(fn(xb)[:n].float())
    return torch.cat(outs)


def bench_model(name: str, args) -> dict:
    from benchmarks.__main__ import reference_module
    from benchmarks.photos import photo_crops, realistic_random

    model = vafunc.get_model(name)
    size = args.size or input_size(name)
    crops = photo_crops(size)
    ref = reference_module(name)
    realistic_random(ref, crops[::3])
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    flops = flops_per_image(model, params, state, size)
    batch = args.batch or max(1, min(8, int(BATCH_BUDGET_GFLOP * 1e9 // flops)))
    x = torch.randn(batch, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    params_cl = vafunc.tree_map(
        lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t, params
    )
    log(f"{name}: batch {batch} @ {size}, {flops / 1e9:.2f} GFLOP/img")

    fns = {
        "ref eager": lambda: ref(x),
        "vafunc eager": lambda: model.apply(params, state, x),
        "ref eager CL": lambda: ref_cl(x_cl),
        "vafunc eager CL": lambda: model.apply(params_cl, state, x_cl),
    }
    row = {
        "model": name,
        "reference": str(vafunc.get_entry(name).reference),
        "batch": batch,
        "size": size,
        "gflop_per_image": flops / 1e9,
    }
    compiled = {}
    if not args.no_compile:
        dtypes = [("", None)] + ([] if args.no_bf16 else [(" bf16", torch.bfloat16)])
        for suffix, dt in dtypes:
            t0 = time.perf_counter()
            compiled["vafunc compiled" + suffix] = vafunc.compile(model, params, state, dtype=dt, example=x)
            row["compile_s_vafunc" + suffix.replace(" ", "_")] = time.perf_counter() - t0
            t0 = time.perf_counter()
            f = _compile_module(ref, dt)
            f(x)
            compiled["ref compiled" + suffix] = f
            row["compile_s_ref" + suffix.replace(" ", "_")] = time.perf_counter() - t0
            tag = suffix.replace(" ", "_")
            log(
                f"{name}: compiled{suffix or ' fp32'} (vafunc {row['compile_s_vafunc' + tag]:.0f}s, "
                f"reference {row['compile_s_ref' + tag]:.0f}s)"
            )
        for k, f in compiled.items():
            fns[k] = lambda f=f: f(x)

    with torch.no_grad():
        res = compare_many(fns, "ref eager", warmup=1, reps=args.reps, min_seconds=args.min_seconds)
        for k, r in res.items():
            row[f"{k} img/s"] = 1e3 * batch / r["ms"]
            row[f"{k} vs ref eager"] = r["ratio"]
        # same-settings ratios, paired per repetition
        row["vafunc eager CL vs ref eager CL"] = paired_ratio(res, "vafunc eager CL", "ref eager CL")
        for suffix in ("", " bf16"):
            if f"vafunc compiled{suffix}" in res:
                row[f"vafunc compiled{suffix} vs ref compiled{suffix}"] = paired_ratio(
                    res, f"vafunc compiled{suffix}", f"ref compiled{suffix}"
                )
        gflops = flops * batch / 1e9
        for key, variant in (
            ("fp32 eager", "vafunc eager"),
            ("fp32 compiled", "vafunc compiled"),
            ("bf16 compiled", "vafunc compiled bf16"),
        ):
            if variant in res:
                row[f"GFLOP/s {key}"] = gflops / (res[variant]["ms"] / 1e3)
        summary = ", ".join(f"{k} {v['ratio']:.2f}" for k, v in res.items())
        log(f"{name}: timed ({summary})")

        # peak memory of one call, alternating, best of three
        mem = {k: [] for k in ("ref eager", "vafunc eager", "ref compiled", "vafunc compiled") if k in fns}
        for _ in range(3):
            for k in mem:
                mem[k].append(peak_memory_mb(fns[k]))
        for k, v in mem.items():
            row[f"{k} peak MiB"] = min(v)
        row["peak memory eager vs ref"] = row["vafunc eager peak MiB"] / max(row["ref eager peak MiB"], 1e-9)
        if "vafunc compiled" in mem:
            row["peak memory compiled vs ref"] = row["vafunc compiled peak MiB"] / max(
                row["ref compiled peak MiB"], 1e-9
            )

        # agreement on photographs: compiled fp32 and bf16 against vafunc eager fp32
        if compiled:
            full = _chunked(lambda b: model.apply(params, state, b)[0], crops, batch)
            ref_full = _chunked(ref, crops, batch)
            ref_top = ref_full.argmax(1)
            row["photos"] = len(crops)
            row["eager top-1 agrees with ref"] = float((full.argmax(1) == ref_top).float().mean())
            row["distinct top-1"] = int(full.argmax(1).unique().numel())
            scale = float(full.abs().max())
            for suffix in ("", " bf16"):
                f = compiled.get("vafunc compiled" + suffix)
                if f is None:
                    continue
                out = _chunked(f, crops, batch)
                row[f"top-1 agreement{suffix or ' fp32'}"] = float((out.argmax(1) == full.argmax(1)).float().mean())
                row[f"max rel logit error{suffix or ' fp32'}"] = float((out - full).abs().max()) / scale
                f = compiled.get("ref compiled" + suffix)
                if f is not None:  # what the same precision costs the reference
                    out = _chunked(f, crops, batch)
                    row[f"ref top-1 agreement{suffix or ' fp32'}"] = float((out.argmax(1) == ref_top).float().mean())
                    row[f"ref max rel logit error{suffix or ' fp32'}"] = float((out - ref_full).abs().max()) / float(
                        ref_full.abs().max()
                    )
    log(f"{name}: done")
    return row


def bench_research(args) -> list[dict]:
    from benchmarks import research

    rows = []
    name, members, size = "resnet18", 8, 64
    log(f"ensemble: {members} x {name} @ {size}")
    for p in research.ensemble(name, members, 8, size, train=False, reps=args.reps, compiled=not args.no_compile):
        rows.append(
            {
                "case": p.label,
                "vafunc ms": p.median_a_ms,
                "baseline ms": p.median_b_ms,
                "ratio": p.ratio,
                "baseline": f"loop over {members} torchvision modules",
            }
        )
    log("train step")
    for p in research.train_step(name, 16, size, args.reps):
        rows.append(
            {
                "case": p.label,
                "vafunc ms": p.median_a_ms,
                "baseline ms": p.median_b_ms,
                "ratio": p.ratio,
                "baseline": "torchvision module + backward + torch.optim.SGD",
            }
        )
    return rows


# ----------------------------------------------------------------------------------- outputs


def _f(v, fmt="{:.2f}"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


#: the issue's goals: (label, how to compute from the rows, goal, higher is better)
def _goal_rows(rows: list[dict]) -> list[tuple[str, str, float | None, str, bool]]:
    by = {r["model"]: r for r in rows}
    out = []

    def worst(key, hi=True):
        vals = [(_num(r.get(key)), r["model"]) for r in rows if _num(r.get(key)) is not None]
        if not vals:
            return None, ""
        v, m = (min if hi else max)(vals)
        return v, m

    v, m = worst("vafunc eager vs ref eager")
    out.append(("vafunc eager vs ref eager, every model (worst)", f"{m}", v, ">= 1.00", v is not None and v >= 1.0))
    r50 = by.get("resnet50", {})
    v = _num(r50.get("vafunc compiled vs ref eager"))
    out.append(("vafunc compiled fp32 vs ref eager, resnet50", "resnet50", v, ">= 1.80", v is not None and v >= 1.8))
    v, m = worst("vafunc compiled vs ref compiled")
    out.append(("vafunc compiled vs ref compiled, every model (worst)", m, v, ">= 1.00", v is not None and v >= 1.0))
    v = _num(r50.get("vafunc compiled bf16 vs ref eager"))
    out.append(
        ("vafunc compiled bf16 vs ref fp32 eager, resnet50", "resnet50", v, ">= 8.6", v is not None and v >= 8.6)
    )
    v = _num(r50.get("top-1 agreement bf16"))
    out.append(("bf16 top-1 agreement with fp32, resnet50", "resnet50", v, ">= 99%", v is not None and v >= 0.99))
    v = _num(r50.get("peak share fp32 eager"))
    out.append(("share of the fp32 matmul peak, resnet50 eager", "resnet50", v, ">= 45%", v is not None and v >= 0.45))
    v = _num(r50.get("peak share fp32 compiled"))
    out.append(
        ("share of the fp32 matmul peak, resnet50 compiled", "resnet50", v, ">= 45%", v is not None and v >= 0.45)
    )
    v = _num(r50.get("peak share bf16 compiled"))
    out.append(
        ("share of the bf16 matmul peak, resnet50 compiled", "resnet50", v, ">= 75%", v is not None and v >= 0.75)
    )
    v, m = worst("peak memory eager vs ref", hi=False)
    out.append(("peak memory vs ref, eager inference (worst)", m, v, "<= 1.00", v is not None and v <= 1.0))
    v, m = worst("peak memory compiled vs ref", hi=False)
    out.append(("peak memory vs ref, compiled inference (worst)", m, v, "<= 1.00", v is not None and v <= 1.0))
    return out


def _num(v):
    if v is None or v == "":
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def markdown(rows: list[dict], research_rows: list[dict], info: dict, command: str) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, Python {info['python']}; "
        f"measured matmul peak {info['peak_fp32']:.0f} GFLOP/s fp32 and {info['peak_bf16']:.0f} GFLOP/s bf16 "
        f"({info['date']}). Reproduce with `{command}`.",
        "",
        "Ratios are medians of paired, round-robin repetitions (>1: faster). *ref* is the reference "
        "implementation holding the same weights (torchvision; timm for xception and mobilenet_v1, Cadene's "
        "pretrainedmodels for inception_v2). *compiled* is `torch.compile` with inductor freezing and "
        "channels_last, for both. bf16 agreement is measured against vafunc's fp32 eager output on "
        "scikit-image's photographs (10 crops each) with calibrated random weights; in brackets, the same "
        "for the reference's own bf16 path against its fp32 output. Random weights have small top-1 margins "
        "(trained networks keep their top-1 far better in bf16), so read the agreement as a lower bound.",
        "",
        "| model | batch @ size | GFLOP/img | ref eager img/s | eager vs ref | eager CL vs ref CL "
        "| compiled vs ref eager | compiled vs ref compiled | bf16 compiled vs ref eager "
        "| bf16 vs ref bf16 compiled | bf16 top-1 agree (ref) | bf16 max rel err (ref) "
        "| fp32 peak share eager / compiled "
        "| bf16 peak share | peak mem vs ref eager / compiled |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} @ {r['size']} | {r['gflop_per_image']:.2f} "
            f"| {r['ref eager img/s']:.1f} | {_f(r.get('vafunc eager vs ref eager'))} "
            f"| {_f(r.get('vafunc eager CL vs ref eager CL'))} | {_f(r.get('vafunc compiled vs ref eager'))} "
            f"| {_f(r.get('vafunc compiled vs ref compiled'))} | {_f(r.get('vafunc compiled bf16 vs ref eager'))} "
            f"| {_f(r.get('vafunc compiled bf16 vs ref compiled bf16'))} "
            f"| {_f(r.get('top-1 agreement bf16'), '{:.0%}')} ({_f(r.get('ref top-1 agreement bf16'), '{:.0%}')}) "
            f"| {_f(r.get('max rel logit error bf16'), '{:.1e}')} "
            f"({_f(r.get('ref max rel logit error bf16'), '{:.1e}')}) "
            f"| {_f(r.get('peak share fp32 eager'), '{:.0%}')} / {_f(r.get('peak share fp32 compiled'), '{:.0%}')} "
            f"| {_f(r.get('peak share bf16 compiled'), '{:.0%}')} "
            f"| {_f(r.get('peak memory eager vs ref'))} / {_f(r.get('peak memory compiled vs ref'))} |"
        )
    lines += [
        "",
        "Goals (ratios on this machine, this run):",
        "",
        "| measure | model | measured | goal | met |",
        "|---|---|---:|---:|---|",
    ]
    for label, model, v, goal, met in _goal_rows(rows):
        pct = "%" in goal
        shown = "-" if v is None else (f"{v:.0%}" if pct else f"{v:.2f}")
        lines.append(f"| {label} | {model} | {shown} | {goal} | {'yes' if met else 'no'} |")
    if research_rows:
        lines += ["", "| research path | vafunc ms | baseline ms | ratio | baseline |", "|---|---:|---:|---:|---|"]
        for r in research_rows:
            lines.append(
                f"| {r['case']} | {r['vafunc ms']:.1f} | {r['baseline ms']:.1f} | {r['ratio']:.2f} | {r['baseline']} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.NullLocator below

    series = [
        ("vafunc eager vs ref eager", "eager vs ref eager"),
        ("vafunc compiled vs ref compiled", "compiled vs ref compiled"),
        ("vafunc compiled vs ref eager", "compiled fp32 vs ref eager"),
        ("vafunc compiled bf16 vs ref eager", "compiled bf16 vs ref eager"),
    ]
    series = [s for s in series if any(s[0] in r for r in rows)]
    names = [r["model"] for r in rows]
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(13, 0.45 * len(rows) + 2.8), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    h = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        vals = [r.get(key, float("nan")) for r in rows]
        ax.barh([j + i * h for j in range(len(rows))], vals, height=h, label=label)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ticks = [0.8, 1, 1.5, 2, 3, 4, 6, 8, 12]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_title("speed ratio (>1: vafunc faster), log scale", fontsize=9, loc="left")
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(rows))], names)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, frameon=False)
    fig.suptitle(
        f"vafunc vs reference, {info['cpu']}, {info['threads']} threads, torch {info['torch']}, {info.get('date', '')}",
        fontsize=10,
    )
    shares = [
        ("peak share fp32 eager", "fp32 eager"),
        ("peak share fp32 compiled", "fp32 compiled"),
        ("peak share bf16 compiled", "bf16 compiled"),
    ]
    shares = [s for s in shares if any(s[0] in r for r in rows)]
    h2 = 0.8 / len(shares)
    for i, (key, label) in enumerate(shares):
        ax2.barh(
            [j + i * h2 for j in range(len(rows))],
            [100 * r.get(key, float("nan")) for r in rows],
            height=h2,
            label=label,
        )
    ax2.set_title("% of the measured matmul peak of its dtype", fontsize=9, loc="left")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3, frameon=False)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def update_readme(readme: str, md: str) -> None:
    with open(readme) as f:
        text = f.read()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    _write_atomic(readme, f"{head}{start}\n{md}{end}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["quick"],
        help="model names, or a set: quick (10 models, default), seeds (the 30 seed models)",
    )
    p.add_argument("--batch", type=int, default=None, help="default: 8, less for large models (see the table)")
    p.add_argument("--size", type=int, default=None, help="default: the default checkpoint's crop size")
    p.add_argument("--reps", type=int, default=7, help="at least this many round-robin repetitions ...")
    p.add_argument("--min-seconds", type=float, default=30.0, help="... and more until this much time has passed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-research", action="store_true", help="skip the ensemble and train-step rows")
    p.add_argument("--quick-peak", action="store_true", help="a rough matmul peak (smoke runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "report"))
    p.add_argument("--readme", default=None, help="put the markdown table into this README's bench section")
    p.add_argument(
        "--render",
        default=None,
        metavar="DIR",
        help="only re-render DIR/report.md and report.png from DIR/report.csv (no measuring)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = []
    for m in args.models:
        names += list(SETS[m]) if m in SETS else [m]
    for n in names:
        vafunc.get_entry(n)  # unknown names fail now, with suggestions, not after an hour
    if args.render:
        return render(args.render, args.readme)
    fix_malloc_thresholds()
    command = "python -m benchmarks report " + " ".join(argv if argv is not None else sys.argv[2:])
    info = {**machine_info(), "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "command": command.strip()}
    log(f"machine: {info['cpu']}, {info['threads']} threads; measuring the matmul peak")
    peaks = {
        "fp32": [matmul_peak(torch.float32, quick=args.quick_peak)],
        "bf16": [matmul_peak(torch.bfloat16, quick=args.quick_peak)],
    }
    log(f"matmul peak: {peaks['fp32'][0]:.0f} GFLOP/s fp32, {peaks['bf16'][0]:.0f} GFLOP/s bf16")
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for i, n in enumerate(names):
        log(f"model {i + 1}/{len(names)}: {n}")
        rows.append(bench_model(n, args))
        _write_csv(os.path.join(args.out, "report.csv"), rows, info)  # partial results survive a crash
    research_rows = [] if args.no_research else bench_research(args)
    # the peak again at the end: a busy moment at the start would inflate every share
    peaks["fp32"].append(matmul_peak(torch.float32, quick=args.quick_peak))
    peaks["bf16"].append(matmul_peak(torch.bfloat16, quick=args.quick_peak))
    info["peak_fp32"], info["peak_bf16"] = max(peaks["fp32"]), max(peaks["bf16"])
    log(f"matmul peak at the end: {peaks['fp32'][1]:.0f} GFLOP/s fp32, {peaks['bf16'][1]:.0f} GFLOP/s bf16")
    for r in rows:
        for key in ("fp32 eager", "fp32 compiled", "bf16 compiled"):
            if f"GFLOP/s {key}" in r:
                r[f"peak share {key}"] = r[f"GFLOP/s {key}"] / info["peak_" + key[:4]]
    md = markdown(rows, research_rows, info, info["command"])
    _write_atomic(os.path.join(args.out, "report.md"), md)
    _write_csv(os.path.join(args.out, "report.csv"), rows, info)
    if research_rows:
        _write_csv(os.path.join(args.out, "research.csv"), research_rows, info)
    plot(rows, os.path.join(args.out, "report.png"), info)
    if args.readme:
        update_readme(args.readme, md)
    print(md)
    log(f"wrote {args.out}/report.md, report.csv, report.png")
    return 0


_INFO_KEYS = ("cpu", "threads", "torch", "python", "date", "machine", "command", "peak_fp32", "peak_bf16")


def _read_csv(path: str) -> tuple[list[dict], dict]:
    rows, info = [], {}
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k in _INFO_KEYS:
                    info[k] = _num(v) if k.startswith("peak_") or k == "threads" else v
                elif k in ("batch", "size", "photos", "distinct top-1") and v not in ("", None):
                    row[k] = int(float(v))
                else:
                    row[k] = v if _num(v) is None else _num(v)
            rows.append(row)
    info["threads"] = int(info.get("threads") or 0)
    return rows, info


def render(out: str, readme: str | None = None) -> int:
    """Re-render ``report.md`` / ``report.png`` (and the README section) from the CSV files."""
    rows, info = _read_csv(os.path.join(out, "report.csv"))
    research = os.path.join(out, "research.csv")
    research_rows = _read_csv(research)[0] if os.path.exists(research) else []
    md = markdown(rows, research_rows, info, info.get("command", "python -m benchmarks report"))
    _write_atomic(os.path.join(out, "report.md"), md)
    plot(rows, os.path.join(out, "report.png"), info)
    if readme:
        update_readme(readme, md)
    print(md)
    return 0


def _write_csv(path: str, rows: list[dict], info: dict) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*keys, *info.keys()])
        w.writeheader()
        for r in rows:
            w.writerow({**r, **info})
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
