"""State-dict conversion with strict, explanatory checks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from vafunc.core import tree as vtree

__all__ = ["from_state_dict", "to_state_dict", "StateDictMismatch"]

to_state_dict = vtree.to_state_dict


class StateDictMismatch(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


def _fmt(keys, limit=50):
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def missing_num_batches_tracked(expected, flat: Mapping) -> list[str]:
    """The BatchNorm ``num_batches_tracked`` keys of ``expected`` that ``flat`` lacks although it
    has the layer's ``running_mean``: checkpoints from before torch 0.4.1, which
    ``nn.BatchNorm2d`` loads with the buffer as 0."""
    out = []
    for k in expected:
        layer, _, leaf = k.rpartition(".")
        if leaf == "num_batches_tracked" and layer and k not in flat and f"{layer}.running_mean" in flat:
            out.append(k)
    return out


def state_dict_size(entries: Mapping) -> tuple[int, int]:
    """``(entries, elements)`` of a state_dict (names to tensors or to shapes), leaving out the
    ``num_batches_tracked`` counters that old checkpoints lack: two checkpoints of one architecture
    agree on it, so :func:`vafunc.hub.identify` compares it before the names and shapes."""
    n = total = 0
    for k, v in entries.items():
        if k.endswith("num_batches_tracked"):
            continue
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
        n += 1
        total += math.prod(shape)
    return n, total


def _fill_num_batches_tracked(expected, flat: dict) -> tuple[dict, str | None]:
    """Add the :func:`missing_num_batches_tracked` buffers as 0, like ``nn.BatchNorm2d``."""
    added = 0
    for k in missing_num_batches_tracked(expected, flat):
        flat[k] = torch.zeros((), dtype=torch.int64)
        added += 1
    note = f"added {added} missing BatchNorm num_batches_tracked buffers as 0 (checkpoint predates them)"
    return flat, (note if added else None)


def from_state_dict(model, flat: Mapping[str, torch.Tensor], *, strict: bool = True):
    """Flat reference-named ``{name: tensor}`` -> ``(params, state)`` for ``model``.

    Legacy names are translated first by the family's ``remap`` hook (e.g. DenseNet's old
    ``norm.1`` names), and missing ``num_batches_tracked`` buffers (pre-0.4.1 checkpoints) are
    added as 0, as ``nn.BatchNorm2d`` does. With ``strict=True`` (default) every missing, unexpected and mis-shaped
    key is listed in one :class:`StateDictMismatch`; with ``strict=False`` unexpected keys are
    ignored, but missing or mis-shaped ones still raise (nothing is half-loaded).
    The tensors are used as they are (no copy); dtype is kept.
    """
    if not isinstance(flat, Mapping):
        raise TypeError(f"from_state_dict expects a mapping of names to tensors, got {type(flat).__name__}")
    bad_types = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise TypeError(f"state_dict values must be tensors; not tensors: {_fmt(bad_types)}")
    flat = dict(flat)
    flat.pop("_metadata", None)
    if model.family.remap is not None:
        flat, notes = model.family.remap(model.config, flat)
        for note in notes:
            warnings.warn(f"{model.name}: {note}", stacklevel=2)
    expected = model.state_dict_shapes()
    flat, note = _fill_num_batches_tracked(expected, flat)
    if note:
        warnings.warn(f"{model.name}: {note}", stacklevel=2)
    missing = [k for k in expected if k not in flat]
    unexpected = [k for k in flat if k not in expected]
    misshaped = [
        f"{k} (checkpoint {list(flat[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in flat and tuple(flat[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {_fmt(misshaped)}")
    if problems:
        raise StateDictMismatch(
            f"state_dict does not fit {model.name} ({len(expected)} keys expected, {len(flat)} given):\n  "
            + "\n  ".join(problems)
        )
    ordered = {k: flat[k] for k in expected}
    return vtree.partition_state(vtree.unflatten(ordered))
