"""vafunc.core.random: counter-based keys that behave the same eager, compiled and under vmap."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vafunc
from vafunc.core import layers as L
from vafunc.core import random as vr


@given(st.integers(0, 2**64 - 1))
def test_key_is_deterministic_and_in_range(seed):
    a, b = vr.key(seed), vr.key(seed)
    assert a.dtype == torch.int64 and a.shape == (2,)
    assert torch.equal(a, b)
    assert bool(((a >= 0) & (a < 2**32)).all())


def test_split_gives_distinct_keys_and_streams():
    keys = vr.split(vr.key(0), 64)
    assert keys.shape == (64, 2)
    assert len({tuple(k.tolist()) for k in keys}) == 64
    draws = torch.stack([vr.bits(k, (16,)) for k in keys])
    assert len({tuple(r.tolist()) for r in draws}) == 64
    assert not torch.equal(vr.fold_in(vr.key(0), 1), vr.fold_in(vr.key(0), 2))


def test_uniform_statistics():
    u = vr.uniform(vr.key(1), (200_000,))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # chi-square over 20 bins, 19 dof: the 99.9% quantile is 43.8
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8
    # neighbouring counters are not correlated
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(corr)) < 0.01


def test_normal_statistics():
    z = vr.normal(vr.key(2), (100_000,))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_same_bits_eager_and_compiled():
    k = vr.key(123)
    f = lambda k: (vr.bits(k, (4, 5)), vr.uniform(vr.fold_in(k, 3), (7,)), vr.split(k, 3))
    compiled = torch.compile(f, fullgraph=True)
    for a, b in zip(f(k), compiled(k)):
        assert torch.equal(a, b)


def test_vmap_batch_of_keys_gives_each_member_its_stream():
    keys = vr.split(vr.key(9), 4)
    batched = torch.vmap(lambda k: vr.uniform(k, (3, 5)))(keys)
    looped = torch.stack([vr.uniform(k, (3, 5)) for k in keys])
    assert torch.equal(batched, looped)
    assert len({tuple(r.flatten().tolist()) for r in batched}) == 4


def test_dropout_rate_and_scaling():
    x = torch.ones(400, 500)
    y = L.dropout(x, 0.3, vr.key(4), train=True)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.equal(L.dropout(x, 0.3, None, train=False), x)


def test_drop_path_is_per_sample():
    x = torch.ones(20_000, 3, 2, 2)
    y = L.drop_path(x, 0.25, vr.key(5), train=True)
    per_sample = y.flatten(1)
    assert bool(((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all())
    survival = float((per_sample[:, 0] != 0).float().mean())
    assert abs(survival - 0.75) < 3 * math.sqrt(0.75 * 0.25 / 20_000) + 1e-3


def test_dropout_without_rng_in_train_mode_is_an_error():
    with pytest.raises(ValueError, match="rng=vafunc.random.key"):
        L.dropout(torch.ones(3), 0.5, None, train=True)


def test_bad_keys_are_type_errors():
    with pytest.raises(TypeError, match="int seed or a vafunc.core.random key"):
        vr.as_key(1.5)
    with pytest.raises(TypeError, match="int64 tensor of shape"):
        vr.as_key(torch.zeros(3))
    with pytest.raises(TypeError):
        vafunc.get_model("resnet18").init("seed")


def test_long_counters_hash_chunkwise_to_the_same_bits():
    """A long 1-D counter is hashed a chunk at a time (cache-sized temporaries): the same bits as
    the chain over the whole counter, across chunk boundaries and a ragged tail."""
    from vafunc.core import random as R

    n = 3 * R._CHUNK + 17
    for seed in (0, 2**40 + 7):
        k = R.key(seed)
        c = torch.arange(n, dtype=torch.int64) + (9 << 32)
        assert torch.equal(R._hash_eager(k, c), R._chain(k, c))
    assert torch.equal(R.bits(R.key(1), [n])[-5:], R._chain(R.key(1), torch.arange(n - 5, n)))
