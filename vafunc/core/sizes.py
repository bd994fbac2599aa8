"""Valid input sizes of a family, probed on meta tensors (no arithmetic is done).

:func:`size_multiple` reads what ``m.require_multiple(k)`` calls declared; :func:`min_size` finds
the smallest square input every op accepts. Both cache per ``(family name, config)``.
"""

from __future__ import annotations

import math

from vafunc.core.registry import Family

__all__ = ["min_size", "size_multiple"]

_MIN_SIZE: dict = {}
_MULTIPLE: dict = {}


def size_multiple(fam: Family, cfg) -> int:
    """What the input height and width must be multiples of: the least common multiple of every
    ``m.require_multiple`` declaration (1 if nothing is declared)."""
    key = (fam.name, cfg)
    if key not in _MULTIPLE:
        from vafunc.core.init import Initializer

        sizes: list = []
        fam.probe(cfg, Initializer.from_key(0, device="meta"), sizes=sizes)
        _MULTIPLE[key] = math.lcm(*sizes) if sizes else 1
    return _MULTIPLE[key]


def min_size(fam: Family, cfg) -> int:
    """The smallest square input the family's forward accepts for ``cfg`` (probed on meta
    tensors, once per config; sizes grow monotonically through convs and pools, so a bisection
    over ``[1, init_size]`` finds it)."""
    key = (fam.name, cfg)
    if key in _MIN_SIZE:
        return _MIN_SIZE[key]
    from vafunc.core.init import Initializer

    ini = Initializer.from_key(0, device="meta")
    step = size_multiple(fam, cfg)

    def ok(k: int) -> bool:
        try:
            fam.probe(cfg, ini, size=k * step)
            return True
        except (RuntimeError, ValueError):
            return False

    hi = None
    for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if ok(k):
            hi = k
            break
    if hi is None:
        raise ValueError(f"{fam.name}: no input size up to {1024 * step} is accepted by {cfg}")
    lo = hi // 2  # ok(lo) is False (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    _MIN_SIZE[key] = hi * step
    return hi * step
