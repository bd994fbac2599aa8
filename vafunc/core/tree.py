"""Parameter pytrees: nested ``dict[str, dict | Tensor]``.

The dotted flattening of a tree is the reference state_dict name (``layer1.0.conv1.weight``).
``params`` hold trainable tensors; ``state`` holds BatchNorm buffers, whose leaf names are
:data:`STATE_LEAVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

__all__ = [
    "STATE_LEAVES",
    "flatten",
    "unflatten",
    "tree_map",
    "tree_leaves",
    "merge",
    "partition_state",
    "to_state_dict",
    "stack",
    "unstack",
    "count_params",
    "interpolate",
    "average",
]

#: Leaf names that are state (BatchNorm buffers), not trainable parameters.
STATE_LEAVES = frozenset(
    {
        "running_mean",
        "running_var",
        "num_batches_tracked",
        # constant index / coordinate tables that the references keep as buffers
        # (Swin, Swin V2, MaxViT relative position bias)
        "relative_position_index",
        "relative_coords_table",
    }
)


def _items(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _items(v, name + ".")
        else:
            yield name, v


def flatten(tree: Mapping) -> dict[str, torch.Tensor]:
    """Nested dict -> ``{"a.b.c": leaf}`` in depth-first insertion order."""
    return dict(_items(tree))


def unflatten(flat: Mapping[str, torch.Tensor]) -> dict:
    """``{"a.b.c": leaf}`` -> nested dict (inverse of :func:`flatten`)."""
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"state_dict name {name!r} nests under a tensor leaf {p!r}")
        node[leaf] = v
    return out


def tree_leaves(tree: Mapping) -> list[torch.Tensor]:
    return [v for _, v in _items(tree)]


def tree_map(fn: Callable, tree: Mapping, *rest: Mapping) -> dict:
    """Apply ``fn`` leafwise over one or more trees of the same structure."""
    out = {}
    for k, v in tree.items():
        others = [r[k] for r in rest]
        out[k] = tree_map(fn, v, *others) if isinstance(v, Mapping) else fn(v, *others)
    return out


def merge(a: Mapping, b: Mapping) -> dict:
    """Deep merge of two trees with disjoint leaves; ``a``'s order first, then ``b``'s new keys.

    Merging ``params`` with ``state`` reproduces torch's ``state_dict`` order (a module's
    parameters, then its buffers, then its children).
    """
    out: dict = {}
    # torch's order: a module's own tensors (parameters, then buffers) before its children, so a
    # buffer leaf of b (MaxViT's relative_position_index) precedes a's subtrees (its to_qkv)
    for k, v in a.items():
        if not isinstance(v, Mapping):
            if k in b:
                raise ValueError(f"leaf {k!r} appears in both trees")
            out[k] = v
    for k, v in b.items():
        if k not in a and not isinstance(v, Mapping):
            out[k] = v
    for k, v in a.items():
        if isinstance(v, Mapping):
            out[k] = merge(v, b[k]) if k in b else v
    for k, v in b.items():
        if k not in a and isinstance(v, Mapping):
            out[k] = v
    return out


def partition_state(tree: Mapping) -> tuple[dict, dict]:
    """Split a merged tree into ``(params, state)`` by leaf name; empty branches are dropped."""
    params: dict = {}
    state: dict = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            p, s = partition_state(v)
            if p:
                params[k] = p
            if s:
                state[k] = s
        elif k in STATE_LEAVES:
            state[k] = v
        else:
            params[k] = v
    return params, state


def to_state_dict(params: Mapping, state: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Flat dotted ``{name: tensor}`` whose names (and order) are the reference state_dict's."""
    return flatten(merge(params, state or {}))


def stack(trees: Iterable[Mapping], dim: int = 0) -> dict:
    """Stack N same-structured trees leafwise on a new axis (an ensemble of N members)."""
    trees = list(trees)
    if not trees:
        raise ValueError("stack needs at least one tree, got none")
    flats = [flatten(t) for t in trees]
    names = list(flats[0])
    for i, f in enumerate(flats[1:], 1):
        if list(f) != names:
            missing = sorted(set(names) - set(f))
            extra = sorted(set(f) - set(names))
            raise ValueError(f"tree {i} differs from tree 0: missing {missing}, extra {extra}")
    return unflatten({n: torch.stack([f[n] for f in flats], dim) for n in names})


