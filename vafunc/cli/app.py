"""The ``vafunc`` command: ``vafunc list``, ``vafunc info NAME``, ``vafunc predict``, ``vafunc convert``,
``vafunc demo``.

The benchmarks are not part of the installed package: from a source checkout, run them as
``python -m benchmarks report`` (docs/cli.md, benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from vafunc.core import registry
from vafunc.io.state_dict import state_dict_size

__all__ = ["main", "model_table"]

#: the rows of ``vafunc list`` for the registered models, computed once (the minimum input size
#: is probed per model, seconds each); ``tests/test_readme.py`` checks the file against the registry


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _live_row(name: str) -> dict:
    e = registry.get_entry(name)
    return {
        "name": name,
        "family": e.family.name,
        "task": e.task,
        "params": e.params,
        "min_size": registry.get_model(name).min_size,
        "reference": str(e.reference) if e.reference else "-",
        # what vafunc.hub.identify() compares first: the state_dict's entries and elements, without
        # the num_batches_tracked counters (old checkpoints lack them)
        "state_dict": list(state_dict_size(registry.get_model(name).state_dict_shapes())),
    }


def write_model_rows(path=None) -> None:
    """Recompute every row and write the package's ``vafunc/core/models.json`` (after a registry change)."""
    path = path or os.path.join(os.path.dirname(registry.__file__), registry.MODELS_FILE)
    rows = [_live_row(n) for n in registry.list_models()]
    with open(path, "w", encoding="utf-8") as f:
        f.write(_dump_rows(rows))


def _dump_rows(rows: list[dict]) -> str:
    return "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"  # one model a line


def model_rows(
    pattern: str | None = None, family: str | None = None, *, task: str | None = None, live: bool = False
) -> list[dict]:
    """``vafunc list``'s rows: from ``vafunc/core/models.json`` where it holds the model with the same family,
    task and parameter count, else (and with ``live=True``) computed."""
    stored = {} if live else registry.stored_rows()
    rows = []
    for name in registry.list_models(pattern):
        e = registry.get_entry(name)
        if family and e.family.name != family or task and e.task != task:
            continue
        r = stored.get(name)
        if r is None or (r["family"], r.get("task"), r["params"]) != (e.family.name, e.task, e.params):
            r = _live_row(name)
        rows.append(r)
    return rows


def model_table(pattern: str | None = None, family: str | None = None, task: str | None = None) -> str:
    """The registry as a markdown table (docs/models.md's table is this output)."""
    lines = ["| model | family | task | parameters | min input | reference (oracle) |", "|---|---|---|---:|---:|---|"]
    for r in model_rows(pattern, family, task=task):
        lines.append(
            f"| `{r['name']}` | {r['family']} | {r['task']} | {r['params']:,} | {r['min_size']} | `{r['reference']}` |"
        )
    return "\n".join(lines)


def _cmd_list(args) -> int:
    rows = model_rows(args.filter, args.family, task=args.task)
    if args.markdown:
        print(model_table(args.filter, args.family, args.task))
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models match {args.filter!r}", file=sys.stderr)
        return 1
    w = max(len(r["name"]) for r in rows)
    wf = max(len(r["family"]) for r in rows)
    wt = max(len(r["task"]) for r in rows)
    print(f"{'model':<{w}}  {'family':<{wf}}  {'task':<{wt}}  {'params':>8}  {'min':>4}  reference")
    for r in rows:
        print(
            f"{r['name']:<{w}}  {r['family']:<{wf}}  {r['task']:<{wt}}  {_fmt_params(r['params']):>8}  "
            f"{r['min_size']:>4}  {r['reference']}"
        )
    print(f"{len(rows)} models")
    return 0


def _cmd_info(args) -> int:
    model = registry.get_model(args.name)
    e = model.entry
    shapes = model.state_dict_shapes()
    feats = model.feature_shapes()
    info = {
        "name": model.name,
        "family": e.family.name,
        "task": e.task,
        "parameters": e.params,
        "state_dict_keys": len(shapes),
        "min_input_size": model.min_size,
        "max_input_size": model.max_size,
        "size_multiple": model.size_multiple,
        "reference": str(e.reference) if e.reference else None,
        "paper": e.paper,
        "config": {k: v for k, v in vars(model.config).items()},
        "features": {k: list(v) for k, v in feats.items()},
        **dict(e.extra),
    }
    if e.notes:
        info["notes"] = e.notes
    from vafunc.cli import weights as _cli_weights  # weights table and GFLOPs

    info.update(_cli_weights.info_extra(model))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for k in (
        "name",
        "family",
        "task",
        "parameters",
        "state_dict_keys",
        "min_input_size",
        "max_input_size",
        "size_multiple",
        "reference",
        "paper",
    ):
        v = info[k]
        if k == "max_input_size" and v is None or k == "size_multiple" and v == 1:
            continue
        print(f"{k:>16}: {v:,}" if isinstance(v, int) else f"{k:>16}: {v}")
    for k, v in e.extra:
        print(f"{k:>16}: {v}")
    print(f"{'config':>16}: " + ", ".join(f"{k}={v!r}" for k, v in info["config"].items()))
    _cli_weights.print_info_extra(info)
    print(f"{'features':>16}: {len(feats)} (shapes at {max(224, model.min_size)}px)")
    for k, v in feats.items():
        print(f"{'':>18}{k:<32} {list(v)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vafunc", description="Classic vision networks as pure functions.")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="list registered models")
    pl.add_argument("filter", nargs="?", default=None, help="shell-style pattern, e.g. 'resnet*'")
    pl.add_argument("--family", default=None, help="only this family (resnet, vgg, ...)")
    pl.add_argument("--task", default=None, choices=registry.TASKS, help="only models of this task")
    pl.add_argument("--markdown", action="store_true", help="print the model table as markdown (docs/models.md)")
    pl.add_argument("--json", action="store_true", help="machine-readable output (a JSON list of rows)")
    pl.set_defaults(fn=_cmd_list)
    pi = sub.add_parser("info", help="parameters, minimum size, features of one model")
    pi.add_argument("name", help="model name (vafunc list)")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=_cmd_info)
    from vafunc.cli import demo
    from vafunc.cli import weights as _cli_weights

    _cli_weights.add_parsers(sub)  # predict, convert
    demo.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a closed pipe (vafunc list | head) shows here, not at exit
        return rc
    except BrokenPipeError:
        # the reader went away: send the rest of the output nowhere, quietly (Python's recipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, TypeError) as err:
        print(f"vafunc {args.command}: error: {_in_cli_words(str(err))}", file=sys.stderr)
        return 2


def _in_cli_words(message: str) -> str:
    """The library's hints name Python keywords (``num_classes=10``); here they are options."""
    return re.sub(r"\bnum_classes=(\d+)", r"--num-classes \1", message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
