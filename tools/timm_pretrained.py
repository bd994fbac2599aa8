"""Write ``vafunc/io/hub/timm_pretrained.csv``: timm's pretrained configs of every timm-named model vafunc has.

vafunc never imports timm at run time; what it needs of timm's ``pretrained_cfg`` to find a tag's
weights on the Hugging Face hub and to preprocess for them is stored as package data, one row per
published tag, read by :mod:`vafunc.io.hub.timm_hub`. This script reads those facts from the
installed timm (a test dependency)::

    python tools/timm_pretrained.py           # rewrite the file
    python tools/timm_pretrained.py --check   # exit 1 (with a diff) if the file is out of date

The models are the registered ones whose oracle is a timm builder without arguments that change
the network (``Reference("timm", name)``, or with ``dynamic_img_size``): the timm name is the
builder (``xception`` -> ``legacy_xception``, ``mobilenet_v1`` -> ``mobilenetv1_100``). A model
registered later in the same way (the timm ViTs) gets its tags by re-running this script;
``tests/test_timm_hub.py`` fails until the file equals what the installed timm says. Tags without
weights (``untrained``) are left out.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "vafunc" / "io" / "hub" / "timm_pretrained.csv"

#: the columns of the file, in order (vafunc.io.hub.timm_hub reads the same list)
COLUMNS = (
    "model",  # vafunc name
    "timm_name",  # timm's architecture name
    "tag",  # timm's pretrained tag
    "default",  # timm's default tag for the architecture
    "hf_hub_id",  # the Hugging Face repository (empty: timm publishes the file elsewhere)
    "url",  # timm's other download location (empty: none)
    "input_size",  # C x H x W
    "crop_pct",
    "crop_mode",
    "interpolation",
    "mean",  # "/"-separated
    "std",
    "num_classes",  # 0: pooled features, no classifier
)


def _fmt_floats(values) -> str:
    return "/".join(repr(float(v)) for v in values)


#: builder arguments of an oracle that leave its parameters as the timm name's checkpoints have them
#: (``dynamic_img_size``: the timm ViTs' oracle takes any input size); any other argument (the CBAM
#: ResNet's ``block_args``) makes another network, which timm's tags of that name do not fit
WEIGHT_NEUTRAL_KWARGS = frozenset({"dynamic_img_size"})


def timm_models() -> list[tuple[str, str]]:
    """``(vafunc name, timm name)`` of every registered model whose oracle is timm's builder of that
    name (with at most weight-neutral arguments)."""
    import vafunc
    from vafunc.core import registry

    out = []
    for name in vafunc.list_models():
        ref = registry.get_entry(name).reference
        if ref is not None and ref.source == "timm" and {k for k, _ in ref.kwargs} <= WEIGHT_NEUTRAL_KWARGS:
            out.append((name, ref.builder))
    return out


def collect() -> list[dict[str, str]]:
    """The rows, from the installed timm's pretrained configs."""
    import timm
    from timm.models import get_pretrained_cfg

    rows = []
    for model, timm_name in timm_models():
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{timm_name}.*")]
        if not tags:
            continue  # timm publishes no weights for it (efficientnet_lite1..4, coatnet_0_224)
        default = get_pretrained_cfg(timm_name).tag
        tags.sort(key=lambda t: t != default)  # the default first, then timm's (sorted) order
        for tag in tags:
            cfg = get_pretrained_cfg(f"{timm_name}.{tag}").to_dict()
            rows.append(
                {
                    "model": model,
                    "timm_name": timm_name,
                    "tag": tag,
                    "default": "true" if tag == default else "false",
                    "hf_hub_id": cfg.get("hf_hub_id") or "",
                    "url": cfg.get("url") or "",
                    "input_size": "x".join(str(int(v)) for v in cfg["input_size"]),
                    "crop_pct": repr(float(cfg["crop_pct"])),
                    "crop_mode": cfg.get("crop_mode") or "center",
                    "interpolation": cfg["interpolation"],
                    "mean": _fmt_floats(cfg["mean"]),
                    "std": _fmt_floats(cfg["std"]),
                    "num_classes": str(int(cfg.get("num_classes") or 0)),
                }
            )
    return rows


def render(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare, do not write; exit 1 if out of date")
    args = p.parse_args(argv)
    import timm

    text = render(collect())
    if args.check:
        old = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if old == text:
            print(f"{OUT.relative_to(REPO)} is up to date with timm {timm.__version__}")
            return 0
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), "packaged", "timm"))
        return 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}: {text.count(chr(10)) - 1} tags from timm {timm.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
