"""``vafunc predict``, ``vafunc convert`` and the weights part of ``vafunc info``.

Kept apart from :mod:`vafunc.cli.app` so that ``vafunc list``/``info`` stay light; ``cli.build_parser``
calls :func:`add_parsers`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from vafunc.core import registry
from vafunc.core import tree as vtree
from vafunc.core.progress import Progress
from vafunc.io import hub
from vafunc.io.hub import timm_hub
from vafunc.serving import transforms as T
from vafunc.serving.imagenet_classes import IMAGENET_CATEGORIES

__all__ = ["add_parsers", "collect_images", "predict", "info_extra", "print_info_extra", "Progress"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


# --------------------------------------------------------------------------- progress


# --------------------------------------------------------------------------- predict


def collect_images(inputs) -> tuple[list[Path], bool]:
    """Files given, plus the image files (by suffix, sorted, not recursive) of folders given.
    Returns ``(paths, any_folder)``."""
    out, folder = [], False
    for arg in inputs:
        p = Path(arg).expanduser()
        if p.is_dir():
            folder = True
            found = sorted(
                q
                for q in p.iterdir()
                if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith(".")
            )
            if not found:
                raise ValueError(f"{p}: the folder has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such image file or folder")
    return out, folder


def resolve(
    name: str,
    weights: str,
    *,
    transform_tag: str | None = None,
    num_classes: int | None = None,
    device=None,
    method: str = "pil",
):
    """``(model, params, state, transform, categories, notes)`` for a model name and a weights tag or
    path. For a path, the evaluation transform (and the config it implies) is the table entry with
    the same file name, else ``transform_tag``, else the preprocessing, class names and config saved
    in the file's metadata (``vafunc demo``'s checkpoints), else the model's DEFAULT weights.
    ``weights`` may be timm's ``name.tag`` (read from the Hugging Face cache; ``name`` may then be ``None``)."""
    if timm_hub.is_timm_tag(weights):
        return _resolve_timm_tag(
            name, weights, transform_tag=transform_tag, num_classes=num_classes, device=device, method=method
        )
    if name is None:
        raise ValueError("--model is required unless --weights is a timm tag such as seresnet50.a1_in1k")
    registry.get_entry(name)  # unknown model: the registry's error, with suggestions
    path, w = hub.resolve_weights(name, weights)
    notes = []
    saved = _saved_preprocessing(path, method) if path is not None and transform_tag is None else None
    if saved is not None and (w is None or w.model != name):
        transform, categories, config = saved
        if num_classes is not None:
            config["num_classes"] = num_classes
        model = registry.get_model(name, **config)
        params, state = hub.load_weights(model, path, device=device)
        if categories is not None and len(categories) != getattr(model.config, "num_classes", len(categories)):
            categories = None
        notes.append(f"using the preprocessing saved in {path.name}: {transform.describe()}")
        return model, params, state, transform, categories, notes
    if w is not None and w.model != name:
        if path is None:
            raise ValueError(f"{w.name} are weights for {w.model}, not for {name}")
        notes.append(f"{path.name} is the file of {w.name}, but the model is {name}")
        w = None
    if transform_tag is not None:
        w = hub.get_weights(name, transform_tag)
    elif w is None:
        defaults = hub.list_weights(name)
        if defaults:
            w = defaults[0]
            notes.append(f"using the evaluation transform of {w.name} (pass --transform TAG to choose another)")
        else:
            notes.append(
                "no published weights for this model: using the standard ImageNet transform (resize 256, crop 224)"
            )
    config = dict(w.config) if w is not None else {}
    if num_classes is not None:
        config["num_classes"] = num_classes
    model = registry.get_model(name, **config)
    params, state = hub.load_weights(model, weights if path is not None else w, device=device)
    transform = w.transforms(method=method) if w is not None else T.Transform(256, 224, method=method)
    n_out = getattr(model.config, "num_classes", 1000)
    categories = w.categories if w is not None else IMAGENET_CATEGORIES if n_out == 1000 else None
    if categories is not None and len(categories) != n_out:  # fine-tuned to other classes
        categories = None
    return model, params, state, transform, categories, notes


