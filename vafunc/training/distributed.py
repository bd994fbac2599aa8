"""Data-parallel training on ``torch.distributed``: the same functional train step, gradients
all-reduced across processes (gloo on CPU, nccl on GPU). No transport of our own.

Launch one process per device with ``torchrun``::

    torchrun --standalone --nproc_per_node 2 my_train.py

and in the script::

    import torch.distributed as dist, vafunc
    from vafunc.training.train import make_train_step
    dist.init_process_group("gloo")                    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR...
    step = make_train_step(model, opt, distributed=True)
    params, state = vafunc.training.distributed.broadcast_tree((params, state))   # same start everywhere
    for x, y in my_shard_of_the_data: params, state, opt_state, m = step(params, state, opt_state, x, y)

Each process computes the gradient of the mean loss over its shard; the all-reduce averages them,
which equals the gradient over the global batch when shards are equal in size. BatchNorm statistics
are per process (as with ``DistributedDataParallel``); ``sync_state=True`` averages the running
statistics after every step as well.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from vafunc.core import tree as vtree

__all__ = ["all_reduce_mean", "broadcast_tree", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first "
            "(torchrun sets the environment it needs)"
        )


def all_reduce_mean(tree: Mapping, group=None) -> dict:
    """The element-wise mean of ``tree`` over all processes (floating leaves; others untouched),
    in one flat buffer per dtype so the collective runs once per dtype, not once per tensor."""
    _check()
    flat = vtree.flatten(tree)
    out = dict(flat)
    n = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, v in flat.items():
        if v.is_floating_point():
            by_dtype.setdefault(v.dtype, []).append(k)
    for names in by_dtype.values():
        buf = torch.cat([flat[k].reshape(-1) for k in names])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        buf /= n
        offset = 0
        for k in names:
            numel = flat[k].numel()
            out[k] = buf[offset : offset + numel].view_as(flat[k])
            offset += numel
    return vtree.unflatten(out)


def broadcast_tree(trees, src: int = 0, group=None):
    """Copies of ``trees`` (a tree or a tuple of trees) holding rank ``src``'s values everywhere."""
    _check()
    single = isinstance(trees, Mapping)
    out = []
    for t in [trees] if single else trees:
        flat = {k: v.clone() for k, v in vtree.flatten(t).items()}
        for v in flat.values():
            dist.broadcast(v, src=src, group=group)
        out.append(vtree.unflatten(flat))
    return out[0] if single else tuple(out)
