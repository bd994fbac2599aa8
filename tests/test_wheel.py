"""The package as shipped: its import structure (no cycles, no oversized modules, nothing from the
checkout), and an installed wheel that reads its data files and runs ``vafunc list`` without the
source checkout on the path."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vafunc.io import hub

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vafunc"

MAX_LINES = 500
#: Modules allowed past MAX_LINES: pure data (checked below to hold only literals).
DATA_MODULES = {"vafunc/serving/imagenet_classes.py"}
#: Modules whose dynamic imports (``__import__(name)`` with a computed name) load only optional
#: third-party packages (``vafunc.cli.demo._require("sklearn.datasets", ...)``).
THIRD_PARTY_DYNAMIC_IMPORTS = {"vafunc.cli.demo"}
#: ...and the old import paths (``vafunc._moved``): an alias imports a module at its new path,
#: which ``import vafunc`` has loaded already, so it adds no edge to the graph.
ALIASES = {"vafunc._moved"}


# --------------------------------------------------------------------------- the import graph


def _modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """``{"vafunc.hub.table": (path, is_package), ...}`` for every module of ``package`` (a folder)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_dynamic_import(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == "__import__") or (
        isinstance(f, ast.Attribute) and f.attr == "import_module"
    )


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph(package: Path = PACKAGE, allowed_dynamic=THIRD_PARTY_DYNAMIC_IMPORTS | ALIASES) -> dict[str, set[str]]:
    """The package-internal imports of every module, module-level and inside functions alike.

    ``import a.b.c`` / ``from a.b import c`` also run the packages ``a.b`` (and ``a``) unless the
    importing module is inside them already (then they are initialised first), so those count too.
    A dynamic import (``importlib.import_module``, ``__import__``) of a string constant counts as
    that import; one of a computed name in a package's ``__init__`` as importing every module of
    the package (``vafunc.models`` loading its families); elsewhere it must be listed in
    ``allowed_dynamic`` (it imports no module of the package)."""
    mods = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        pkg = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods}
                targets |= subs
                if len(subs) < len(node.names) or not subs:
                    targets.add(module)
            elif _is_dynamic_import(node):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                    targets.add(arg.value)
                elif is_pkg:
                    targets |= {m for m in mods if m.startswith(name + ".")}
                else:
                    assert name in allowed_dynamic, f"{path}: a dynamic import the import-cycle check cannot follow"
        deps = set()
        for t in targets:
            if t.split(".")[0] != package.name:
                continue
            deps |= {t, *_ancestors(t)} - _ancestors(name) - {name}
        graph[name] = {d for d in deps if d in mods}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (``[a, b, ..., a]``) of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_is_what_the_modules_import(tmp_path):
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "from . import a\nfrom .sub import c\n",
        "a.py": "import os\nfrom .b import thing\n__import__('json')\n",
        "b.py": "def f():\n    from . import a  # a cycle, function-level\n",
        "d.py": "import pkg.sub.c\nfrom .sub import *\n",
        "sub/__init__.py": "import importlib\nimportlib.import_module(__name__ + '.c')\n",
        "sub/c.py": "from .. import b\nfrom ..sub import e\n",
        "sub/e.py": "from pkg import d\n",
        "f.py": "import importlib\nimportlib.import_module('pkg.a')\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert import_graph(pkg) == {
        "pkg": {"pkg.a", "pkg.sub", "pkg.sub.c"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.a"},
        "pkg.d": {"pkg.sub", "pkg.sub.c"},  # importing pkg.sub.c runs pkg/sub/__init__ first
        "pkg.sub": {"pkg.sub.c", "pkg.sub.e"},  # the dynamic import: every module of the package
        "pkg.sub.c": {"pkg.b", "pkg.sub.e"},  # pkg.sub is initialised before its modules
        "pkg.sub.e": {"pkg.d"},
        "pkg.f": {"pkg.a"},
    }
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]
    g = import_graph()
    assert {"vafunc.io.hub.table", "vafunc.io.hub", "vafunc.serving._imageops"} <= g["vafunc.serving.transforms"]
    assert "vafunc.core.registry" in g["vafunc.models.resnet"] and "vafunc.models.resnet" in g["vafunc.models"]


def test_no_import_cycles_in_vafunc():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _uses_sys_path(tree: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"
        for n in ast.walk(tree)
    )


def test_vafunc_never_imports_the_checkout_or_edits_sys_path():
    for path, _ in _modules().values():
        tree = ast.parse(path.read_text(), str(path))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        bad = {m for m in imported if m.split(".")[0] in ("benchmarks", "tests", "torch_compat")}
        assert not bad, f"{path} imports {sorted(bad)}, which the installed package does not have"
        assert not _uses_sys_path(tree), f"{path} touches sys.path"


def _is_pure_data(tree: ast.Module) -> bool:
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and i == 0:
            continue  # the docstring
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            try:
                ast.literal_eval(stmt.value)
            except ValueError:
                return False
            continue
        if isinstance(stmt, ast.Assert):
            continue
        return False
    return True