def _resolve_timm_tag(name, weights: str, *, transform_tag, num_classes, device, method: str):
    """:func:`resolve` for timm's ``name.tag``: the weights from the tag's Hugging Face repository, the
    transform and classes from its pretrained config."""
    t = timm_hub.get_timm_tag(weights)
    if name is not None and name not in (t.model, t.timm_name):
        raise ValueError(f"{t.name} are weights for {t.model}, not for {name}")
    if num_classes is not None:
        raise ValueError(f"--num-classes does not apply to the timm tag {t.name}: its head has {t.num_classes} classes")
    model, params, state = hub.pretrained(t.name, device=device)
    if transform_tag is not None:
        tw = timm_hub.get_timm_tag(transform_tag) if timm_hub.is_timm_tag(transform_tag) else None
        transform = (tw or hub.get_weights(t.model, transform_tag)).transforms(method=method)
    else:
        transform = t.transforms(method=method)
    n_out = getattr(model.config, "num_classes", 0)
    if n_out == 0:
        raise ValueError(f"{t.name} has no classifier (num_classes=0: pooled features); vafunc predict needs classes")
    categories = t.categories if n_out == 1000 else None
    where = f"the Hugging Face repository {t.repo_id}" if t.hf_hub_id else "the torch.hub cache"
    notes = [f"weights {t.name} from {where}; evaluation transform: {transform.describe()}"]
    return model, params, state, transform, categories, notes


def _saved_preprocessing(path: Path, method: str):
    """``(transform, categories or None, config)`` from a checkpoint's metadata (``transform``: the
    keywords of :class:`vafunc.serving.transforms.Transform`, ``categories``: the class names, both
    JSON; ``num_classes`` and ``config``), or ``None`` if it saved no transform (or is no
    safetensors file: only those carry metadata)."""
    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return None
    try:
        _, meta, _ = hub.read_checkpoint(path)
    except (hub.WeightsError, ImportError):
        return None  # load_weights reports it
    if "transform" not in meta:
        return None
    transform = T.Transform(**json.loads(meta["transform"]), method=method)
    categories = json.loads(meta["categories"]) if "categories" in meta else None
    config = json.loads(meta["config"]) if "config" in meta else {}
    if "num_classes" in meta:
        config["num_classes"] = int(meta["num_classes"])
    return transform, categories, config


def predict(
    model,
    params,
    state,
    transform,
    images,
    *,
    topk: int = 5,
    batch_size: int = 16,
    device=None,
    categories=None,
    progress: Progress | None = None,
    skip_unreadable: bool = False,
) -> list[dict]:
    """Top-``topk`` classes of each image file: ``[{"image", "top": [{"index", "label", "probability"}]}]``."""
    if topk < 1:
        raise ValueError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        xs, ok = [], []
        for p in chunk:
            try:
                xs.append(transform(p))
                ok.append(p)
            except ValueError as err:
                if not skip_unreadable:
                    raise
                results.append({"image": str(p), "error": str(err)})
                print(f"vafunc predict: skipped {err}", file=sys.stderr)
        if xs:
            x = torch.cat(xs)
            if device is not None:
                x = x.to(device)
            with torch.inference_mode():
                logits, _ = model.apply(params, state, x)
            probs = logits.float().softmax(-1)
            k = min(topk, probs.shape[-1])
            top_p, top_i = probs.topk(k, dim=-1)
            for p, pi, ii in zip(ok, top_p.tolist(), top_i.tolist()):
                top = [
                    {"index": i, "label": categories[i] if categories else f"class {i}", "probability": pr}
                    for pr, i in zip(pi, ii)
                ]
                results.append({"image": str(p), "top": top})
        if progress is not None:
            progress.update(len(chunk))
    if progress is not None:
        progress.close()
    order = {str(p): i for i, p in enumerate(images)}
    return sorted(results, key=lambda r: order[r["image"]])


