"""``python -m benchmarks.remat``: rematerialisation (``make_train_step(remat="blocks")``) against the
plain train step: peak memory and time.

* **Peak RSS**: each (case, mode) runs in a fresh Python process (``--child``), which builds the
  model, the optimizer state and a batch, trims the heap and resets the kernel's peak mark
  (:func:`reset_peak`), runs ``--steps`` train steps and reports its peak RSS over them
  (``VmHWM``: the whole process's resident memory, interpreter, torch, weights and optimizer state
  included, at its highest during the steps). On a CUDA device the figure is
  ``torch.cuda.max_memory_allocated`` instead.
* **Allocator** (``--malloc``): ``default`` leaves glibc as it is: blocks under its dynamic mmap
  threshold (up to 32 MiB) come from the heap, and what is freed there is kept by the process, so
  the RSS peak counts allocator retention as well as live tensors, and more so for the step that
  allocates and frees more often (the rematerialised one). ``return`` calls
  :func:`vafunc.serving.memory.set_malloc_thresholds` ``(128 KiB, 128 KiB)`` first (in the
  children and in the timing process, for both steps alike): blocks over 128 KiB are mapped and
  unmapped, so the RSS peak follows the live tensors.
* **Time**: the two steps side by side in one process, alternating after warm-up
  (:func:`benchmarks.harness.compare`); the ratio is the median of paired ``t_remat / t_plain``.

Cases (the issue's goals: peak <= 60% of the plain step's, time <= 1.4x): ``resnet50`` batch 32 @
224, ``vit_b_16`` batch 16 @ 224, ``ensemble``: 16 resnet18 members, batch 32 @ 32, the vmapped
ensemble step (``ensemble_method="vmap"``, the torch.func path ``torch.utils.checkpoint`` cannot
take) and ``ensemble_loop`` the same members by the loop lowering.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

import torch

import vafunc
from vafunc.training import optim
from vafunc.training.train import make_train_step

#: case -> (model, members (0: one model), batch, size, ensemble_method)
CASES = {
    "resnet50": ("resnet50", 0, 32, 224, None),
    "vit_b_16": ("vit_b_16", 0, 16, 224, None),
    "ensemble": ("resnet18", 16, 32, 32, "vmap"),
    "ensemble_loop": ("resnet18", 16, 32, 32, "loop"),
    "resnet18": ("resnet18", 0, 16, 64, None),  # a quick smoke case
    "resnet50_b8": ("resnet50", 0, 8, 224, None),  # a smaller resnet50, to iterate on
}


def build(case: str, remat: str | None, device: str = "cpu", donate: bool = False):
    """``(step, args)`` of one train step of ``case``, ``remat`` or plain (``donate``: the
    optimizer updates the parameters and its buffers in place, ``make_train_step(donate=True)``)."""
    name, members, batch, size, method = CASES[case]
    model = vafunc.get_model(name, num_classes=10)
    if members:
        params, state = vafunc.ensemble_init(model, members, 0, device=device)
    else:
        params, state = model.init(0, device=device)
    opt = optim.sgd(0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    kw = {"ensemble": True, "ensemble_method": method} if members else {}
    step = make_train_step(model, opt, remat=remat, donate=donate, **kw)
    return step, (params, state, opt.init(params), x, y, vafunc.random.key(1))


def set_malloc(mode: str) -> None:
    """``--malloc``: ``default`` changes nothing, ``return`` hands freed blocks over 128 KiB back at once."""
    if mode == "return":
        from vafunc.serving.memory import set_malloc_thresholds

        if not set_malloc_thresholds(128 * 1024, 128 * 1024):
            raise SystemExit("--malloc return needs glibc")


def reset_peak() -> bool:
    """Before the steps: hand the heap's free memory back (``malloc_trim``) and reset the kernel's
    peak-RSS mark (``/proc/self/clear_refs``), so that the peak is the steps' own, not the build's
    (vit_b_16's init leaves a 4.2 GB mark under glibc's default thresholds, above either step's
    peak). False where Linux does not allow it (the peak is then the whole process's)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The peak RSS since :func:`reset_peak` (``VmHWM``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(case: str, remat: str | None, steps: int, device: str, malloc: str = "default", donate: bool = False) -> dict:
    set_malloc(malloc)
    step, (params, state, opt_state, x, y, key) = build(case, remat, device, donate)
    step_only = reset_peak()
    before = peak_rss_mb()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state, opt_state, _ = step(params, state, opt_state, x, y, key)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {
        "case": case,
        "remat": remat or "none",
        "device": device,
        "malloc": malloc,
        "donate": donate,
        "peak_rss_mb": peak_rss_mb(),
        "peak_of": "step" if step_only else "process",
        "rss_before_step_mb": before,
        "step_s": min(times),
    }
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_peak(case: str, remat: str | None, steps: int, device: str, malloc: str, donate: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.remat", "--child", case, "--remat", remat or "none"]
    cmd += ["--steps", str(steps), "--device", device, "--malloc", malloc] + (["--donate"] if donate else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if r.returncode:
        raise SystemExit(f"{case} remat={remat}: child failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=["resnet50", "vit_b_16", "ensemble"], choices=list(CASES))
    ap.add_argument("--steps", type=int, default=2, help="train steps per fresh process (peak memory)")
    ap.add_argument("--reps", type=int, default=4, help="paired timing repetitions (0: no timing)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", choices=["default", "return"], default="default", help="glibc's thresholds")
    ap.add_argument("--donate", action="store_true", help="make_train_step(donate=True), both steps")
    ap.add_argument("--csv", default="benchmarks/results/remat.csv")
    ap.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, None if a.remat == "none" else a.remat, a.steps, a.device, a.malloc, a.donate)))
        return
    set_malloc(a.malloc)
    from benchmarks.harness import compare, machine_info

    key = "peak_cuda_mb" if a.device == "cuda" else "peak_rss_mb"
    rows = []
    print("| case | plain peak (MB) | remat peak (MB) | peak ratio | time ratio (paired median, IQR) |")
    print("|---|---:|---:|---:|---:|")
    for case in a.cases:
        plain = measure_peak(case, None, a.steps, a.device, a.malloc, a.donate)
        remat = measure_peak(case, "blocks", a.steps, a.device, a.malloc, a.donate)
        row = {
            "case": case,
            "device": a.device,
            "malloc": a.malloc,
            "donate": a.donate,
            "rss_before_step_mb": round(plain["rss_before_step_mb"]),
            "peak_of": plain["peak_of"],
            "plain_peak_mb": round(plain[key]),
            "remat_peak_mb": round(remat[key]),
            "peak_ratio": round(remat[key] / plain[key], 3),
            "plain_step_s": round(plain["step_s"], 3),
            "remat_step_s": round(remat["step_s"], 3),
        }
        if a.reps:
            sp, ap_ = build(case, None, a.device, a.donate)
            sr, ar = build(case, "blocks", a.device, a.donate)
            sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
            pair = compare(
                case, lambda: (sr(*ar), sync()), lambda: (sp(*ap_), sync()), warmup=1, reps=a.reps
            )  # ratio: t_plain / t_remat
            row.update(
                time_ratio=round(1 / pair.ratio, 3),
                time_ratio_iqr=f"{1 / pair.ratio_q3:.3f}-{1 / pair.ratio_q1:.3f}",
                plain_ms=round(pair.median_b_ms),
                remat_ms=round(pair.median_a_ms),
            )
            del sp, ap_, sr, ar
        row.update(machine_info(), date=time.strftime("%Y-%m-%d"))
        rows.append(row)
        t = f"{row['time_ratio']:.3f} ({row['time_ratio_iqr']})" if a.reps else ""
        peaks = f"{row['plain_peak_mb']} | {row['remat_peak_mb']} | {row['peak_ratio']:.3f}"
        print(f"| {case} | {peaks} | {t} |", flush=True)
    if a.csv and rows:
        append_rows(a.csv, rows)


def append_rows(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``; when they bring new columns, the file is rewritten
    with the union of the columns (older rows get empty cells there)."""
    old: list[dict] = []
    fields: list[str] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            r = csv.DictReader(f)
            fields, old = list(r.fieldnames or []), list(r)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old + rows)


if __name__ == "__main__":
    main()
