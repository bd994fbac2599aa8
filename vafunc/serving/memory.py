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
  How fast the kernel grants them varies: when its free memory is fragmented it compacts pages
  first, and the first touch of 0.7 GB then takes anywhere from 25 ms to 0.8 s.
* :func:`reusable_empty` (used by vafunc for results that are rebuilt every call, the per-sample
  gradients): the last such buffer is kept and handed out again once every tensor viewing it is
  gone, so a loop that computes and drops a result each step touches resident pages (a CUDA
  caching allocator's behaviour, on the CPU, for these buffers only). :func:`release_buffers`
  frees what is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["set_malloc_thresholds", "advise_huge", "reusable_empty", "release_buffers"]

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


#: the last large buffer :func:`reusable_empty` handed out, per (dtype, device)
_KEPT: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_KEEP_MIN_BYTES = 1 << 24


def _holders(t: torch.Tensor) -> int:
    """How many tensors and storages besides ``t`` hold ``t``'s memory (-1 where torch does not say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return -1
    return int(count(t.untyped_storage()._cdata)) - 2  # ``t`` itself and the storage object made here


def reusable_empty(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised 1-D buffer of ``numel`` elements for a result that is rebuilt every call.

    On the CPU, for buffers of 16 MiB and more: the buffer this function handed out last for the
    same dtype and device is returned again when nothing else holds it any more (every result
    viewing it was dropped) and it has between ``numel`` and ``2 * numel`` elements; otherwise a
    new buffer (with :func:`advise_huge`) is made and kept in its place. Only that one buffer per
    dtype and device is kept; :func:`release_buffers` drops it. Elsewhere (CUDA has its own
    caching allocator), small, or under inference mode: a plain ``torch.empty``."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    device = torch.device(device)
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < _KEEP_MIN_BYTES or torch.is_inference_mode_enabled():
        return torch.empty(numel, dtype=dtype, device=device)
    key = (dtype, device)
    kept = _KEPT.get(key)
    if kept is not None and numel <= kept.numel() <= 2 * numel and _holders(kept) == 0:
        return kept[:numel]
    buf = torch.empty(numel, dtype=dtype, device=device)
    advise_huge(buf)
    _KEPT[key] = buf
    return buf


def release_buffers() -> int:
    """Drop the buffers :func:`reusable_empty` keeps for reuse; returns the bytes no longer kept
    (memory still viewed by a live result is freed when that result goes)."""
    n = sum(t.numel() * t.element_size() for t in _KEPT.values())
    _KEPT.clear()
    return n
