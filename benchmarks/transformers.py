"""Transformers against torchvision, side by side in one process: ``python -m benchmarks.transformers``.

* ``eager``: inference, batch 8 @224, under ``torch.inference_mode`` (where torchvision's
  ``nn.MultiheadAttention`` takes its fused fast path), vafunc's ``apply`` vs the module;
* ``compiled``: ``vafunc.compile`` (freezing, channels_last) vs ``torch.compile`` of the module
  under inductor freezing, in float32 and bfloat16 (vafunc's precision policy vs ``module.bfloat16()``),
  with the share of the machine's matmul peak that the compiled vafunc model reaches;
* ``train``: one ViT-B/16 train step (batch 16 @224 by default) vs torchvision + ``torch.optim.AdamW``;
* ``timm``: timm's ViTs (``--models`` default :data:`TIMM_MODELS`) against timm's module
  (``timm.create_model(name, pretrained=False, dynamic_img_size=True)``, its weights loaded into
  vafunc): eager (``inference_mode``), and, unless ``--eager-only``, compiled as in ``compiled``
  in float32 and bfloat16, with the bf16 compiled model's agreement with vafunc's float32 eager
  one on photographs (top-1 where the model has a classifier, else the cosine similarity of the
  pooled features).

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


#: issue 29's performance set: DeiT, DINOv2 (run at 224), SigLIP (attention-pool head), EVA-02 (RoPE, SwiGLU)
TIMM_MODELS = (
    "deit_small_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_base_patch16_siglip_224",
    "eva02_small_patch14_224",
)


def _timm_pair(name, crops=None):
    """timm's module built for any size and vafunc's model with its weights; with ``crops``, the
    weights first perturbed and the classifier scaled as :func:`benchmarks.photos.realistic_random`
    does (where the model has one: the pooled-feature models keep timm's init)."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    model = vafunc.get_model(name)
    if crops is not None and model.config.num_classes:
        from benchmarks.photos import realistic_random

        with torch.no_grad():
            realistic_random(ref, crops)
    params, state = vafunc.from_state_dict(model, ref.state_dict())
    return ref, model, params, state


def _agreement(model, params, state, f, crops, batch) -> dict:
    """bf16 compiled ``f`` against vafunc's float32 eager output on ``crops`` (whole batches of
    ``batch``): top-1 agreement for a classifier, else the cosine similarity (mean, min) of the
    pooled features."""
    n = len(crops) // batch * batch
    with torch.no_grad():
        full = torch.cat([model.apply(params, state, crops[i : i + batch])[0] for i in range(0, n, batch)])
        low = torch.cat([f(crops[i : i + batch]).float() for i in range(0, n, batch)])
    if model.config.num_classes:
        return {
            "photos": n,
            "top1_agreement": round(float((low.argmax(1) == full.argmax(1)).float().mean()), 4),
            "distinct_top1": int(full.argmax(1).unique().numel()),
        }
    cos = torch.nn.functional.cosine_similarity(low, full, dim=1)
    return {"photos": n, "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}


def timm_compiled(name, batch, size, reps, dtype):
    from benchmarks.photos import photo_crops

    crops = photo_crops(size)
    ref, model, params, state = _timm_pair(name, crops[::3])
    x = torch.randn(batch, 3, size, size)
    low = dtype != torch.float32
    f = vafunc.compile(model, params, state, dtype=dtype if low else None, example=x)
    r = ref.to(dtype) if low else ref
    xr = x.to(dtype)
    g = torch.compile(r)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        g(xr)
        p = compare(name, lambda: f(x), lambda: g(xr), warmup=2, reps=reps)
    row = {
        "bench": "timm compiled",
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "size": size,
        **p.row(),
    }
    if low:
        row.update(_agreement(model, params, state, f, crops, batch))
    return row


def timm_profile(name, batch, size, reps=3, top=12, dtype=None):
    """Side-by-side ``torch.profiler`` op tables of vafunc's eager apply and timm's module (or of the
    two compiled graphs, ``dtype`` given): per aten op, calls and self CPU milliseconds per call of
    the forward, the largest differences first (where vafunc loses time)."""
    from torch.profiler import ProfilerActivity, profile

    ref, model, params, state = _timm_pair(name)
    x = torch.randn(batch, 3, size, size)
    fns = {"vafunc": lambda: model.apply(params, state, x), "timm": lambda: ref(x)}
    if dtype is not None:
        low = dtype != torch.float32
        f = vafunc.compile(model, params, state, dtype=dtype if low else None, example=x)
        xr = x.to(dtype)
        g = torch.compile(ref.to(dtype) if low else ref)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            g(xr)
        fns = {"vafunc": lambda: f(x), "timm": lambda: g(xr)}
    tables = {}
    with torch.inference_mode() if dtype is None else torch.no_grad():
        for side, fn in fns.items():
            fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    fn()
            tables[side] = {e.key: (e.count / reps, e.self_cpu_time_total / 1e3 / reps) for e in prof.key_averages()}
    keys = sorted(set(tables["vafunc"]) | set(tables["timm"]))
    diff = lambda k: tables["vafunc"].get(k, (0, 0))[1] - tables["timm"].get(k, (0, 0))[1]  # noqa: E731
    tot = {side: sum(v[1] for v in t.values()) for side, t in tables.items()}
    print(f"{name}: self CPU ms per forward: vafunc {tot['vafunc']:.1f}, timm {tot['timm']:.1f}")
    print(f"{'op':48s} {'vafunc calls':>12s} {'ms':>8s} {'timm calls':>10s} {'ms':>8s}")
    for k in sorted(keys, key=lambda k: -abs(diff(k)))[:top]:
        a, b = tables["vafunc"].get(k, (0, 0)), tables["timm"].get(k, (0, 0))
        print(f"{k[:48]:48s} {a[0]:12.0f} {a[1]:8.2f} {b[0]:10.0f} {b[1]:8.2f}")
    return tables


def eager(name, batch, size, reps, *, timm=False):
    """vafunc's ``apply`` against the reference module (torchvision's, or timm's built for any size
    with ``timm=True``), under ``inference_mode``."""
    ref, model, params, state = (_timm_pair if timm else _pair)(name)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        p = compare(name, lambda: model.apply(params, state, x), lambda: ref(x), warmup=2, reps=reps)
    bench = "timm eager" if timm else "eager"
    return {"bench": bench, "model": name, "dtype": "float32", "batch": batch, "size": size, **p.row()}


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
    ap.add_argument("what", nargs="*", default=["eager"], choices=["eager", "compiled", "train", "timm"])
    ap.add_argument("--models", nargs="+", default=None, help="default: vit_b_16 swin_t (timm: TIMM_MODELS)")
    ap.add_argument("--eager-only", action="store_true", help="timm: the eager comparison only")
    ap.add_argument("--profile", action="store_true", help="timm: print the op tables side by side instead")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="compiled / timm")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--train-batch", type=int, default=16)
    args = ap.parse_args(argv)
    info = machine_info()
    rows = []
    dtypes = [getattr(torch, d) for d in args.dtypes]
    for what in args.what:
        models = args.models or (list(TIMM_MODELS) if what == "timm" else ["vit_b_16", "swin_t"])
        for name in models:
            if what == "timm" and args.profile:
                for dt in [None] + ([] if args.eager_only else dtypes):
                    timm_profile(name, args.batch, args.size, dtype=dt)
                continue
            if what == "timm":
                rows.append(eager(name, args.batch, args.size, args.reps, timm=True))
                print(rows[-1], flush=True)
                for dt in () if args.eager_only else dtypes:
                    rows.append(timm_compiled(name, args.batch, args.size, args.reps, dt))
                    print(rows[-1], flush=True)
                continue
            if what == "eager":
                rows.append(eager(name, args.batch, args.size, args.reps))
            elif what == "compiled":
                for dt in dtypes:
                    rows.append(compiled(name, args.batch, args.size, args.reps, dt))
                    print(rows[-1], flush=True)
                continue
            elif name.startswith("vit"):
                rows.append(train(name, args.train_batch, args.size, max(3, args.reps // 2)))
            else:
                continue
            print(rows[-1], flush=True)
    if not rows:
        return 0
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
