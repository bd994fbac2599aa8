"""Dense prediction against its references, side by side in one process:
``python -m benchmarks.segmentation [--models ...] [--batch B] [--size S] [--compiled] [--threads 2]``.

* ``deeplabv3_resnet50``, ``lraspp_mobilenet_v3_large`` (batch 2 @ 520 by default, the size of the
  published evaluation): vafunc's ``apply`` against torchvision's module holding the same weights;
  with ``--compiled``, ``vafunc.compile`` (freezing, channels_last) against ``torch.compile`` of the
  module (freezing, channels_last input and weights);
* ``basic_unet``: vafunc's ``apply`` against MONAI's ``BasicUNet(spatial_dims=2, in_channels=3,
  out_channels=2)`` holding the same weights;
* ``unet``: the padded BatchNorm U-Net (``padding="same", norm="batch"``, 3 channels in, 1 class)
  against the same network written as a plain ``torch.nn`` module (:class:`TorchUNet`: what a user
  would otherwise write, milesial's Pytorch-UNet with vafunc's state_dict names).

Eager inference (eval, ``torch.inference_mode``), the two timed alternately after warm-up
(:func:`benchmarks.harness.compare`); ratio = the reference's time / vafunc's (> 1: vafunc is
faster), with the paired ratios' quartiles, and each side's peak extra memory over one call
(:func:`benchmarks.harness.peak_memory_mb`). Rows are appended to ``benchmarks/results/segmentation.csv``.
A new case is a function ``name -> (vafunc model, reference module)`` in :data:`CASES`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch import nn

import vafunc
from benchmarks.harness import append_rows, compare, fix_malloc_thresholds, machine_info, peak_memory_mb

RESULTS = os.path.join(os.path.dirname(__file__), "results", "segmentation.csv")


def double_conv(cin: int, cout: int, padding: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        if batch_norm:
            layers += [nn.Conv2d(c, cout, 3, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        else:
            layers += [nn.Conv2d(c, cout, 3, padding=padding), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class TorchUNet(nn.Module):
    """Ronneberger et al. 2015, Fig. 1, in plain torch.nn, with vafunc's state_dict names: what a user
    would otherwise write (tests/test_unet.py's oracle, this benchmark's reference);
    ``padding=1, batch_norm=True``: the padded BatchNorm variant (the up-sampled map zero-padded to
    its skip's size)."""

    def __init__(self, in_channels=1, num_classes=2, widths=(64, 128, 256, 512, 1024), padding=0, batch_norm=False):
        super().__init__()
        self.padding = padding
        self.levels = n = len(widths)
        c = in_channels
        for i, w in enumerate(widths, 1):
            self.add_module(f"enc{i}", double_conv(c, w, padding, batch_norm))
            if i < n:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
            c = w
        for i in range(n - 1, 0, -1):
            w = widths[i - 1]
            self.add_module(f"up{i}", nn.ConvTranspose2d(c, w, 2, stride=2))
            self.add_module(f"dec{i}", double_conv(2 * w, w, padding, batch_norm))
            c = w
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        skips = []
        for i in range(1, self.levels):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
            x = getattr(self, f"pool{i}")(x)
        x = getattr(self, f"enc{self.levels}")(x)
        for i in range(self.levels - 1, 0, -1):
            up, skip = getattr(self, f"up{i}")(x), skips[i - 1]
            dh, dw = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
            if self.padding == 0:  # centre crop of the skip (Fig. 1, "copy and crop")
                skip = skip[..., dh // 2 : dh // 2 + up.shape[-2], dw // 2 : dw // 2 + up.shape[-1]]
            else:
                up = nn.functional.pad(up, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
            x = getattr(self, f"dec{i}")(torch.cat([skip, up], 1))
        return self.head(x)


def _torchvision(name: str) -> Callable[[], tuple]:
    def build() -> tuple:
        import torchvision

        ref = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
        return vafunc.get_model(name), ref

    return build


def basic_unet() -> tuple:
    from monai.networks.nets import BasicUNet

    return vafunc.get_model("basic_unet"), BasicUNet(spatial_dims=2, in_channels=3, out_channels=2)


def unet() -> tuple:
    model = vafunc.get_model("unet", padding="same", norm="batch", in_channels=3, num_classes=1)
    return model, TorchUNet(3, 1, padding=1, batch_norm=True)


#: model name -> (vafunc model, reference module); the reference's random weights are loaded into vafunc's
CASES: dict[str, Callable[[], tuple]] = {
    "deeplabv3_resnet50": _torchvision("deeplabv3_resnet50"),
    "lraspp_mobilenet_v3_large": _torchvision("lraspp_mobilenet_v3_large"),
    "basic_unet": basic_unet,
    "unet": unet,
}
#: (batch, size) per case unless given: the issue's settings
SHAPES = {
    "deeplabv3_resnet50": (2, 520),
    "lraspp_mobilenet_v3_large": (2, 520),
    "basic_unet": (4, 256),
    "unet": (4, 256),
}


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def _compiled_pair(model, params, state, ref, x):
    """``vafunc.compile`` and the reference under ``torch.compile`` with the same settings: freezing,
    channels_last weights and input; both compiled (called once) before timing."""
    f = vafunc.compile(model, params, state, example=x)
    ref = ref.to(memory_format=torch.channels_last)
    cr = torch.compile(ref)
    xc = x.contiguous(memory_format=torch.channels_last)

    def run_ref():
        with torch._inductor.config.patch(freezing=True):
            return cr(xc)

    run_ref()
    return (lambda: f(x)), run_ref


def bench(name: str, batch: int, size: int, reps: int, warmup: int, compiled: bool = False) -> dict:
    model, ref = CASES[name]()
    ref = ref.eval()
    params, state = vafunc.from_state_dict(model, {k: v.clone() for k, v in ref.state_dict().items()})
    x = torch.randn(batch, model.in_channels, size, size)
    with torch.no_grad():
        if compiled:
            run, run_ref = _compiled_pair(model, params, state, ref, x)
        else:
            run, run_ref = (lambda: model.apply(params, state, x)[0]), (lambda: ref(x))
        want, got = _out(run_ref()), _out(run())
        err = float((got - want).abs().max() / want.abs().max())
        pair = compare(name, run, run_ref, warmup=warmup, reps=reps)
        mem_vafunc = peak_memory_mb(run)
        mem_ref = peak_memory_mb(run_ref)
    return {
        "bench": "segmentation compiled" if compiled else "segmentation eager",
        "model": name,
        "batch": batch,
        "size": size,
        **pair.row(),
        "peak_mb_vafunc": round(mem_vafunc, 1),
        "peak_mb_ref": round(mem_ref, 1),
        "max_rel_diff": err,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segmentation", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--batch", type=int, default=None, help="default: per model (SHAPES)")
    p.add_argument("--size", type=int, default=None, help="default: per model (SHAPES)")
    p.add_argument("--compiled", action="store_true", help="vafunc.compile against torch.compile (freezing)")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default="", help="a label for the rows (e.g. 'machine shared')")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fix_malloc_thresholds()  # peak memory follows what each side holds (see harness)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']} {args.note}")
    print("| model | batch x size | vafunc ms | reference ms | ratio ref/vafunc (IQR) | peak MiB vafunc / ref |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        b, sz = SHAPES[name]
        r = bench(name, args.batch or b, args.size or sz, args.reps, args.warmup, args.compiled)
        print(
            f"| {name} | {r['batch']}x{r['size']} | {r['median_a_ms']:.0f} | {r['median_b_ms']:.0f} | "
            f"{r['ratio']:.3f} ({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}) | "
            f"{r['peak_mb_vafunc']:.0f} / {r['peak_mb_ref']:.0f} |",
            flush=True,
        )
        rows.append({"date": time.strftime("%Y-%m-%d %H:%M"), **r, "note": args.note, **info})
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
