"""The package's shape: the subpackages by concern, the curated top-level API, and the flat
layout's import paths kept as aliases until vafunc 0.2 (``vafunc._moved``)."""

from __future__ import annotations

import importlib
import pathlib
import pickle
import subprocess
import sys
import warnings

import pytest

import vafunc
from vafunc import _moved

ROOT = pathlib.Path(vafunc.__file__).parent
SUBPACKAGES = ["core", "models", "research", "training", "io", "serving", "cli"]


def test_the_folders_are_the_concerns_of_the_design():
    flat = sorted(p.name for p in ROOT.glob("*.py"))
    assert flat == ["__init__.py", "_moved.py"], f"modules left at the top of vafunc/: {flat}"
    design = (ROOT.parent / "docs" / "design.md").read_text()
    for pkg in SUBPACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg
        assert f"  {pkg}/" in design, f"docs/design.md's Layout does not show vafunc/{pkg}/"
        assert importlib.import_module(f"vafunc.{pkg}").__doc__, f"vafunc.{pkg} has no docstring"


def test_every_exported_name_exists_and_is_documented():
    assert len(vafunc.__all__) == len(set(vafunc.__all__))
    for name in vafunc.__all__:
        obj = getattr(vafunc, name)
        assert (obj.__doc__ or "").strip(), f"vafunc.{name} has no docstring"


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_import_paths_are_the_new_modules(old):
    new = importlib.import_module(f"vafunc.{_moved.MOVED[old]}")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"vafunc.{old}")
        attr = getattr(vafunc, old)
    assert mod is new and attr is new
    assert mod.__spec__.name == new.__name__  # its own spec, not the alias's
    moved = [w for w in got if issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message)]
    if old in _moved.PUBLIC:
        assert not moved, f"vafunc.{old} is public and must not warn: {[str(w.message) for w in moved]}"
    else:
        assert moved and f"vafunc.{_moved.MOVED[old]}" in str(moved[0].message)


def test_old_paths_in_a_fresh_interpreter():
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import vafunc\n"  # importing the package warns about nothing
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "from vafunc.kit import Scope, family\n"
        "from vafunc.hub.table import get_weights\n"
        "import vafunc.members, vafunc.core.kit\n"
        "assert Scope is vafunc.core.kit.Scope and vafunc.members is vafunc.research.members\n"
        "print(get_weights('resnet50', 'IMAGENET1K_V2').file)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(".pth")


def test_unknown_attributes_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        vafunc.nothing_here  # noqa: B018


def test_a_model_pickles_by_its_new_module_path():
    model = vafunc.get_model("resnet18", num_classes=3)
    again = pickle.loads(pickle.dumps(model))
    assert again.name == "resnet18" and again.config == model.config
