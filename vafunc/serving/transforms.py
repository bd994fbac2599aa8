"""Image preprocessing as pure tensor functions: decode, resize, crop, scale, normalise.

Every function takes and returns tensors (``[C, H, W]`` or a batch ``[N, C, H, W]``), keeps the
device of its input and mutates nothing. :func:`for_weights` builds the evaluation transform a
published checkpoint was measured with (resize the shorter side, center crop, scale, channel
order, normalise), from the weights table in :mod:`vafunc.io.hub`::

    >>> tf = vafunc.transforms.for_weights("resnet50", "IMAGENET1K_V2")
    >>> x = tf(["cat.jpg", "dog.png"])            # float32 [2, 3, 224, 224], normalised

Resizing comes in two flavours (``method=``), because the two pipelines people use with these
checkpoints differ by up to ~13/255 on bicubic photographs:

* ``"pil"`` (default): Pillow's resampling algorithm (``Image.resize`` with ``BILINEAR`` or
  ``BICUBIC``; antialiased: the filter support grows with the downscale factor), written in tensor
  ops. On ``uint8`` images it is Pillow's 8-bit arithmetic: a horizontal then a vertical pass,
  22-bit fixed-point weights, rounding and clipping to 0..255 after each pass, so it reproduces
  ``torchvision`` transforms fed a ``PIL.Image`` (how the published accuracies were measured:
  torchvision's and timm's reference scripts and Cadene's loaders decode with Pillow). On float
  images the same weights are applied in float64 with no rounding (Pillow's mode ``"F"``), which
  agrees with ``"torch"`` to float precision: the two differ only in the 8-bit rounding and
  clipping between the passes.
* ``"torch"``: ``torch.nn.functional.interpolate(antialias=True)``, i.e. torchvision's resize of a
  *tensor* image (``uint8`` in: float math, bicubic clamped to 0..255, rounded back to ``uint8``).

Decoding needs Pillow (``pip install 'vafunc[images]'``); nothing else here does. The operations
live in :mod:`vafunc.serving._imageops` (which the weights table builds its transforms from); this module
adds :func:`for_weights`, the lookup in that table.
"""

from __future__ import annotations

from typing import Any

from vafunc.io.hub.table import Weights, get_weights
from vafunc.serving._imageops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    METHODS,
    Transform,
    center_crop,
    decode,
    normalize,
    open_image,
    resize,
    resized_shape,
    reverse_channels,
    to_float,
    to_tensor,
)

__all__ = [  # _imageops' public names, and METHODS (the resize methods), re-exported
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "METHODS",
    "Transform",
    "center_crop",
    "decode",
    "normalize",
    "open_image",
    "resize",
    "resized_shape",
    "reverse_channels",
    "to_float",
    "to_tensor",
    "for_weights",
]


def for_weights(model: Any, tag: str = "DEFAULT", *, method: str = "pil") -> Transform:
    """The evaluation transform of a published checkpoint (:func:`vafunc.hub.get_weights`).

    ``model``: a model name, a :class:`vafunc.ModelDef` or a :class:`vafunc.hub.Weights`; ``tag``:
    ``"DEFAULT"``, ``"IMAGENET1K_V2"``, ... ``model`` may also be timm's ``"name.tag"``
    (``"seresnet50.a1_in1k"``): the transform timm builds from that tag's pretrained config.
    """
    from vafunc.io.hub import timm_hub

    if tag == "DEFAULT" and timm_hub.is_timm_tag(model):
        model = timm_hub.get_timm_tag(model)
    if isinstance(model, timm_hub.TimmTag):
        return model.transforms(method=method)
    w = model if isinstance(model, Weights) else get_weights(model, tag)
    return w.transforms(method=method)
