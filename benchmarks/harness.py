"""Timing harness: two callables run side by side in one process, alternating, after warm-up.

Each repetition times A then B (the order alternates every repetition so drift and caches hit
both equally); the result is the median time of each and the median of the per-repetition
ratios ``time_B / time_A`` ("A is r times as fast as B" when A is vafunc and B the baseline).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


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


def compare(label: str, fn_a: Callable[[], object], fn_b: Callable[[], object], *, warmup: int = 2,
            reps: int = 10, min_seconds: float = 0.0) -> Pair:
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
    return Pair(label, 1e3 * statistics.median(ta), 1e3 * statistics.median(tb),
                statistics.median(ratios), q[0], q[2], len(ratios))


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
