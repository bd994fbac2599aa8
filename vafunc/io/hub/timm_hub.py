"""timm's pretrained tags (``"seresnet50.a1_in1k"``) from the Hugging Face hub.

A timm tag names an architecture and one of its published checkpoints, ``<timm name>.<tag>``. What
timm's ``pretrained_cfg`` says about each tag of the timm-named models vafunc has (the repository,
``hf_hub_id``, and the evaluation transform: input size, crop fraction, interpolation, mean, std,
and the number of classes) is package data, ``timm_pretrained.csv`` next to this module, written by
``tools/timm_pretrained.py`` from the installed timm; timm itself is never imported here.

Loading a tag downloads the repository's ``model.safetensors`` and ``config.json`` through
``huggingface_hub`` (the ``hub`` extra) into the standard Hugging Face cache (``HF_HOME``,
``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` or ``VAFUNC_OFFLINE=1`` read it only), and reads the weights
from there: :func:`pretrained_tag` ``("vit_small_patch14_dinov2.lvd142m") -> (model, params,
state)``, which :func:`vafunc.hub.pretrained` calls for a ``name.tag`` argument. The vafunc name
works in place of the timm name (``"xception.tf_in1k"`` = ``"legacy_xception.tf_in1k"``).

A tag that timm publishes elsewhere than on the hub (``legacy_xception.tf_in1k``: a GitHub release
file) loads through the weights table and the torch.hub cache when the table has that file.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vafunc.core import registry
from vafunc.io.hub import load as _load
from vafunc.io.hub.errors import SAFETENSORS_HINT, WeightsError
from vafunc.io.hub.table import Weights, list_weights
from vafunc.serving._imageops import Transform
from vafunc.serving.imagenet_classes import IMAGENET_CATEGORIES

__all__ = [
    "HUB_HINT",
    "TimmTag",
    "list_timm_tags",
    "get_timm_tag",
    "is_timm_tag",
    "fetch_hub_files",
    "hub_cache_dir",
    "pretrained_tag",
    "pretrained",
]

#: The package data file holding timm's pretrained configs (in this package, :mod:`vafunc.io.hub`).
TAGS_FILE = "timm_pretrained.csv"
COLUMNS = (
    "model",
    "timm_name",
    "tag",
    "default",
    "hf_hub_id",
    "url",
    "input_size",
    "crop_pct",
    "crop_mode",
    "interpolation",
    "mean",
    "std",
    "num_classes",
)
HUB_HINT = "pip install 'vafunc[hub]'"
#: The files read from a tag's repository: the weights, and timm's description of the model.
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


@dataclass(frozen=True)
class TimmTag:
    """One published timm checkpoint: where it is on the hub and how it was evaluated (facts)."""

    model: str  # vafunc name
    timm_name: str
    tag: str
    is_default: bool
    hf_hub_id: str  # "timm/<name>.<tag>" usually; "" when timm publishes the file elsewhere
    url: str  # timm's other download location, or ""
    input_size: tuple[int, int, int]  # (C, H, W)
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int  # 0: the checkpoint has no classifier (pooled features)

    @property
    def name(self) -> str:
        """timm's name for the checkpoint, ``<timm name>.<tag>``."""
        return f"{self.timm_name}.{self.tag}"

    @property
    def repo_id(self) -> str:
        """The hub repository (``hf_hub_id`` without a ``@revision``)."""
        return self.hf_hub_id.split("@", 1)[0]

    @property
    def revision(self) -> str | None:
        """The revision pinned in ``hf_hub_id`` (``repo@revision``), else ``None`` (``main``)."""
        return self.hf_hub_id.split("@", 1)[1] if "@" in self.hf_hub_id else None

    @property
    def crop_size(self) -> int:
        return self.input_size[-1]

    @property
    def resize_size(self) -> int:
        """The shorter side before the center crop: ``floor(crop / crop_pct)``, timm's eval rule."""
        return math.floor(self.crop_size / self.crop_pct)

    @property
    def categories(self) -> tuple[str, ...] | None:
        """ImageNet-1k class names for a 1000-class head, else ``None`` (features, projections, 11k classes)."""
        return IMAGENET_CATEGORIES if self.num_classes == 1000 else None

    def transforms(self, *, method: str = "pil") -> Transform:
        """The evaluation transform timm builds from this tag's config (``resolve_data_config`` then
        ``create_transform``): resize the shorter side to ``floor(crop / crop_pct)``, center crop,
        normalise."""
        if self.crop_mode != "center" or self.input_size[1] != self.input_size[2]:
            raise WeightsError(
                f"{self.name}: timm evaluates it with crop_mode={self.crop_mode!r} at {self.input_size[1:]}; "
                "vafunc's transforms do a center crop of a square only"
            )
        return Transform(
            resize_size=self.resize_size,
            crop_size=self.crop_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            method=method,
        )

    @property
    def meta(self) -> dict:
        """JSON-friendly facts."""
        return {
            "tag": self.name,
            "default": self.is_default,
            "hf_hub_id": self.hf_hub_id or None,
            "num_classes": self.num_classes,
            "transform": {
                "resize": self.resize_size,
                "crop": self.crop_size,
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
            },
        }


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split("/"))


