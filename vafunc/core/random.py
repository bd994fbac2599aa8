"""JAX-style explicit randomness from a counter-based generator written in plain tensor ops.

A *key* is an ``int64`` tensor of shape ``[2]`` holding two 32-bit words. Every draw is a pure
function of ``(key, counter)``: the words are mixed with the counter by a keyed chain of
MurmurHash3 finalisers (bijective 32-bit mixers), so

* the same key gives the same bits in eager mode, under ``torch.compile(fullgraph=True)``
  and on any device (only integer adds, xors, shifts and 16-bit-limb multiplies are used, so no
  intermediate ever leaves the signed 64-bit range);
* a batch of keys ``[N, 2]`` under ``torch.vmap`` gives every member its own stream;
* nothing global is read or written: ``torch.manual_seed`` has no effect here.

>>> k = key(0)
>>> k1, k2 = split(k)
>>> mask = bernoulli(k1, 0.9, (8, 1, 1, 1))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["key", "split", "fold_in", "bits", "uniform", "bernoulli", "normal", "is_key", "as_key"]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: Weyl increment used to separate streams


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for 32-bit words stored in int64, without signed overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _hash(k: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """32 random bits for each counter value under key ``k`` (``k[..., 0]``, ``k[..., 1]``).

    Under ``torch.compile`` the chain runs as one opaque operator (``vafunc::hash32``, the same
    eager ops inside): inductor inlines a pointwise node into each of its readers, and every
    xorshift and limb multiply reads its input twice, so one hash (about 80 ops) was expanded
    into tens of thousands of generated ops: a long compile per call site, much longer for a
    network with a key per block. The bits are the eager bits either way."""
    if torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
        return _hash_op(k, counter)
    return _hash_eager(k, counter)  # eager, and inside torch.func transforms (vmap, grad) under compile


#: counters hashed per pass on a long 1-D counter (int64: 512 KiB, so the chain's temporaries stay in cache)
_CHUNK = 1 << 16


def _hash_eager(k: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """:func:`_hash` in eager ops. One key over a long 1-D counter is hashed a cache-sized chunk at
    a time (the same bits): the chain makes ~90 temporaries of its input's size, which for 11M
    counters took 12x as long as chunks of 64 Ki (page faults and memory traffic)."""
    if (
        k.dim() == 1
        and counter.dim() == 1
        and counter.numel() > _CHUNK
        and type(counter) is torch.Tensor
        and counter.device.type == "cpu"
        and not torch._C._are_functorch_transforms_active()
    ):
        out = torch.empty_like(counter)
        for s in range(0, counter.numel(), _CHUNK):
            out[s : s + _CHUNK] = _chain(k, counter[s : s + _CHUNK])
        return out
    return _chain(k, counter)


def _chain(k: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    k0 = k[..., 0:1] if k.dim() > 1 else k[0]
    k1 = k[..., 1:2] if k.dim() > 1 else k[1]
    lo = counter & _M32
    hi = counter >> 32
    x = _fmix32(lo ^ k0)
    x = _fmix32((x + k1 + _GOLDEN) & _M32)
    x = _fmix32((x ^ (hi + k0 + 2 * _GOLDEN)) & _M32)
    return _fmix32((x + k1) & _M32)


@torch.library.custom_op("vafunc::hash32", mutates_args=())
def _hash_op(k: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    return _hash_eager(k, counter)


@_hash_op.register_fake
def _(k, counter):
    return _hash_eager(k, counter)


def is_key(obj) -> bool:
    return isinstance(obj, torch.Tensor) and obj.dtype == torch.int64 and obj.shape[-1:] == (2,)


def as_key(obj) -> torch.Tensor:
    """An int seed or a key tensor -> a key tensor; anything else is a TypeError."""
    if isinstance(obj, bool):
        raise TypeError(f"expected an int seed or a vafunc.core.random key, got {obj!r}")
    if isinstance(obj, int):
        return key(obj)
    if is_key(obj):
        return obj
    if isinstance(obj, torch.Tensor):
        raise TypeError(
            "expected a vafunc.core.random key (int64 tensor of shape [2]), got a "
            f"{obj.dtype} tensor of shape {list(obj.shape)}"
        )
    raise TypeError(f"expected an int seed or a vafunc.core.random key, got {type(obj).__name__}")


def key(seed: int, *, device=None) -> torch.Tensor:
    """A key from an integer seed (any Python int; the low 64 bits are used)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"key(seed) expects an int, got {type(seed).__name__}")
    seed &= (1 << 64) - 1
    raw = torch.tensor([seed & _M32, seed >> 32], dtype=torch.int64, device=device)
    base = torch.tensor([0x243F6A88, 0x85A308D3], dtype=torch.int64, device=device)
    return torch.stack([_hash(base, raw[0:1])[0], _hash(base, raw[1:2] + (1 << 32))[0]])


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` independent keys from one: shape ``[num, 2]`` (unpack it: ``a, b = split(k)``)."""
    if not is_key(k):
        raise TypeError(f"split expects a key (int64 tensor [..., 2]), got {type(k).__name__}")
    c = torch.arange(2 * num, device=k.device, dtype=torch.int64) + (3 << 32)
    words = _hash(k, c)  # [..., 2*num]
    return words.reshape(*words.shape[:-1], num, 2)


def fold_in(k: torch.Tensor, data: int) -> torch.Tensor:
    """A new key determined by ``k`` and a Python int (e.g. a layer index)."""
    c = torch.tensor([2 * data, 2 * data + 1], device=k.device, dtype=torch.int64) + (5 << 32)
    return _hash(k, c)


def bits(k: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Uniform 32-bit words (int64 in ``[0, 2**32)``) of the given shape."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    words = _hash(k, torch.arange(n, device=k.device, dtype=torch.int64))
    return words.reshape(*words.shape[:-1], *shape)


def uniform(k: torch.Tensor, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Uniform floats in ``[0, 1)`` with 24 random bits each."""
    return (bits(k, shape) >> 8).to(dtype) * (2.0**-24)


def bernoulli(k: torch.Tensor, p: float, shape: Sequence[int]) -> torch.Tensor:
    """Boolean tensor, each entry True with probability ``p``."""
    return uniform(k, shape) < p


def normal(k: torch.Tensor, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws (Box-Muller on two uniform streams)."""
    k1, k2 = split(k).unbind(-2)
    u1 = 1.0 - uniform(k1, shape, torch.float32)  # (0, 1]
    u2 = uniform(k2, shape, torch.float32)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.to(dtype)
