"""The image operations behind :mod:`vafunc.serving.transforms` (decode, resize, crop, scale, normalise,
and the :class:`Transform` that chains them); see that module for the documentation.

This module imports nothing from vafunc, so the weights table (:mod:`vafunc.hub.table`, whose
:meth:`~vafunc.hub.Weights.transforms` builds a :class:`Transform`) and :mod:`vafunc.serving.transforms`
(whose :func:`~vafunc.transforms.for_weights` looks a checkpoint up in that table) can both
depend on it without depending on each other.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "Transform",
    "decode",
    "open_image",
    "to_tensor",
    "resize",
    "resized_shape",
    "center_crop",
    "to_float",
    "normalize",
    "reverse_channels",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
METHODS = ("pil", "torch")

_PIL_HINT = "decoding images needs Pillow: pip install 'vafunc[images]'"


# --------------------------------------------------------------------------- decode


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_PIL_HINT) from err
    return Image


def to_tensor(image) -> torch.Tensor:
    """A ``PIL.Image`` (converted to RGB) or an ``[H, W, C]``/``[H, W]`` ``uint8`` array -> ``uint8
    [3, H, W]`` (grayscale is repeated to 3 channels; an alpha channel is dropped)."""
    if isinstance(image, torch.Tensor):
        return image
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        if image.mode != "RGB":
            image = image.convert("RGB")
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()
    if hasattr(image, "__array__"):
        import numpy as np

        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image array, got dtype {a.dtype}")
        if a.ndim == 2:
            a = a[:, :, None].repeat(3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"expected an [H, W, 3] image array, got shape {list(a.shape)}")
        return torch.from_numpy(np.ascontiguousarray(a[:, :, :3])).permute(2, 0, 1).contiguous()
    raise TypeError(f"cannot make an image tensor from {type(image).__name__}")


def open_image(source, *, exif_transpose: bool = False):
    """Open and fully read an image file (path, bytes or binary file object) as an RGB
    ``PIL.Image``. Unreadable files raise ``ValueError`` naming the file and the reason."""
    Image = _pil()
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as im:
            if exif_transpose:
                from PIL import ImageOps

                im = ImageOps.exif_transpose(im)
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except FileNotFoundError as err:
        raise ValueError(f"{name}: no such image file") from err
    except IsADirectoryError as err:
        raise ValueError(f"{name}: is a folder, not an image") from err
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"{name}: not an image Pillow can read (unknown or unsupported format)") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: cannot decode the image ({err}); the file may be truncated or corrupt") from err


def decode(source, *, exif_transpose: bool = False) -> torch.Tensor:
    """Decode an image file (path, bytes or binary file object) to ``uint8 [3, H, W]`` RGB.

    Palette, grayscale, CMYK and alpha images are converted to RGB as ``PIL.Image.convert("RGB")``
    does. ``exif_transpose=True`` applies the EXIF orientation (off by default, like
    ``PIL.Image.open`` and torchvision's examples). Unreadable files raise ``ValueError`` naming the
    file and the reason.
    """
    return to_tensor(open_image(source, exif_transpose=exif_transpose))


# --------------------------------------------------------------------------- resize


def _check_image(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects an image tensor [C, H, W] or [N, C, H, W], got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{what} expects an image tensor [C, H, W] or [N, C, H, W], got shape {list(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"{what} expects a uint8 or floating-point image, got dtype {x.dtype}")


def resized_shape(height: int, width: int, size) -> tuple[int, int]:
    """Output ``(h, w)`` of :func:`resize`: ``size`` an int resizes the shorter side to ``size`` and
    the longer one to ``int(size * long / short)`` (torchvision's rule, truncating); a pair is
    ``(h, w)``."""
    if isinstance(size, (tuple, list)):
        if len(size) == 1:
            size = size[0]
        elif len(size) == 2:
            return int(size[0]), int(size[1])
        else:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _bilinear_filter(x):
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _bicubic_filter(x, a: float = -0.5):
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's and torch's antialiased bicubic)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


_FILTERS = {"bilinear": (1.0, _bilinear_filter), "bicubic": (2.0, _bicubic_filter)}
_PRECISION_BITS = 22  # Pillow: 32 - 8 (pixel) - 2 (headroom for negative lobes)


def _pil_weights(in_size: int, out_size: int, interpolation: str, device):
    """Pillow's resampling weights along one axis: output pixel ``i`` reads inputs
    ``start[i] + j`` for taps ``j < count[i]`` with weights ``w[i, j]`` (float64) and the 8-bit path's
    fixed-point ``wq[i, j]``. Antialiasing: when shrinking, the kernel is stretched by the scale."""
    support, kernel = _FILTERS[interpolation]
    f64 = dict(dtype=torch.float64, device=device)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (torch.arange(out_size, **f64) + 0.5) * scale
    start = torch.trunc(center - support + 0.5).clamp(min=0)
    count = torch.trunc(center + support + 0.5).clamp(max=in_size) - start
    taps = torch.arange(ksize, **f64)
    w = kernel((taps[None, :] + start[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = torch.where(taps[None, :] < count[:, None], w, torch.zeros_like(w))
    total = w[:, 0]
    for j in range(1, ksize):  # summed in tap order, as Pillow does
        total = total + w[:, j]
    w = torch.where(total[:, None] != 0, w / total[:, None], w)
    one = float(1 << _PRECISION_BITS)
    wq = torch.where(w < 0, torch.trunc(-0.5 + w * one), torch.trunc(0.5 + w * one))
    index = (start.long()[:, None] + taps.long()[None, :]).clamp(max=in_size - 1)
    return index, w, wq.to(torch.int32)


def _pil_pass(x: torch.Tensor, out_size: int, dim: int, interpolation: str) -> torch.Tensor:
    """One separable Pillow pass along ``dim`` (-1: horizontal, -2: vertical).

    The resampled axis is moved to the front so that every tap gathers whole contiguous rows."""
    index, w, wq = _pil_weights(x.shape[dim], out_size, interpolation, x.device)
    moved = x.movedim(dim, 0)
    rest = moved.shape[1:]
    if x.dtype == torch.uint8:
        xs = moved.reshape(moved.shape[0], -1).to(torch.int32).contiguous()
        acc = torch.full((out_size, xs.shape[1]), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
        for j in range(index.shape[1]):
            acc += xs.index_select(0, index[:, j]) * wq[:, j, None]
        y = torch.div(acc, 1 << _PRECISION_BITS, rounding_mode="floor").clamp_(0, 255).to(torch.uint8)
    else:
        xs = moved.reshape(moved.shape[0], -1).to(torch.float64).contiguous()
        acc = torch.zeros((out_size, xs.shape[1]), dtype=torch.float64, device=x.device)
        for j in range(index.shape[1]):
            acc += xs.index_select(0, index[:, j]) * w[:, j, None]
        y = acc.to(x.dtype)
    return y.reshape(out_size, *rest).movedim(0, dim).contiguous()


def resize(
    x: torch.Tensor, size, interpolation: str = "bilinear", *, method: str = "pil", antialias: bool = True
) -> torch.Tensor:
    """Resize ``[..., C, H, W]`` images; an int ``size`` sets the shorter side (aspect kept).

    ``interpolation``: ``"bilinear"`` or ``"bicubic"``; ``method``: ``"pil"`` (Pillow's algorithm,
    always antialiased) or ``"torch"`` (``F.interpolate``, antialiased unless ``antialias=False``);
    see the module docstring. The dtype is kept (``uint8`` in, ``uint8`` out).
    """
    _check_image(x, "resize")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    h, w = x.shape[-2:]
    oh, ow = resized_shape(h, w, size)
    if (oh, ow) == (h, w):
        return x
    if method == "pil":
        if not antialias:
            raise ValueError("method='pil' always antialiases (Pillow has no switch); use method='torch'")
        y = x
        if ow != w:
            y = _pil_pass(y, ow, -1, interpolation)
        if oh != h:
            y = _pil_pass(y, oh, -2, interpolation)
        return y
    batched = x.dim() == 4
    y = x if batched else x[None]
    out_dtype = y.dtype
    if out_dtype not in (torch.float32, torch.float64):
        y = y.float()
    y = F.interpolate(y, size=(oh, ow), mode=interpolation, align_corners=False, antialias=antialias)
    if out_dtype == torch.uint8:
        if interpolation == "bicubic":
            y = y.clamp(0, 255)
        y = y.round()
    y = y.to(out_dtype)
    return y if batched else y[0]


# --------------------------------------------------------------------------- crop, scale, normalise


def center_crop(x: torch.Tensor, size) -> torch.Tensor:
    """The central ``size`` x ``size`` (or ``(h, w)``) window of ``[..., H, W]``; images smaller than
    the crop are zero-padded first (torchvision's rule, including its rounding of the offsets).
    ``size=None``: no crop (the segmentation models' evaluation: the whole resized image)."""
    _check_image(x, "center_crop")
    if size is None:
        return x
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad_l, pad_t = max(cw - w, 0) // 2, max(ch - h, 0) // 2
        pad_r, pad_b = max(cw - w + 1, 0) // 2, max(ch - h + 1, 0) // 2
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b), value=0)
        h, w = x.shape[-2:]
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


def to_float(x: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` 0..255 -> float in ``[0, scale]`` (``x / 255 * scale``); float input is taken to be
    in ``[0, 1]`` already and only multiplied by ``scale``."""
    _check_image(x, "to_float")
    y = x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)
    return y * scale if scale != 1.0 else y


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (``[..., C, H, W]``)."""
    if not x.is_floating_point():
        raise TypeError(f"normalize expects a floating-point image (use to_float first), got {x.dtype}")
    c = x.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def reverse_channels(x: torch.Tensor) -> torch.Tensor:
    """RGB <-> BGR: reverse the channel axis of ``[..., C, H, W]``."""
    return x.flip(-3)


# --------------------------------------------------------------------------- the eval transform


@dataclass(frozen=True)
class Transform:
    """An evaluation transform: resize the shorter side, center crop, scale, reorder, normalise.

    ``transform(images) -> float [N, C, crop, crop]``; ``images`` may be one image or a list of
    them, each a ``uint8``/float tensor ``[C, H, W]`` (float in ``[0, 1]``), a batch ``[N, C, H, W]``,
    a ``PIL.Image``, an ``[H, W, 3]`` array or an image file path. Output stays on the input's
    device unless ``device=`` is given.
    """

    resize_size: int
    crop_size: int | None  # None: no crop (torchvision's SemanticSegmentation preset)
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    channel_order: str = "RGB"  # "BGR": channels reversed before normalising (Caffe models)
    input_scale: float = 1.0  # 255.0: pixels in 0..255 before normalising (Caffe models)
    method: str = "pil"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def prepare(self, image) -> torch.Tensor:
        """Resize and crop one image (or a same-size batch), before scaling: ``[..., C, crop, crop]``
        in the input's dtype (``uint8`` stays ``uint8``).

        Paths and ``PIL.Image`` inputs with ``method="pil"`` are resized by Pillow itself (the same
        result as the tensor code, bit for bit, and faster on large photographs)."""
        x = image
        if isinstance(x, (str, os.PathLike)):
            x = open_image(x)
        if hasattr(x, "resize") and hasattr(x, "mode") and not isinstance(x, torch.Tensor):  # PIL
            if self.method == "pil":
                Image = _pil()
                x = x.convert("RGB") if x.mode != "RGB" else x
                oh, ow = resized_shape(x.height, x.width, self.resize_size)
                if (oh, ow) != (x.height, x.width):
                    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
                    x = x.resize((ow, oh), resample[self.interpolation])
                return center_crop(to_tensor(x), self.crop_size)
            x = to_tensor(x)
        elif not isinstance(x, torch.Tensor):
            x = to_tensor(x)
        _check_image(x, "Transform")
        if x.shape[-3] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)}-channel images, got shape {list(x.shape)}")
        x = resize(x, self.resize_size, self.interpolation, method=self.method)
        return center_crop(x, self.crop_size)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Scale, reorder channels and normalise prepared images."""
        y = to_float(x)
        if self.channel_order == "BGR":
            y = reverse_channels(y)
        if self.input_scale != 1.0:
            y = y * self.input_scale
        return normalize(y, self.mean, self.std)

    def __call__(self, images, *, device=None) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given")
            parts = [self.prepare(im) for im in images]
        else:
            parts = [self.prepare(images)]
        if device is not None:
            parts = [p.to(device) for p in parts]
        out = [self.finish(p if p.dim() == 4 else p[None]) for p in parts]
        return out[0] if len(out) == 1 else torch.cat([o.to(out[0].device) for o in out])

    def describe(self) -> str:
        scale = "0-255" if self.input_scale == 255 else "0-1" if self.input_scale == 1 else f"0-{self.input_scale:g}"
        return (
            f"resize shorter side to {self.resize_size} ({self.interpolation}, antialiased, {self.method}), "
            + ("no crop, " if self.crop_size is None else f"center crop {self.crop_size}, ")
            + f"{self.channel_order} {scale}, "
            f"mean {list(self.mean)}, std {list(self.std)}"
        )
