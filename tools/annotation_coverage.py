"""Annotation coverage: the share of function parameters (``self``/``cls`` excluded) that carry an
annotation, per file and overall, over ``vafunc/`` and ``torch_compat/``; and the share of
functions with a return annotation (``__init__`` excluded).

    python tools/annotation_coverage.py            # every file, then the summary groups
    python tools/annotation_coverage.py --summary  # the summary groups only
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vafunc", "torch_compat")
GROUPS = {  # summary rows: a label and the files (relative paths, or a folder ending in "/")
    "core/kit.py": "vafunc/core/kit.py",
    "core/layers.py": "vafunc/core/layers.py",
    "core/blocks.py": "vafunc/core/blocks.py",
    "research/persample.py": "vafunc/research/persample.py",
    "models/ (all)": "vafunc/models/",
}


def count(path: Path) -> tuple[int, int, int, int]:
    """``(annotated params, params, functions with a return annotation, functions)`` of one file."""
    tree = ast.parse(path.read_text(), str(path))
    done = total = ret = funcs = 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        params += [p for p in (a.vararg, a.kwarg) if p is not None]
        params = [p for p in params if p.arg not in ("self", "cls")]
        total += len(params)
        done += sum(p.annotation is not None for p in params)
        if node.name != "__init__":
            funcs += 1
            ret += node.returns is not None
    return done, total, ret, funcs


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:5.1f}%" if b else "   - "


def main(argv: list[str]) -> None:
    per = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            per[path.relative_to(REPO).as_posix()] = count(path)
    rows = []
    if "--summary" not in argv:
        rows += list(per.items())
    for label, sel in GROUPS.items():
        hits = [v for k, v in per.items() if (k.startswith(sel) if sel.endswith("/") else k == sel)]
        rows.append((label, tuple(map(sum, zip(*hits))) if hits else (0, 0, 0, 0)))
    rows.append(("overall", tuple(map(sum, zip(*per.values())))))
    w = max(len(r[0]) for r in rows)
    print(f"{'file':<{w}}  params annotated       returns annotated")
    for name, (d, t, r, f) in rows:
        print(f"{name:<{w}}  {d:5d}/{t:<5d} {pct(d, t)}   {r:5d}/{f:<5d} {pct(r, f)}")


if __name__ == "__main__":
    main(sys.argv[1:])
