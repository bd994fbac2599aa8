"""vafunc: vision networks as pure functions over explicit parameter pytrees.

>>> import vafunc
>>> model = vafunc.get_model("resnet18", num_classes=10)
>>> params, state = model.init(vafunc.random.key(0))
>>> logits, state = model.apply(params, state, x)          # doctest: +SKIP

The package by concern (``docs/design.md``, "Layout"): :mod:`vafunc.core` (the kit, layers,
blocks, keys, pytrees, the registry), :mod:`vafunc.models` (one file per family),
:mod:`vafunc.research` (per-sample gradients, member-batched ensembles), :mod:`vafunc.training`
(train step, optimisers, distributed engines), :mod:`vafunc.io` (state dicts, the checkpoint hub),
:mod:`vafunc.serving` (compiled inference, preprocessing, the allocator switch), :mod:`vafunc.cli`.
This module exports the entry points and core types; everything else is imported from its
subpackage.
"""

from vafunc import (
    _moved,
    models,  # noqa: F401,E402 - imports every family module, which registers it
)
from vafunc.core import random, tree
from vafunc.core.precision import Policy
from vafunc.core.registry import Entry, Family, ModelDef, Reference, get_entry, get_model, list_models, register
from vafunc.core.tree import count_params, flatten, stack, tree_map, unflatten, unstack
from vafunc.io import hub
from vafunc.io.hub import load_weights, save_weights
from vafunc.io.state_dict import StateDictMismatch, from_state_dict, to_state_dict
from vafunc.research import vmap_rules  # noqa: F401 - registers the vmap rule of the kit's member conv
from vafunc.research.ensemble import ensemble_apply, ensemble_init
from vafunc.research.persample import per_sample_grad_norms, per_sample_grads
from vafunc.serving import transforms
from vafunc.serving.compile import CompiledModel, compile  # noqa: A004 - vafunc.compile, like torch.compile
from vafunc.training import optim
from vafunc.training.train import make_train_step, recalibrate_batch_norm

_moved.install()

__version__ = "0.1.0"

__all__ = [
    # models
    "get_model",
    "list_models",
    "get_entry",
    "register",
    "ModelDef",
    "Family",
    "Entry",
    "Reference",
    # weights
    "from_state_dict",
    "to_state_dict",
    "StateDictMismatch",
    "load_weights",
    "save_weights",
    "hub",
    # pytrees and keys
    "random",
    "tree",
    "flatten",
    "unflatten",
    "tree_map",
    "stack",
    "unstack",
    "count_params",
    # research transforms
    "per_sample_grads",
    "per_sample_grad_norms",
    "ensemble_init",
    "ensemble_apply",
    # training
    "make_train_step",
    "recalibrate_batch_norm",
    "optim",
    # inference
    "compile",
    "CompiledModel",
    "Policy",
    "transforms",
]


def __getattr__(name: str):
    return _moved.attribute(name)