def read_tags(text: str | None = None) -> tuple[TimmTag, ...]:
    """Every row of the packaged table (``text``: the CSV; default: the package data file)."""
    if text is None:
        text = resources.files(__package__).joinpath(TAGS_FILE).read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise RuntimeError(f"{TAGS_FILE}: expected the columns {','.join(COLUMNS)}, got {reader.fieldnames}")
    out = []
    for row in reader:
        try:
            size = tuple(int(v) for v in row["input_size"].split("x"))
            if len(size) != 3 or row["default"] not in ("true", "false"):
                raise ValueError(f"bad input_size {row['input_size']!r} or default {row['default']!r}")
            out.append(
                TimmTag(
                    model=row["model"],
                    timm_name=row["timm_name"],
                    tag=row["tag"],
                    is_default=row["default"] == "true",
                    hf_hub_id=row["hf_hub_id"],
                    url=row["url"],
                    input_size=size,
                    crop_pct=float(row["crop_pct"]),
                    crop_mode=row["crop_mode"],
                    interpolation=row["interpolation"],
                    mean=_floats(row["mean"]),
                    std=_floats(row["std"]),
                    num_classes=int(row["num_classes"]),
                )
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise RuntimeError(f"{TAGS_FILE}, line {reader.line_num}: {err}") from None
    return tuple(out)


@functools.cache
def _index() -> dict[str, dict[str, TimmTag]]:
    """``{timm name or vafunc name: {tag: TimmTag}}``, each name's default tag first."""
    out: dict[str, dict[str, TimmTag]] = {}
    for t in sorted(read_tags(), key=lambda t: not t.is_default):
        for key in {t.timm_name, t.model}:
            out.setdefault(key, {})[t.tag] = t
    return out


def list_timm_tags(model: str | None = None) -> list[TimmTag]:
    """timm's published tags of the timm-named models (of one model, by vafunc or timm name; default first)."""
    if model is None:
        return list(read_tags())
    return list(_index().get(model, {}).values())


def is_timm_tag(spec) -> bool:
    """Whether ``spec`` is a ``"<name>.<tag>"`` string whose name is a timm-named model in the table
    (and not an existing file)."""
    if not isinstance(spec, str) or "." not in spec or "/" in spec or os.sep in spec:
        return False
    return spec.split(".", 1)[0] in _index() and not Path(spec).is_file()


def get_timm_tag(spec: str) -> TimmTag:
    """The :class:`TimmTag` of ``"<timm or vafunc name>.<tag>"``; a bare name gives timm's default tag."""
    if not isinstance(spec, str):
        raise TypeError(f"expected a timm tag such as 'seresnet50.a1_in1k' (a str), got {type(spec).__name__}")
    name, _, tag = spec.partition(".")
    index = _index()
    if name not in index:
        close = difflib.get_close_matches(name, list(index), n=3)
        raise WeightsError(
            f"{name!r} has no timm pretrained tags in vafunc's table"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (vafunc.hub.list_timm_tags() lists them)"
        )
    tags = index[name]
    if not tag:
        return next(iter(tags.values()))
    if tag not in tags:
        raise WeightsError(f"{name} has no timm tag {tag!r}; timm publishes: {', '.join(tags)}")
    return tags[tag]


def _huggingface_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # submodules: the package loads its attributes lazily
    except ImportError:
        raise ImportError(
            f"loading timm's weights from the Hugging Face hub needs huggingface_hub: {HUB_HINT}"
        ) from None
    return huggingface_hub


def hub_cache_dir(cache_dir=None) -> Path:
    """The Hugging Face hub cache: ``cache_dir`` if given, else ``$HF_HUB_CACHE`` / ``$HF_HOME/hub``
    as ``huggingface_hub`` read them when it was imported."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(_huggingface_hub().constants.HF_HUB_CACHE)


def _offline() -> str | None:
    for var in ("VAFUNC_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def _fetch_one(hh, t: TimmTag, filename: str, cache: Path, revision: str | None, local_only: str | None) -> Path:
    where = cache / ("models--" + t.repo_id.replace("/", "--"))
    try:
        return Path(
            hh.hf_hub_download(
                t.repo_id,
                filename,
                revision=revision,
                cache_dir=str(cache),
                local_files_only=local_only is not None,
                library_name="vafunc",
            )
        )
    except hh.errors.LocalEntryNotFoundError as err:
        why = local_only or f"no connection to the hub: {str(err).splitlines()[0][:160]}"
        allow = "pass download=True" if local_only == "download=False" else f"unset {local_only.split()[0]}"
        raise WeightsError(
            f"{t.name}: {filename} of the Hugging Face repository {t.repo_id} is not in the cache {cache} "
            f"(looked in {where}) and cannot be downloaded ({why}). "
            + (f"To download it, {allow}; or on" if local_only else "On")
            + f" a machine with network access run `hf download {t.repo_id} {WEIGHTS_FILE} {CONFIG_FILE}` and "
            "copy that machine's Hugging Face cache ($HF_HOME/hub) here"
        ) from None
    except (hh.errors.RepositoryNotFoundError, hh.errors.RevisionNotFoundError, hh.errors.EntryNotFoundError) as err:
        raise WeightsError(
            f"{t.name}: cannot get {filename} from the Hugging Face repository {t.repo_id} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); cache {cache}"
        ) from None


def fetch_hub_files(tag, *, cache_dir=None, revision: str | None = None, download: bool = True) -> tuple[Path, dict]:
    """``(path of model.safetensors, the parsed config.json)`` of a timm tag, from the Hugging Face
    cache, downloaded there first when missing (unless ``download=False``, ``HF_HUB_OFFLINE=1`` or
    ``VAFUNC_OFFLINE=1``). Raises :class:`WeightsError` naming the repository, the file and the
    cache when it is not there and cannot be downloaded."""
    t = tag if isinstance(tag, TimmTag) else get_timm_tag(tag)
    if not t.hf_hub_id:
        raise WeightsError(f"{t.name}: timm publishes it at {t.url or '(no location)'}, not on the Hugging Face hub")
    hh = _huggingface_hub()
    cache = hub_cache_dir(cache_dir)
    local_only = "download=False" if not download else _offline()
    revision = revision or t.revision
    weights = _fetch_one(hh, t, WEIGHTS_FILE, cache, revision, local_only)
    config_path = _fetch_one(hh, t, CONFIG_FILE, cache, revision, local_only)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{config_path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: expected a JSON object (timm's model config), got {type(config).__name__}")
    arch = config.get("architecture")
    repo_arch = t.repo_id.rsplit("/", 1)[-1].split(".", 1)[0]
    if arch is not None and arch not in (t.timm_name, repo_arch):
        raise WeightsError(
            f"{config_path}: the repository {t.repo_id} holds a {arch}, not the {t.timm_name} that {t.name} names"
        )
    return weights, config


def _model_config(model: registry.ModelDef, t: TimmTag, num_classes: int) -> dict:
    """The config keywords the checkpoint needs beyond the registered defaults (as timm sets them
    from the tag's pretrained config: the number of classes, and the image size where the model has one)."""
    cfg, out = model.config, {}
    if hasattr(cfg, "num_classes") and cfg.num_classes != num_classes:
        out["num_classes"] = num_classes
    size = getattr(cfg, "img_size", None)
    if size is not None:
        want = tuple(t.input_size[1:])
        have = (size, size) if isinstance(size, int) else tuple(size)
        if have != want:
            out["img_size"] = want[0] if isinstance(size, int) and want[0] == want[1] else want
    return out


def _table_weights(t: TimmTag) -> Weights | None:
    """The weights-table entry for a tag timm publishes off the hub (same URL), if any."""
    return next((w for w in list_weights(t.model) if t.url and w.url == t.url), None)


def pretrained_tag(
    spec: str, *, download: bool = True, device=None, cache_dir=None, revision: str | None = None, **config
):
    """``(model, params, state)`` for a timm tag (``"vit_small_patch14_dinov2.lvd142m"``; a bare
    name: timm's default tag): the vafunc model built as timm builds it for that checkpoint (its
    number of classes, its image size) plus ``config`` overrides, and the weights read from the
    repository's ``model.safetensors`` in the Hugging Face cache (:func:`fetch_hub_files`).
    ``cache_dir``: another hub cache folder (default: ``huggingface_hub``'s, from ``HF_HOME``);
    ``revision``: a branch, tag or commit of the repository (default: ``main``, or the one timm pins).
    The evaluation transform is ``get_timm_tag(spec).transforms()``."""
    load_weights = _load.load_weights
    t = get_timm_tag(spec)
    if not t.hf_hub_id:
        w = _table_weights(t)
        if w is None:
            raise WeightsError(f"{t.name}: timm publishes it at {t.url or '(nowhere)'}, not on the Hugging Face hub")
        if cache_dir is not None or revision is not None:
            raise TypeError(f"{t.name} is not on the Hugging Face hub ({w.name}): cache_dir/revision do not apply")
        model = registry.get_model(t.model, **{**dict(w.config), **config})
        return model, *load_weights(model, w, device=device, download=download)
    path, hub_config = fetch_hub_files(t, cache_dir=cache_dir, revision=revision, download=download)
    n = hub_config.get("num_classes", t.num_classes)
    model = registry.get_model(t.model)
    need = _model_config(model, t, int(n) if isinstance(n, int) else t.num_classes)
    if need or config:
        model = registry.get_model(t.model, **{**need, **config})
    try:
        params, state = load_weights(model, path, device=device)
    except ImportError as err:
        raise ImportError(f"{err} ({SAFETENSORS_HINT} or {HUB_HINT})") from None
    except WeightsError as err:
        raise WeightsError(f"{t.name} (Hugging Face repository {t.repo_id}): {err}") from None
    return model, params, state


def pretrained(name: str, weights: str = "DEFAULT", *, download: bool = True, device=None, **config):
    """``vafunc.hub.pretrained``: ``(model, params, state)``, the model built with the config the
    checkpoint needs (plus ``config`` overrides) and the loaded weights.

    ``pretrained(name[, weights])``: a registered model and a weights-table tag or a checkpoint path
    (:func:`vafunc.io.hub.load.pretrained`, the torch.hub cache). ``pretrained("<name>.<tag>")``:
    timm's tag of a timm-named model (the vafunc name works too), from the tag's Hugging Face
    repository through the Hugging Face cache (:func:`pretrained_tag`; keywords ``cache_dir=``,
    ``revision=``)."""
    if is_timm_tag(name) and name not in registry.list_models():
        if weights != "DEFAULT":
            raise TypeError(f"{name!r} names its checkpoint already; pass no weights (got {weights!r})")
        return pretrained_tag(name, download=download, device=device, **config)
    return _load.pretrained(name, weights, download=download, device=device, **config)
