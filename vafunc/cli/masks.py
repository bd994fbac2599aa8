"""``vafunc predict`` for segmentation models: a class per pixel, written as a picture.

Each image goes through the model on its own (the evaluation transform keeps the aspect ratio and
does not crop, so images differ in size); the per-pixel argmax of ``out`` is resized back to the
photograph (nearest neighbour), painted over it in one colour per class (the PASCAL VOC colour map;
the background class left clear) and saved as ``<image stem>.mask.png`` beside a count of the pixels
of each class.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["voc_colormap", "segment", "overlay"]


def voc_colormap(n: int = 256) -> torch.Tensor:
    """``[n, 3]`` uint8 colours of the PASCAL VOC label maps: the bits of the class index, three at a
    time (red, green, blue), fill each channel from its most significant bit down."""
    out = torch.zeros(n, 3, dtype=torch.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        out[i] = torch.tensor(rgb, dtype=torch.uint8)
    return out


def overlay(photo: torch.Tensor, mask: torch.Tensor, *, alpha: float = 0.6, background: int | None = 0) -> torch.Tensor:
    """``photo`` (uint8 ``[3, H, W]``) with each pixel of ``mask`` (``[H, W]`` labels) blended
    ``alpha`` of the way to its class's colour; pixels of class ``background`` stay as they are."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if photo.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"photo {list(photo.shape)} and mask {list(mask.shape)} must have one size")
    colours = voc_colormap(max(256, int(mask.max()) + 1))[mask.long()].permute(2, 0, 1).float()
    blend = photo.float() * (1 - alpha) + colours * alpha
    if background is not None:
        blend = torch.where(mask[None] == background, photo.float(), blend)
    return blend.round().clamp(0, 255).to(torch.uint8)


def _save_png(image: torch.Tensor, path: Path) -> None:
    """Write ``[3, H, W]`` uint8 as PNG atomically (a temporary file renamed over the target)."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def segment(
    model,
    params,
    state,
    transform,
    images,
    *,
    out_dir=None,
    device=None,
    categories=None,
    alpha: float = 0.6,
    progress=None,
    skip_unreadable: bool = False,
) -> list[dict]:
    """Per image: ``{"image", "mask": path of the PNG written, "size": [H, W], "classes": [{"index",
    "label", "pixels", "fraction"}]}`` (classes present, most pixels first). The PNGs go to
    ``out_dir`` (default: beside each image)."""
    from vafunc.serving._imageops import open_image, to_tensor

    results = []
    for p in images:
        p = Path(p)
        try:
            photo = to_tensor(open_image(p).convert("RGB"))
            x = transform(p)
        except ValueError as err:
            if not skip_unreadable:
                raise
            results.append({"image": str(p), "error": str(err)})
            print(f"vafunc predict: skipped {err}", file=sys.stderr)
            continue
        if device is not None:
            x = x.to(device)
        with torch.inference_mode():
            out, _ = model.apply(params, state, x)
        logits = (out["out"] if isinstance(out, dict) else out).float()
        h, w = photo.shape[-2:]
        labels = logits.argmax(1, keepdim=True).to(torch.uint8 if logits.shape[1] <= 256 else torch.int32)
        mask = F.interpolate(labels.float(), size=(h, w), mode="nearest").long()[0, 0].cpu()
        counts = torch.bincount(mask.reshape(-1), minlength=logits.shape[1])
        target = (Path(out_dir) if out_dir else p.parent) / f"{p.stem}.mask.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_png(overlay(photo, mask, alpha=alpha), target)
        present = [int(i) for i in torch.argsort(counts, descending=True, stable=True) if counts[i] > 0]
        classes = [
            {
                "index": i,
                "label": categories[i] if categories else f"class {i}",
                "pixels": int(counts[i]),
                "fraction": float(counts[i]) / (h * w),
            }
            for i in present
        ]
        results.append({"image": str(p), "mask": str(target), "size": [h, w], "classes": classes})
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return results