def unstack(tree: Mapping, dim: int = 0) -> list[dict]:
    """Inverse of :func:`stack`: a list of N trees."""
    flat = flatten(tree)
    if not flat:
        return []
    sizes = {v.shape[dim] for v in flat.values()}
    if len(sizes) != 1:
        raise ValueError(f"leaves disagree on the size of axis {dim}: {sorted(sizes)}")
    n = sizes.pop()
    parts = {k: v.unbind(dim) for k, v in flat.items()}  # one call per leaf, not one per leaf and member
    return [unflatten({k: v[i] for k, v in parts.items()}) for i in range(n)]


def count_params(params: Mapping) -> int:
    """The number of scalars in a parameter tree (every leaf's ``numel``)."""
    return sum(int(v.numel()) for v in tree_leaves(params))


def _same_names(trees: list[Mapping], what: str) -> list[dict[str, torch.Tensor]]:
    flats = [flatten(t) for t in trees]
    for i, f in enumerate(flats[1:], 1):
        if list(f) != list(flats[0]):
            missing = sorted(set(flats[0]) - set(f))
            extra = sorted(set(f) - set(flats[0]))
            raise ValueError(f"{what}: tree {i} differs from tree 0: missing {missing}, extra {extra}")
        for k, v in f.items():
            if v.shape != flats[0][k].shape:
                raise ValueError(f"{what}: {k} is {list(flats[0][k].shape)} in tree 0, {list(v.shape)} in tree {i}")
    return flats


def interpolate(a: Mapping, b: Mapping, t: float | torch.Tensor) -> dict:
    """The point ``(1 - t) * a + t * b`` on the line through two trees of the same structure
    (``t = 0``: ``a``, ``t = 1``: ``b``; outside ``[0, 1]`` extrapolates). Floating leaves are
    interpolated (``torch.lerp``, in the leaf's dtype); integer leaves, BatchNorm's
    ``num_batches_tracked`` and index tables, are taken from ``a``. ``t`` may be a tensor (for
    ``torch.func`` transforms over it). The running statistics of an interpolated network are
    not those of its weights: recompute them with :func:`vafunc.training.train.recalibrate_batch_norm`."""
    fa, fb = _same_names([a, b], "interpolate")
    out = {}
    for k, va in fa.items():
        vb = fb[k]
        if va.is_floating_point() or va.is_complex():
            w = t if isinstance(t, (int, float)) else torch.as_tensor(t, dtype=va.dtype, device=va.device)
            out[k] = torch.lerp(va, vb.to(va.dtype), w)
        else:
            out[k] = va
    return unflatten(out)


def average(trees: Iterable[Mapping], weights: Iterable[float] | torch.Tensor | None = None) -> dict:
    """The weighted mean of trees of the same structure (a model soup, stochastic weight
    averaging): ``sum_i w_i * tree_i / sum_i w_i``, uniform weights by default. Floating leaves are
    averaged (accumulated in at least float32); integer leaves (``num_batches_tracked``, index
    tables) are taken from the first tree. Weights must be non-negative with a positive sum. As
    with :func:`interpolate`, recompute BatchNorm statistics afterwards
    (:func:`vafunc.training.train.recalibrate_batch_norm`)."""
    trees = list(trees)
    if not trees:
        raise ValueError("average needs at least one tree, got none")
    flats = _same_names(trees, "average")
    w = torch.ones(len(trees), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    if w.shape != (len(trees),):
        raise ValueError(f"average: expected {len(trees)} weights (one per tree), got shape {list(w.shape)}")
    if bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"average: weights must be non-negative with a positive sum, got {w.tolist()}")
    w = (w / w.sum()).tolist()
    out = {}
    for k, v0 in flats[0].items():
        if not (v0.is_floating_point() or v0.is_complex()):
            out[k] = v0
            continue
        acc_dtype = torch.promote_types(v0.dtype, torch.float32)
        acc = sum(f[k].to(acc_dtype) * wi for f, wi in zip(flats, w))
        out[k] = acc.to(v0.dtype)
    return unflatten(out)