def module_lines(text: str) -> int:
    """A module's size in lines, whatever the formatter did: every line except the continuation lines
    of a bracketed expression (``ruff format`` spreads a call that does not fit over one line per
    argument; that does not make a module longer to read)."""
    import io
    import tokenize

    cont: set[int] = set()
    depth, opened = 0, 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if depth and tok.start[0] != opened:
            cont.update(range(tok.start[0], tok.end[0] + 1))
        if tok.type == tokenize.OP and tok.string in "([{":
            if depth == 0:
                opened = tok.start[0]
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
    return sum(1 for i in range(1, len(text.splitlines()) + 1) if i not in cont)


def test_module_lines_counts_a_spread_call_once():
    packed = "f(a, b,\n  c)\nx = 1\n"
    spread = "f(\n    a,\n    b,\n    c,\n)\nx = 1\n"
    assert module_lines(packed) == module_lines(spread) == 2
    assert module_lines('"""doc\nstring"""\ny = [1]\n') == 3


def test_no_code_module_over_500_lines():
    too_long = {}
    for path, _ in _modules().values():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text()
        if rel in DATA_MODULES:
            assert _is_pure_data(ast.parse(text)), f"{rel} is exempt as a data table but holds code"
            continue
        n = module_lines(text)
        if n > MAX_LINES:
            too_long[rel] = n
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


# --------------------------------------------------------------------------- the installed wheel


def _data_files() -> dict[str, str]:
    """Every non-Python file of the source package: ``{path under vafunc/: sha256}``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(PACKAGE)
        if (
            path.is_dir()
            or path.suffix in (".py", ".pyc")
            or any(p == "__pycache__" or p.startswith(".") for p in rel.parts)
        ):
            continue
        out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


_CHECKS = r"""
import hashlib, importlib.util, json, sys
from importlib import resources
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import vafunc
from vafunc.io import hub
from vafunc.serving import transforms

assert Path(vafunc.__file__).resolve().is_relative_to(site), vafunc.__file__
checkout = Path(sys.argv[2]).resolve()
for top in ("benchmarks", "tests"):  # (opacus installs a top-level `benchmarks` of its own: that one may be found)
    spec = importlib.util.find_spec(top)
    assert spec is None or not Path(spec.origin or "").resolve().is_relative_to(checkout / top), \
        f"the checkout's {top} is importable"

def walk(t, prefix=""):
    for c in sorted(t.iterdir(), key=lambda c: c.name):
        if c.is_dir():
            if c.name != "__pycache__":
                yield from walk(c, prefix + c.name + "/")
        elif not c.name.endswith((".py", ".pyc")):
            yield prefix + c.name, c

w = hub.get_weights("resnet50", "IMAGENET1K_V2")
print(json.dumps({
    "file": vafunc.__file__,
    "table": [x.name for x in hub.list_weights()],
    "resnet50": [w.file, w.acc1, w.crop_size, transforms.for_weights("resnet50").describe()],
    "data": {name: hashlib.sha256(t.read_bytes()).hexdigest() for name, t in walk(resources.files("vafunc"))},
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, env)``: the repository built into a wheel (from a copy, so the checkout gets no
    build/ or egg-info) and installed with ``pip --target site``; ``env`` runs ``python -S`` with
    ``site`` and this interpreter's site-packages (for torch) on the path, but not the checkout (no
    .pth files are read, so the editable install's finder is not there either)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".hypothesis",
            "shared",
        ),
    )

    def pip(*args):
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"}, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"

    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src)
    (wheel,) = dist.glob("vafunc-*.whl")
    pip("install", "--no-deps", "--no-index", "--no-compile", "--target", site, wheel)
    # this interpreter's path without the checkout (and without anything that holds a `vafunc`)
    keep = [
        p
        for p in sys.path
        if p and Path(p).is_dir() and Path(p).resolve() != REPO.resolve() and not (Path(p) / "vafunc").exists()
    ]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run_env.update(PYTHONPATH=os.pathsep.join([str(site), *keep]), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    return site, run_env, wheel, tmp


def test_the_wheel_ships_the_data_files_and_nothing_of_the_checkout(installed):
    _, _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in _data_files():
        assert f"vafunc/{rel}" in names, f"vafunc/{rel} is not in the wheel: add it to package-data in pyproject.toml"
    assert "vafunc/io/hub/weights.csv" in names and "vafunc/io/hub/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] in ("benchmarks", "tests")]


def test_the_installed_package_reads_its_data_and_runs(installed):
    site, env, _, tmp = installed
    cwd = tmp / "elsewhere"
    cwd.mkdir(exist_ok=True)
    r = subprocess.run(
        [sys.executable, "-S", "-c", _CHECKS, str(site), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["file"]).resolve() == (site / "vafunc" / "__init__.py").resolve()
    assert got["table"] == [w.name for w in hub.list_weights()]
    w = hub.get_weights("resnet50", "IMAGENET1K_V2")
    assert got["resnet50"] == [w.file, w.acc1, w.crop_size, w.transforms().describe()]
    assert got["data"] == _data_files()

    # the installed console script (one model: listing computes every model's minimum input size)
    script = site / "bin" / "vafunc"
    r = subprocess.run(
        [sys.executable, "-S", str(script), "list", "resnet18"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "family"] and lines[-1] == "1 models"
    assert lines[1].split()[0] == "resnet18"
