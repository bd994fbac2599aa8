"""Transformers against torchvision, side by side in one process: ``python -m benchmarks.transformers``.

* ``eager``: inference, batch 8 @224, under ``torch.inference_mode`` (where torchvision's
  ``nn.MultiheadAttention`` takes its fused fast path), vafunc's ``apply`` vs the module;
* ``compiled``: ``vafunc.compile`` (freezing, channels_last) vs ``torch.compile`` of the module
  under inductor freezing, in float32 and bfloat16 (vafunc's precision policy vs ``module.bfloat16()``),
  with the share of the machine's matmul peak that the compiled vafunc model reaches;
* ``train``: one ViT-B/16 train step (batch 16 @224 by default) vs torchvision + ``torch.optim.AdamW``.

Rows are appended to ``benchmarks/results/transformers.csv``: paired medians, ratio = torchvision
time / vafunc time (> 1: vafunc is faster).
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

import vafunc
from benchmarks.harness import compare, machine_info, matmul_peak
from vafunc.training import optim
from vafunc.training.train import make_train_step

RESULTS = os.path.join(os.path.dirname(__file__), "results", "transformers.csv")


def _tv(name):
    from benchmarks.__main__ import reference_module

    return reference_module(name)


def _pair(name):
    ref = _tv(name)
    model = vafunc.get_model(name)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    return ref, model, params, state


def eager(name, batch, size, reps):
    ref, model, params, state = _pair(name)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        p = compare(name, lambda: model.apply(params, state, x), lambda: ref(x), warmup=2, reps=reps)
    return {"bench": "eager", "model": name, "dtype": "float32", "batch": batch, "size": size, **p.row()}


def compiled(name, batch, size, reps, dtype):
    ref, model, params, state = _pair(name)
    x = torch.randn(batch, 3, size, size)
    f = vafunc.compile(model, params, state, dtype=None if dtype == torch.float32 else dtype, example=x)
    r = ref if dtype == torch.float32 else ref.to(dtype)
    xr = x.to(dtype)
    g = torch.compile(r)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        g(xr)
        p = compare(name, lambda: f(x), lambda: g(xr), warmup=2, reps=reps)
    from vafunc.cli.weights import measured_gflops

    gflop = 2 * measured_gflops(model, size) * batch  # FLOPs (2 per multiply-add) of the batch, in 1e9
    share = gflop / (p.median_a_ms / 1e3) / matmul_peak(dtype)
    return {
        "bench": "compiled",
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "size": size,
        **p.row(),
        "peak_share": round(share, 3),
    }


def train(name, batch, size, reps):
    import torch.nn.functional as F

    ref = _tv(name).train()
    model = vafunc.get_model(name)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    opt = optim.adamw(1e-4, weight_decay=0.05)
    opt_state = opt.init(params)
    step = make_train_step(model, opt, donate=True)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)
    box = [params, state, opt_state]

    def mine():
        box[0], box[1], box[2], _ = step(box[0], box[1], box[2], x, y)

    def theirs():
        topt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        topt.step()

    p = compare(name, mine, theirs, warmup=1, reps=reps)
    return {"bench": "train", "model": name, "dtype": "float32", "batch": batch, "size": size, **p.row()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", default=["eager"], choices=["eager", "compiled", "train"])
    ap.add_argument("--models", nargs="+", default=["vit_b_16", "swin_t"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--train-batch", type=int, default=16)
    args = ap.parse_args(argv)
    info = machine_info()
    rows = []
    for what in args.what:
        for name in args.models:
            if what == "eager":
                rows.append(eager(name, args.batch, args.size, args.reps))
            elif what == "compiled":
                for dt in (torch.float32, torch.bfloat16):
                    rows.append(compiled(name, args.batch, args.size, args.reps, dt))
                    print(rows[-1], flush=True)
                continue
            elif name.startswith("vit"):
                rows.append(train(name, args.train_batch, args.size, max(3, args.reps // 2)))
            else:
                continue
            print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    old = []
    if os.path.exists(RESULTS):
        with open(RESULTS, newline="") as f:
            old = list(csv.DictReader(f))
    new = [{**info, **r} for r in rows]
    keys = list(dict.fromkeys([k for r in old + new for k in r]))
    tmp = RESULTS + ".tmp"
    with open(tmp, "w", newline="") as f:  # rewritten whole (new columns), then moved into place
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(old + new)
    os.replace(tmp, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
