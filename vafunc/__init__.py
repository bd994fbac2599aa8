"""vafunc: classic vision networks as pure functions over explicit parameter pytrees.

>>> import vafunc
>>> model = vafunc.get_model("resnet18", num_classes=10)
>>> params, state = model.init(vafunc.random.key(0))
>>> logits, state = model.apply(params, state, x)          # doctest: +SKIP
"""

from . import distributed, ensemble, init, layers, memory, optim, persample, random, train, tree
from .ensemble import ensemble_apply, ensemble_init
from .persample import per_sample_grad_norms, per_sample_grads
from .registry import Entry, Family, ModelDef, Reference, get_entry, get_model, list_models, register
from . import models  # noqa: F401  (imports every family module, which registers; see registry._ensure_loaded)
from .tree import count_params, flatten, stack, tree_map, unflatten, unstack
from .weights import StateDictMismatch, from_state_dict, to_state_dict
from . import hub, transforms
from .hub import load_weights, save_weights
from .compile import CompiledModel, compile  # noqa: A004 - vafunc.compile, like torch.compile

__version__ = "0.1.0"

__all__ = [
    "ModelDef",
    "Family",
    "Entry",
    "Reference",
    "get_model",
    "get_entry",
    "list_models",
    "register",
    "to_state_dict",
    "from_state_dict",
    "StateDictMismatch",
    "load_weights",
    "save_weights",
    "hub",
    "transforms",
    "flatten",
    "unflatten",
    "tree_map",
    "stack",
    "unstack",
    "count_params",
    "ensemble_init",
    "ensemble_apply",
    "per_sample_grads",
    "per_sample_grad_norms",
    "optim",
    "train",
    "ensemble",
    "persample",
    "random",
    "layers",
    "init",
    "tree",
    "memory",
]
