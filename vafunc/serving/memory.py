"""Host memory: how large CPU buffers are obtained from the C library (Linux, glibc).

Member-batched steps and per-sample gradients allocate a few very large buffers every call (one
stacked weight gradient of resnet18's layer4 for 16 members is 151 MB; its per-sample gradients at
batch 32 are 1.5 GB). glibc maps every block above its mmap threshold (at most 32 MB when left to
adapt) freshly from the kernel and unmaps it on free, so each call faults those pages in again,
one 4 KiB page at a time: on small CPU machines that can cost more than the arithmetic (see benchmarks/README.md
for the figures). Two remedies, both explicit:

* :func:`set_malloc_thresholds` (opt-in, process-wide): serve blocks up to ``mmap_threshold``
  from the heap and keep up to ``trim_threshold`` of freed memory there, so the next step reuses
  pages that are already resident. The price: the process keeps its peak heap instead of giving
  freed memory back (what GPU caching allocators do too). The same as starting Python with
  ``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647``.
* :func:`advise_huge` (used by vafunc itself on buffers it allocates for one purpose): ask for
  transparent huge pages on one fresh buffer, 512 times fewer faults where the kernel grants them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["set_malloc_thresholds", "advise_huge"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MADV_HUGEPAGE = 14
_INT_MAX = 2**31 - 1


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no mallopt), or no C library found
        return None


_LIBC = _load_libc()


def set_malloc_thresholds(mmap_threshold: int = _INT_MAX, trim_threshold: int = _INT_MAX) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` for this process (bytes).

    The defaults make large buffers reusable from one step to the next (see the module's
    docstring; README, "Speed against the loop", has the figures for both sides). Returns True
    when glibc took both values, False where the C library is not glibc (nothing changes). The
    setting stays for the life of the process; call again with other values to change it
    (``set_malloc_thresholds(128 * 1024, 128 * 1024)`` returns freed memory at once)."""
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int (bytes), got {type(v).__name__}")
        if not 0 < v <= _INT_MAX:
            raise ValueError(f"{name} must be in 1..{_INT_MAX} bytes (glibc takes a C int), got {v}")
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) & bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def advise_huge(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages on a large fresh CPU buffer before it is first written
    (the whole 2 MiB pages inside it; buffers under 16 MiB are left alone)."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < 1 << 24 or _LIBC is None:
        return
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    start = -(-ptr // (1 << 21)) << 21
    length = (ptr + n - start) >> 21 << 21
    if length > 0:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)