def cmd_predict(args) -> int:
    images, folder = collect_images(args.images)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, params, state, transform, categories, notes = resolve(
                args.model,
                args.weights,
                transform_tag=args.transform,
                num_classes=args.num_classes,
                device=args.device,
                method=args.resize_method,
            )
    except ImportError as err:
        print(f"vafunc predict: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        for note in notes + [str(c.message) for c in caught]:
            print(f"vafunc predict: note: {note}", file=sys.stderr)
    show = args.progress if args.progress is not None else (folder or len(images) > args.batch_size)
    bar = Progress(len(images), enabled=bool(show) and not args.quiet)
    if model.entry.task == "segmentation":
        return _predict_masks(args, model, params, state, transform, categories, images, bar)
    try:
        results = predict(
            model,
            params,
            state,
            transform,
            images,
            topk=args.topk,
            batch_size=args.batch_size,
            device=args.device,
            categories=categories,
            progress=bar,
            skip_unreadable=args.skip_unreadable,
        )
    except ImportError as err:
        print(f"vafunc predict: error: {err}", file=sys.stderr)
        return 2
    return _report(args, model, transform, results, _top_lines)


def _top_lines(r: dict) -> list[str]:
    return [f"  {100 * t['probability']:6.2f}%  {t['label']}  [{t['index']}]" for t in r["top"]]


def _report(args, model, transform, results: list[dict], lines) -> int:
    """Print ``vafunc predict``'s results: ``--json``, or each image with ``lines(result)`` (errors
    as such); exit status 1 if an image could not be read."""
    if args.json:
        doc = {"model": model.name, "weights": str(args.weights), "transform": transform.describe()}
        print(json.dumps({**doc, "results": results}, indent=2))
    else:
        for r in results:
            print(r["image"])
            print(f"  error: {r['error']}" if "error" in r else "\n".join(lines(r)))
    return 1 if any("error" in r for r in results) else 0


def _predict_masks(args, model, params, state, transform, categories, images, bar) -> int:
    """``vafunc predict`` for a segmentation model: a mask picture per image and its class counts."""
    from vafunc.cli.masks import segment

    results = segment(
        model,
        params,
        state,
        transform,
        images,
        out_dir=args.out_dir,
        device=args.device,
        categories=categories,
        progress=bar,
        skip_unreadable=args.skip_unreadable,
    )

    def lines(r: dict) -> list[str]:
        top = r["classes"][: args.topk]
        counts = [f"  {100 * c['fraction']:6.2f}%  {c['label']}  [{c['index']}]  {c['pixels']:,} pixels" for c in top]
        return [f"  mask: {r['mask']}", *counts]

    return _report(args, model, transform, results, lines)


# --------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and not args.force:
        raise ValueError(f"{dst} exists; pass --force to overwrite it")
    if dst.suffix.lower() not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"{dst}: unknown checkpoint suffix {dst.suffix!r}; use .safetensors, .pth or .pt")
    try:
        flat, meta, _ = hub.read_checkpoint(src)
        name, how = args.model, "given"
        known = hub.find_weights(src)
        if name is None and meta.get("vafunc.model"):
            name, how = meta["vafunc.model"], "from the file's metadata"
        if name is None and known is not None:
            name, how = known.model, f"from the file name ({known.name})"
        if name is None:
            fits = hub.identify(flat)
            if not fits:
                raise ValueError(
                    f"{src}: cannot tell which model this checkpoint is for (it fits no registered "
                    "model at its default config); pass --model NAME"
                )
            if len(fits) > 1:
                raise ValueError(f"{src}: the checkpoint fits several models ({', '.join(fits)}); pass --model NAME")
            name, how = fits[0], "from its tensor names and shapes"
        config = {}
        if known is not None and known.model == name:
            # shape-relevant config of the published file; keep every tensor (aux heads included)
            config = {k: v for k, v in known.config if k != "aux_logits"}
        if args.num_classes is not None:
            config["num_classes"] = args.num_classes
        model = registry.get_model(name, **config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, state = hub.load_weights(model, src)
        flat_out = vtree.to_state_dict(params, state)
        hub.save_weights(params, state, dst, metadata={"vafunc.model": name, "vafunc.converted_from": src.name})
        back, _, _ = hub.read_checkpoint(dst)
    except ImportError as err:
        print(f"vafunc convert: error: {err}", file=sys.stderr)
        return 2
    bad = sorted(set(flat_out) ^ set(back)) + [
        k for k in flat_out if k in back and not torch.equal(flat_out[k].cpu(), back[k])
    ]
    if bad:  # pragma: no cover - would be a bug in save_weights
        raise ValueError(f"{dst}: written file does not read back identically ({', '.join(bad[:5])})")
    for c in caught:
        print(f"vafunc convert: note: {c.message}", file=sys.stderr)
    n_params = vtree.count_params(params)
    print(
        f"{src} -> {dst}: {name} ({how}), {len(flat_out)} tensors, {n_params:,} parameters; "
        "verified: every tensor fits the model and reads back identically"
    )
    return 0


# --------------------------------------------------------------------------- info


def measured_gflops(model, size: int) -> float:
    """Multiply-adds (1e9) of one ``size`` x ``size`` image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    params, state = model.init(device="meta")
    x = torch.empty(1, model.in_channels, size, size, device="meta")
    model.min_size  # noqa: B018 - the first apply probes the size rule on meta: keep it out of the count
    with FlopCounterMode(display=False) as counter:
        model.apply(params, state, x)
    return counter.get_total_flops() / 2e9


def info_extra(model) -> dict:
    """``gflops`` (the published figure of the default weights, else counted) and ``weights``."""
    ws = hub.list_weights(model.name)
    if ws:
        # segmentation checkpoints are evaluated uncropped: torchvision counts them at 520x520
        gflops = {
            "gflops": ws[0].gflops,
            "gflops_input": ws[0].crop_size or ws[0].resize_size,
            "gflops_source": "published",
        }
    else:
        size = max(224, model.min_size)
        gflops = {"gflops": round(measured_gflops(model, size), 3), "gflops_input": size, "gflops_source": "counted"}
    tags = [t.meta for t in timm_hub.list_timm_tags(model.name)]  # timm's, on the Hugging Face hub
    return {**gflops, "weights": [w.meta for w in ws], "timm_tags": tags}


def print_info_extra(info: dict) -> None:
    print(
        f"{'gflops':>16}: {info['gflops']} (multiply-adds at {info['gflops_input']}x{info['gflops_input']}, "
        f"{info['gflops_source']})"
    )
    ws, tags = info["weights"], info.get("timm_tags", ())
    if not ws and not tags:
        print(f"{'weights':>16}: none published (load your own file with vafunc.load_weights(model, path))")
    for i, w in enumerate(ws):
        t = w["transform"]
        if "miou" in w:
            acc = f"mIoU {w['miou']:.1f} pixel acc {w['pixel_acc']:.1f}"
        else:
            acc = f"acc@1 {w['acc1']:.3f} acc@5 {w['acc5']:.3f}" if w["acc1"] is not None else "acc n/a"
        tag = w["tag"] + (" (default)" if w["default"] else "")
        print(
            f"{'weights' if i == 0 else '':>16}{':' if i == 0 else ' '} {tag:<30} {acc:<28} "
            f"{t['resize']}->{t['crop'] or 'uncropped'} {t['interpolation']:<8} {w['file']}"
        )
    for i, t in enumerate(tags):  # vafunc.hub.pretrained("name.tag"), from the Hugging Face hub
        tf = t["transform"]
        tag = t["tag"] + (" (default)" if t["default"] else "")
        print(
            f"{'timm tags' if i == 0 else '':>16}{':' if i == 0 else ' '} {tag:<50} {tf['resize']}->{tf['crop']} "
            f"{tf['interpolation']:<8} {t['hf_hub_id'] or 'not on the Hugging Face hub'}"
        )


# --------------------------------------------------------------------------- argparse


def add_parsers(sub) -> None:
    pp = sub.add_parser("predict", help="classify images with published or local weights")
    pp.add_argument("images", nargs="+", help="image files and/or folders of images")
    pp.add_argument("--model", default=None, help="model name (vafunc list); implied by a timm tag")
    pp.add_argument(
        "--weights",
        default="DEFAULT",
        help="a tag (DEFAULT, IMAGENET1K_V2, ...), a checkpoint path, or timm's name.tag (seresnet50.a1_in1k: "
        "from the Hugging Face hub through its cache, HF_HOME)",
    )
    pp.add_argument("--topk", type=int, default=5, help="how many classes to show per image (default 5)")
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    pp.add_argument(
        "--out-dir",
        default=None,
        help="segmentation models: where the <image>.mask.png pictures go (default: beside each image)",
    )
    pp.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    pp.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    pp.add_argument(
        "--transform",
        default=None,
        metavar="TAG",
        help="use this weights tag's evaluation transform (for a checkpoint path)",
    )
    pp.add_argument("--num-classes", type=int, default=None, help="for fine-tuned checkpoints")
    pp.add_argument(
        "--resize-method",
        choices=T.METHODS,
        default="pil",
        help="pil: Pillow's resampling, as the published accuracies; torch: F.interpolate",
    )
    pp.add_argument("--skip-unreadable", action="store_true", help="report unreadable images and go on")
    pp.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr (default: for folders and more than one batch)",
    )
    pp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    pp.add_argument("-q", "--quiet", action="store_true", help="no notes, no progress bar")
    pp.set_defaults(fn=cmd_predict)

    pc = sub.add_parser("convert", help="convert a checkpoint between .pth and .safetensors, verified")
    pc.add_argument("input", help="the checkpoint to read (.pth, .pt, .bin or .safetensors)")
    pc.add_argument("output", help="*.safetensors, *.pth or *.pt")
    pc.add_argument("--model", default=None, help="model name (inferred when omitted)")
    pc.add_argument("--num-classes", type=int, default=None, help="for fine-tuned checkpoints")
    pc.add_argument("--force", action="store_true", help="overwrite the output file")
    pc.set_defaults(fn=cmd_convert)
