"""Benchmarks of the research transforms against what a user would write with torchvision.

* ``ensemble``: ``vafunc.ensemble_apply`` (eager loop, eager vmap, compiled) against a Python loop
  over N torchvision modules, eval (and train) mode.
* ``train``: the functional train step against the nn.Module path (torchvision module,
  ``loss.backward()``, ``torch.optim.SGD``).
* ``psg``: ``vafunc.per_sample_grads`` against a loop of single-sample backward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vafunc
from benchmarks.harness import compare
from vafunc import optim
from vafunc.train import make_train_step


def _tv(name, **kw):
    import torchvision

    ref = vafunc.get_entry(name).reference
    return getattr(torchvision.models, ref.builder)(**dict(ref.kwargs), **kw)


def ensemble(name: str, members: int, batch: int, size: int, *, train: bool, reps: int, compiled: bool):
    model = vafunc.get_model(name)
    tvs = [_tv(name).train(train) for _ in range(members)]
    flats = [vafunc.from_state_dict(model, m.state_dict()) for m in tvs]
    params = vafunc.stack([p for p, _ in flats])
    state = vafunc.stack([s for _, s in flats])
    x = torch.randn(batch, 3, size, size)
    rng = vafunc.random.key(0) if train else None
    rows = []
    with torch.no_grad():
        def loop():
            return torch.stack([m(x) for m in tvs])

        for method in ("loop", "vmap"):
            fn = lambda: vafunc.ensemble_apply(model, params, state, x, train=train, rng=rng, method=method)
            rows.append(compare(f"{name} ensemble x{members} {'train' if train else 'eval'} {method}", fn, loop,
                                reps=reps))
        if compiled and not train:
            rows.append(compiled_ensemble(name, model, params, state, x, tvs, train, reps))
    return rows


def compiled_ensemble(name, model, params, state, x, tvs, train, reps):
    """The documented compiled path: compile outside the ensemble call, channels_last."""
    from torch_compat import compile_ensemble

    fn = compile_ensemble(model, params, state)
    return compare(f"{name} ensemble x{len(tvs)} eval compiled", lambda: fn(x),
                   lambda: torch.stack([m(x) for m in tvs]), reps=reps)


def train_step(name: str, batch: int, size: int, reps: int):
    return [_train_step(name, batch, size, reps, donate) for donate in (False, True)]


def _train_step(name: str, batch: int, size: int, reps: int, donate: bool):
    ref = _tv(name, num_classes=10).train()
    model = vafunc.get_model(name, num_classes=10)
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    opt = optim.sgd(0.01, momentum=0.9, weight_decay=1e-4)
    holder = {"p": params, "s": state, "o": opt.init(params)}
    step = make_train_step(model, opt, donate=donate)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def ours():
        holder["p"], holder["s"], holder["o"], _ = step(holder["p"], holder["s"], holder["o"], x, y)

    def theirs():
        torch_opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        torch_opt.step()

    return compare(f"{name} train step b{batch}@{size}{' donate' if donate else ''}", ours, theirs, reps=reps)


def per_sample(name: str, batch: int, size: int, reps: int):
    model = vafunc.get_model(name, num_classes=10)
    params, state = model.init(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    ref = _tv(name, num_classes=10).eval()
    ref.load_state_dict(vafunc.to_state_dict(params, state))

    def ours():
        vafunc.per_sample_grads(model, params, state, x, y, F.cross_entropy)

    def loop():
        out = []
        for i in range(batch):
            ref.zero_grad(set_to_none=True)
            F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
            out.append([p.grad for p in ref.parameters()])
        return out

    return [compare(f"{name} per-sample grads b{batch}@{size}", ours, loop, reps=reps)]
