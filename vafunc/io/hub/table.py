"""The table of published checkpoints: :class:`Weights` and its lookups.

The facts are the rows of ``weights.csv`` next to this module (package data, read through
:mod:`importlib.resources`, so an installed wheel reads the same file), one row per checkpoint:

``model``, ``tag``
    the vafunc / torchvision model name and the weights tag (``IMAGENET1K_V2``, ...)
``default``
    ``true`` for the model's ``DEFAULT`` weights (one per model)
``source``, ``file``, ``url``
    who publishes it, the torch.hub cache file name (its ``-<sha256 prefix>.`` is checked on
    download) and where to download it
``num_params``, ``gflops``, ``acc1``, ``acc5``
    parameter count, multiply-adds at the crop size (1e9; torchvision's ``_ops``, fvcore for the
    others), reported ImageNet-1k top-1/top-5 (percent); empty: not published. Segmentation
    checkpoints (``categories`` ``voc``) hold their reported mean IoU and pixel accuracy there
    (COCO val2017 with the VOC categories, percent; :attr:`Weights.metrics` names them)
``resize``, ``crop``, ``interpolation``, ``normalization``
    the evaluation transform: resize the shorter side, center crop (empty: none, the segmentation
    models' whole resized image), resampling filter, and a key of :data:`NORMALIZATIONS`
``config``
    the model config the checkpoint needs, ``key=value`` pairs separated by ``;`` (torchvision's
    builders set these when given the weights; e.g. Inception-v3's ``transform_input=True``)
``categories``
    ``imagenet-1k`` for classifiers, ``voc`` for the segmentation models (background and the 20
    PASCAL VOC classes), empty for feature extractors (VGG16 ``IMAGENET1K_FEATURES``)
``note``
    free text (where the facts come from)

The torchvision rows are every torchvision 0.29 classification checkpoint (the reference facts in
shared/reference/torchvision_weights.csv), including those of architectures vafunc does not
register (yet): they are facts about files, and every lookup goes by model name, so they surface
only once such a model is registered (:func:`vafunc.list_models`, ``vafunc info``). The others:
timm's ``legacy_xception.tf_in1k`` (Keras/TF Xception port; Cadene reports 78.888/94.292 for the
same file), ``mobilenetv1_100.ra4_e3600_r224_in1k`` (on the Hugging Face hub; no hash in the file
name, no published accuracy) and Cadene's BN-Inception (Caffe port; BGR 0-255 minus (104, 117,
128), resize 256 = 224 / 0.875 bilinear, crop 224).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from vafunc.core import registry
from vafunc.io.hub.errors import WeightsError
from vafunc.serving._imageops import Transform
from vafunc.serving.imagenet_classes import IMAGENET_CATEGORIES

#: the label set of torchvision's segmentation checkpoints: background and the 20 PASCAL VOC classes
VOC_CATEGORIES = (
    "__background__",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CATEGORY_SETS = {"imagenet-1k": IMAGENET_CATEGORIES, "voc": VOC_CATEGORIES}

__all__ = [
    "NORMALIZATIONS",
    "TABLE_FILE",
    "Weights",
    "read_table",
    "list_weights",
    "get_weights",
    "find_weights",
    "cache_dir",
]

#: The package data file holding the rows (in this package, :mod:`vafunc.io.hub`).
TABLE_FILE = "weights.csv"

COLUMNS = (
    "model",
    "tag",
    "default",
    "source",
    "file",
    "url",
    "num_params",
    "gflops",
    "acc1",
    "acc5",
    "resize",
    "crop",
    "interpolation",
    "normalization",
    "config",
    "categories",
    "note",
)

#: Evaluation normalisations: (mean, std, channel order, pixel scale before normalising).
NORMALIZATIONS = {
    # torchvision: RGB in [0, 1], ImageNet mean/std
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "RGB", 1.0),
    # TF-trained ports (timm, torchvision's EfficientNetV2-L): RGB in [-1, 1]
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "RGB", 1.0),
    # torchvision's VGG16 IMAGENET1K_FEATURES (amdegroot's SSD port): mean-subtracted 0-255 RGB
    "vgg_features": ((0.48235, 0.45882, 0.40784), (1 / 255, 1 / 255, 1 / 255), "RGB", 1.0),
    # Caffe (Cadene's BN-Inception): BGR in 0-255 minus the per-channel mean, std 1
    "caffe_bgr": ((104.0, 117.0, 128.0), (1.0, 1.0, 1.0), "BGR", 255.0),
}

_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's rule: ``name-<sha256 prefix>.ext``


@dataclass(frozen=True)
class Weights:
    """One published checkpoint and how it was evaluated (facts; nothing is downloaded)."""

    model: str  # vafunc / torchvision model name
    tag: str  # "IMAGENET1K_V1", ...
    is_default: bool
    source: str  # "torchvision", "timm" or "pretrainedmodels"
    url: str
    file: str  # the torch.hub cache file name
    num_params: int
    gflops: float | None  # multiply-adds at the crop size, in 1e9
    acc1: float | None  # reported ImageNet-1k top-1 (percent)
    acc5: float | None
    resize_size: int
    crop_size: int | None  # None: no crop (segmentation)
    interpolation: str
    normalization: str  # key of NORMALIZATIONS
    config: tuple = ()  # ((key, value), ...) the model config the checkpoint needs
    note: str = ""
    category_set: str | None = "imagenet-1k"  # a key of CATEGORY_SETS; None: a feature extractor (VGG16 FEATURES)

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def hash_prefix(self) -> str | None:
        """The SHA-256 prefix in the file name (what torch.hub checks), or ``None``."""
        m = _HASH_IN_NAME.search(self.file)
        return m.group(1) if m else None

    @property
    def mean(self) -> tuple:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple:
        return NORMALIZATIONS[self.normalization][1]

    @property
    def channel_order(self) -> str:
        return NORMALIZATIONS[self.normalization][2]

    @property
    def input_scale(self) -> float:
        return NORMALIZATIONS[self.normalization][3]

    @property
    def categories(self) -> tuple[str, ...] | None:
        """The class names (ImageNet-1k, or VOC for the segmentation checkpoints), or ``None`` for
        feature-extractor weights (VGG16 FEATURES)."""
        return None if self.category_set is None else CATEGORY_SETS[self.category_set]

    @property
    def metrics(self) -> dict[str, float | None]:
        """The reported figures under their names: ``acc1``/``acc5`` (ImageNet-1k), or ``miou`` and
        ``pixel_acc`` for a segmentation checkpoint (COCO val2017, VOC categories); percent."""
        if self.category_set == "voc":
            return {"miou": self.acc1, "pixel_acc": self.acc5}
        return {"acc1": self.acc1, "acc5": self.acc5}

    @property
    def cache_path(self) -> Path:
        return cache_dir() / self.file

    def transforms(self, *, method: str = "pil") -> Transform:
        """The evaluation transform (:class:`vafunc.transforms.Transform`)."""
        return Transform(
            resize_size=self.resize_size,
            crop_size=self.crop_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            channel_order=self.channel_order,
            input_scale=self.input_scale,
            method=method,
        )

    @property
    def meta(self) -> dict:
        """JSON-friendly facts (used by ``vafunc info``)."""
        return {
            "tag": self.tag,
            "default": self.is_default,
            "source": self.source,
            "file": self.file,
            "url": self.url,
            "hash_prefix": self.hash_prefix,
            "num_params": self.num_params,
            "gflops": self.gflops,
            **self.metrics,
            "transform": {
                "resize": self.resize_size,
                "crop": self.crop_size,
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
                "channel_order": self.channel_order,
                "input_scale": self.input_scale,
            },
            "config": dict(self.config),
            "categories": self.category_set,
            **({"note": self.note} if self.note else {}),
        }


def _parse_bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text == "true"


def _parse_num(text: str) -> float | None:
    return None if text == "" else float(text)


def _parse_config(text: str) -> tuple:
    """``"transform_input=True;aux_logits=False"`` -> ``(("transform_input", True), ...)``."""
    out = []
    for item in filter(None, text.split(";")):
        k, v = item.split("=")
        out.append((k, {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v)))
    return tuple(out)


def _row_to_weights(row: dict) -> Weights:
    if row["normalization"] not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {row['normalization']!r} (known: {', '.join(NORMALIZATIONS)})")
    if row["categories"] not in ("", *CATEGORY_SETS):
        raise ValueError(f"categories must be one of {', '.join(CATEGORY_SETS)} or empty, got {row['categories']!r}")
    return Weights(
        model=row["model"],
        tag=row["tag"],
        is_default=_parse_bool(row["default"]),
        source=row["source"],
        url=row["url"],
        file=row["file"],
        num_params=int(row["num_params"]),
        gflops=_parse_num(row["gflops"]),
        acc1=_parse_num(row["acc1"]),
        acc5=_parse_num(row["acc5"]),
        resize_size=int(row["resize"]),
        crop_size=int(row["crop"]) if row["crop"] else None,
        interpolation=row["interpolation"],
        normalization=row["normalization"],
        config=_parse_config(row["config"]),
        note=row["note"],
        category_set=row["categories"] or None,
    )


def read_table(text: str | None = None) -> tuple[Weights, ...]:
    """Every row of the table, in file order (``text``: the CSV; default: the packaged file)."""
    if text is None:
        text = resources.files(__package__).joinpath(TABLE_FILE).read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise RuntimeError(f"{TABLE_FILE}: expected the columns {','.join(COLUMNS)}, got {reader.fieldnames}")
    out = []
    for row in reader:
        try:
            if None in row or None in row.values():
                raise ValueError(f"expected {len(COLUMNS)} fields")
            out.append(_row_to_weights(row))
        except ValueError as err:
            raise RuntimeError(f"{TABLE_FILE}, line {reader.line_num}: {err}") from None
    return tuple(out)


@functools.cache
def _table() -> dict[str, tuple[Weights, ...]]:
    rows: dict[str, list[Weights]] = {}
    for w in read_table():
        rows.setdefault(w.model, []).append(w)
    return {k: tuple(v) for k, v in rows.items()}


def _model_name(model) -> str:
    if isinstance(model, str):
        return model
    if isinstance(model, registry.ModelDef):
        return model.name
    raise TypeError(f"expected a model name or a vafunc ModelDef, got {type(model).__name__}")


def list_weights(model=None) -> list[Weights]:
    """All published checkpoints (of one model, if given; default first)."""
    table = _table()
    if model is None:
        return [w for ws in table.values() for w in ws]
    return sorted(table.get(_model_name(model), ()), key=lambda w: not w.is_default)


def get_weights(model, tag: str = "DEFAULT") -> Weights:
    """The checkpoint ``tag`` of ``model``: ``"DEFAULT"``, ``"IMAGENET1K_V2"``, torchvision's
    ``"ResNet50_Weights.IMAGENET1K_V2"`` or timm's ``"legacy_xception.tf_in1k"`` (any case)."""
    if isinstance(tag, Weights):
        return tag
    name = _model_name(model)
    if not isinstance(tag, str):
        raise TypeError(f"weights tag must be a str, got {type(tag).__name__}")
    available = list_weights(name)
    if not available:
        registry.get_entry(name)  # unknown model -> its own error, with suggestions
        raise WeightsError(
            f"{name} has no published weights in vafunc's table; pass a checkpoint file path instead "
            "(vafunc.hub.list_weights() lists the published checkpoints)"
        )
    key = tag.rsplit(".", 1)[-1].upper()
    if key == "DEFAULT":
        return next(w for w in available if w.is_default)
    for w in available:
        if w.tag == key:
            return w
    raise WeightsError(
        f"{name} has no weights {tag!r}; available: {', '.join(['DEFAULT'] + [w.tag for w in available])}"
    )


def find_weights(path) -> Weights | None:
    """The table entry whose file name is ``path``'s name, if any."""
    base = Path(path).name
    for w in list_weights():
        if w.file == base:
            return w
    return None


def cache_dir() -> Path:
    """torch.hub's checkpoint cache: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"
