"""Timing harness: two callables run side by side in one process, alternating, after warm-up.

Each repetition times A then B (the order alternates every repetition so drift and caches hit
both equally); the result is the median time of each and the median of the per-repetition
ratios ``time_B / time_A`` ("A is r times as fast as B" when A is vafunc and B the baseline).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from vafunc.serving.memory import set_malloc_thresholds


@dataclass
class Pair:
    label: str
    median_a_ms: float
    median_b_ms: float
    ratio: float  # median over repetitions of t_b / t_a  (>1: A is faster)
    ratio_q1: float
    ratio_q3: float
    reps: int

    def row(self) -> dict:
        return asdict(self)


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    label: str,
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    *,
    warmup: int = 2,
    reps: int = 10,
    min_seconds: float = 0.0,
) -> Pair:
    """Time ``fn_a`` (vafunc) against ``fn_b`` (baseline), alternating, and return medians."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    start = time.perf_counter()
    i = 0
    while i < reps or time.perf_counter() - start < min_seconds:
        if i % 2 == 0:
            a = _time(fn_a)
            b = _time(fn_b)
        else:
            b = _time(fn_b)
            a = _time(fn_a)
        ta.append(a)
        tb.append(b)
        i += 1
    ratios = sorted(b / a for a, b in zip(ta, tb))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], 0, ratios[-1]]
    return Pair(
        label,
        1e3 * statistics.median(ta),
        1e3 * statistics.median(tb),
        statistics.median(ratios),
        q[0],
        q[2],
        len(ratios),
    )


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def compare_many(
    fns: dict[str, Callable[[], object]],
    baseline: str,
    *,
    warmup: int = 1,
    reps: int = 7,
    min_seconds: float = 0.0,
    sync: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """Time several callables round-robin (the order rotates every repetition) and return, per
    name, the median milliseconds and the median of the per-repetition ratios
    ``time[baseline] / time[name]`` (>1: faster than the baseline), with its quartiles, and the
    raw ``times`` (seconds) for other pairings (:func:`paired_ratio`).
    At least ``reps`` rounds, more until ``min_seconds`` have passed (fast models get more)."""
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(fns)}")
    names = list(fns)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for n in names:
            timed(fns[n])
    times = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < reps or (time.perf_counter() - start < min_seconds and r < 50 * reps):
        k = r % len(names)
        r += 1
        for n in names[k:] + names[:k]:
            times[n].append(timed(fns[n]))
    out = {}
    for n in names:
        ratios = sorted(b / a for a, b in zip(times[n], times[baseline]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], 0, ratios[-1]]
        out[n] = {
            "ms": 1e3 * statistics.median(times[n]),
            "ratio": statistics.median(ratios),
            "ratio_q1": q[0],
            "ratio_q3": q[2],
            "times": times[n],
        }
    return out


def paired_ratio(res: dict, name: str, against: str) -> float:
    """Median over repetitions of ``time[against] / time[name]`` from a :func:`compare_many` result."""
    return statistics.median(b / a for a, b in zip(res[name]["times"], res[against]["times"]))


def matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = 5, quick: bool = False) -> float:
    """The machine's measured matmul peak for ``dtype`` in GFLOP/s (2 FLOPs per multiply-add): the
    best median over square ``torch.mm`` products (MKL / cuBLAS) and 1x1 convolutions in
    channels_last (oneDNN / cuDNN; on AMD CPUs oneDNN's kernels beat MKL's by about 20%).
    ``quick``: smaller problems and fewer repetitions (a smoke run, not a measurement)."""
    import torch.nn.functional as F

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cases = []
    for n in (1024,) if quick else (2048, 4096):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        cases.append((lambda a=a, b=b: a @ b, 2 * n**3))
    for n, c, hw in ((8, 1024, 28),) if quick else ((8, 1024, 28), (8, 2048, 14)):
        x = torch.randn(n, c, hw, hw, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 1, 1, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        cases.append((lambda x=x, w=w: F.conv2d(x, w), 2 * n * hw * hw * c * c))
    best = 0.0
    with torch.no_grad():
        for fn, flops in cases:
            for _ in range(2):
                fn()
            sync()
            ts = []
            for _ in range(2 if quick else reps):
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
            best = max(best, flops / statistics.median(ts) / 1e9)
    return best


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def append_rows(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (its header written first if the file is new) and
    say so."""
    import csv
    import os

    if not rows:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


def fix_malloc_thresholds() -> None:
    """Make glibc return large blocks to the OS at once (fixed mmap threshold), so that resident
    memory follows what the program holds and peak measurements do not depend on which function
    ran first. No effect where glibc is absent."""
    set_malloc_thresholds(128 * 1024, 128 * 1024)


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak extra memory of one call of ``fn`` in MiB: on CUDA the allocator's peak, on Linux CPU
    the rise of the peak resident set size (reset through ``/proc/self/clear_refs``) over the
    resident size before the call. NaN where neither can be read."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return float("nan")
    before = _proc_status_kb("VmRSS")
    fn()
    peak = _proc_status_kb("VmHWM")
    if before is None or peak is None:
        return float("nan")
    return (peak - before) / 1024
