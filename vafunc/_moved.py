"""The import paths of vafunc 0.1's flat layout, kept for one release (until 0.2).

``import vafunc.kit`` / ``from vafunc.hub import get_weights`` / ``vafunc.layers`` keep working:
each old path is an alias of the module at its new place (the same module object, so patching
either patches both), with a :class:`DeprecationWarning` naming the new path. Public namespaces
that stayed at the top (``vafunc.random``, ``vafunc.tree``, ``vafunc.hub``, ``vafunc.transforms``,
``vafunc.optim``) are attributes of the package and warn about nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: old module (under ``vafunc.``) -> its module now
MOVED: dict[str, str] = {
    "kit": "core.kit",
    "backends": "core.backends",
    "layers": "core.layers",
    "blocks": "core.blocks",
    "init": "core.init",
    "random": "core.random",
    "tree": "core.tree",
    "registry": "core.registry",
    "sizes": "core.sizes",
    "precision": "core.precision",
    "members": "research.members",
    "vmap_rules": "research.vmap_rules",
    "ensemble": "research.ensemble",
    "persample": "research.persample",
    "train": "training.train",
    "optim": "training.optim",
    "distributed": "training.distributed",
    "weights": "io.state_dict",
    "hub": "io.hub",
    "memory": "serving.memory",
    "transforms": "serving.transforms",
    "imagenet_classes": "serving.imagenet_classes",
    "demo": "cli.demo",
    # new public namespaces that live in a subpackage by concern (no old path: never warned about)
    "curvature": "research.curvature",
    "ntk": "research.ntk",
    "lora": "research.lora",
    "metrics": "training.metrics",
}
#: moved modules that are still public under their old name (no warning)
PUBLIC = {"random", "tree", "hub", "transforms", "optim", "curvature", "ntk", "lora", "metrics"}


def new_name(fullname: str) -> str | None:
    """``"vafunc.hub.table"`` -> ``"vafunc.io.hub.table"``; ``None`` for a path that did not move."""
    parts = fullname.split(".")
    if len(parts) < 2 or parts[0] != "vafunc" or parts[1] not in MOVED:
        return None
    return ".".join(["vafunc", MOVED[parts[1]], *parts[2:]])


def _warn(old: str, new: str) -> None:
    if old.split(".")[1] not in PUBLIC:
        warnings.warn(f"{old} moved to {new}; the old path is kept until vafunc 0.2", DeprecationWarning, stacklevel=3)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at the new one."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        new = new_name(spec.name)
        _warn(spec.name, new)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # its own spec, given back after the import system set this one
        return module

    def exec_module(self, module):
        # the module at the new path is loaded already; the import system gave it the old path's
        # spec: give it back its own (pickling and reloading read it)
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        # first: a folder left by the old layout in an in-place checkout (vafunc/hub/ with only
        # __pycache__) would otherwise import as an empty namespace package
        sys.meta_path.insert(0, _Alias())


def attribute(name: str):
    """``vafunc.<name>`` for an old top-level module name (the package's ``__getattr__``)."""
    if name not in MOVED:
        raise AttributeError(f"module 'vafunc' has no attribute {name!r}")
    new = f"vafunc.{MOVED[name]}"
    _warn(f"vafunc.{name}", new)
    return importlib.import_module(new)
