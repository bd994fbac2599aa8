"""Model registry: name -> :class:`ModelDef` (frozen config + pure ``init``/``apply``).

A *family* (one file in ``vafunc/models``) provides a frozen config dataclass and pure functions;
each registered *entry* names a family, the config values that define the variant, and metadata
(parameter count, reference implementation, paper).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from vafunc.core import tree as vtree
from vafunc.core.init import Initializer

__all__ = [
    "Family",
    "Reference",
    "Entry",
    "ModelDef",
    "register",
    "get_model",
    "list_models",
    "get_entry",
    "check_image",
    "check_config",
]


@dataclass(frozen=True)
class Reference:
    """Where the oracle for a model lives (used by the tests and docs; never imported at runtime).

    ``source``: ``"torchvision"``, ``"timm"`` or ``"pretrainedmodels"``; ``builder``: the builder
    or class name in that package; ``kwargs``: fixed builder arguments (e.g. DenseNet-264's table).
    """

    source: str
    builder: str
    kwargs: tuple = ()

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.source}.{self.builder}({args})" if args else f"{self.source}.{self.builder}"


@dataclass(frozen=True)
class Family:
    """The pure functions shared by every variant of an architecture family.

    * ``init(cfg, ini) -> tree``: one merged tree of parameters and BN buffers, reference names.
    * ``apply(cfg, params, state, x, *, train, rng, taps=None) -> (logits, new_state)``; with a
      :class:`vafunc.core.layers.Taps` it records named intermediates and may stop early (returning
      ``None`` logits) once all requested names are recorded.
    * ``min_size(cfg) -> int``: the smallest input height/width the network accepts.
    * ``remap(cfg, flat) -> (flat, notes)``: optional; translates legacy checkpoint names.
    """

    name: str
    config: type
    init: Callable
    apply: Callable
    min_size: Callable[[Any], int]
    paper: str = ""
    remap: Callable | None = None
    in_channels: Callable[[Any], int] = lambda cfg: getattr(cfg, "in_channels", 3)
    #: ``probe(cfg, ini, size=None, sizes=None)``: the init-mode forward of a kit family
    #: (:func:`vafunc.core.kit.family`), used to derive the valid input sizes.
    probe: Callable | None = field(default=None, compare=False, repr=False)
    #: ``multiple(cfg) -> int``: what input heights and widths must be multiples of (1: any).
    multiple: Callable[[Any], int] = field(default=lambda cfg: 1, compare=False, repr=False)
    #: ``max_size(cfg) -> int | None``: the largest input height/width (None: no limit). CoAtNet's
    #: relative position biases cover its whole map, so it takes ``img_size`` only.
    max_size: Callable[[Any], int | None] = field(default=lambda cfg: None, compare=False, repr=False)
    #: a kit family's ``vafunc.core.kit.Declaration`` (its forward and scope defaults)
    declaration: Any = field(default=None, compare=False, repr=False)
    #: ``intermediates(model, params, state, x, indices, **kw) -> list``: timm's
    #: ``forward_intermediates(..., intermediates_only=True)`` (token networks; None: not offered)
    intermediates: Callable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Entry:
    name: str
    family: Family
    defaults: tuple  # (key, value) pairs: the config values that define this variant
    params: int  # parameter count at the default config (checked against the oracle in tests)
    reference: Reference | None
    paper: str
    notes: str = ""
    extra: tuple = ()  # other facts, e.g. ("input_convention", "BGR 0-255 ...")
    #: what the model predicts: ``"classification"`` (logits ``[N, classes]``) or ``"segmentation"``
    #: (per-pixel logits ``[N, classes, H, W]``; torchvision's builders return ``{"out", "aux"}``)
    task: str = "classification"

    @property
    def metadata(self) -> dict:
        return {
            "name": self.name,
            "family": self.family.name,
            "task": self.task,
            "params": self.params,
            "reference": str(self.reference) if self.reference else None,
            "paper": self.paper,
            "notes": self.notes,
            **dict(self.extra),
        }


_REGISTRY: dict[str, Entry] = {}
#: the tasks a registered model can have (``Entry.task``)
TASKS = ("classification", "segmentation")


def register(
    name: str,
    family: Family,
    *,
    params: int,
    reference: Reference | None,
    paper: str | None = None,
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
    task: str = "classification",
    **defaults,
) -> Entry:
    """Register model ``name`` of ``family`` with its config ``defaults`` (fields of the family's
    config), its parameter count at the default config ``params`` (the tests check it against the oracle),
    the oracle it is tested against (``reference``) and where it comes from (``paper``, ``notes``).
    Families call it at import; a name can be registered once."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if task not in TASKS:
        raise ValueError(f"{name}: task must be one of {TASKS}, got {task!r}")
    fields = {f.name for f in dataclasses.fields(family.config)}
    bad = sorted(set(defaults) - fields)
    if bad:
        raise TypeError(f"{name}: {bad} are not fields of {family.config.__name__}")
    entry = Entry(
        name,
        family,
        tuple(defaults.items()),
        params,
        reference,
        paper if paper is not None else family.paper,
        notes,
        tuple((extra or {}).items()),
        task,
    )
    _REGISTRY[name] = entry
    return entry


def _ensure_loaded() -> None:
    """The families register themselves when ``vafunc.models`` is imported, which
    ``vafunc/__init__`` does right after importing this module; Python runs ``vafunc/__init__``
    before any ``vafunc.*`` submodule, so the registry is complete whenever code outside the
    package can reach it. (This module does not import ``vafunc.models``: every family module
    imports this one, which would be an import cycle.)"""
    if not _REGISTRY:
        raise RuntimeError("no models are registered: import vafunc (which imports vafunc.models) first")


#: the rows ``vafunc list`` prints (name, family, task, parameter count, minimum size, reference,
#: state_dict size), stored in the package so that listing and ``vafunc.hub.identify`` need not probe
#: every model; regenerate after a registry change (``vafunc.cli.app.write_model_rows``)
MODELS_FILE = "models.json"


def stored_rows() -> dict[str, dict]:
    """:data:`MODELS_FILE`'s rows by model name (empty where the file is missing)."""
    try:
        text = resources.files("vafunc.core").joinpath(MODELS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return {r["name"]: r for r in json.loads(text)}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names (sorted), optionally filtered by a shell-style pattern (``"resnet*"``)."""
    import fnmatch

    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_entry(name: str) -> Entry:
    """The registry :class:`Entry` of model ``name`` (its family, defaults, parameter count and
    reference); unknown names raise a ``ValueError`` listing close matches."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (vafunc.list_models() lists all {len(_REGISTRY)})")
    return _REGISTRY[name]


def get_model(name: str, **config) -> ModelDef:
    """Build a :class:`ModelDef`; keywords override the variant's config (torchvision's names)."""
    entry = get_entry(name)
    valid = {f.name for f in dataclasses.fields(entry.family.config)}
    bad = sorted(set(config) - valid)
    if bad:
        raise TypeError(f"{name} got unknown config keywords {bad}; valid: {sorted(valid)}")
    cfg = entry.family.config(**{**dict(entry.defaults), **config})
    return ModelDef(name, cfg, entry.family)


# --------------------------------------------------------------------------- config checks


def check_config(cfg, *, positive_ints=("num_classes", "in_channels"), rates=(), bools=()) -> None:
    """The checks every family's config shares, with errors that name the field: positive ints
    (``num_classes``, ``in_channels``, ...), rates in ``[0, 1]`` (dropout, stochastic depth), bools."""
    for f in bools:
        v = getattr(cfg, f)
        if not isinstance(v, bool):
            raise TypeError(f"{f} must be a bool, got {v!r}")
    for f in positive_ints:
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{f} must be a positive int, got {v!r}")
    for f in rates:
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{f} must be a number in [0, 1], got {v!r}")


# --------------------------------------------------------------------------- input checks


def check_image(
    x, *, name: str, in_channels: int, min_size: int, multiple: int = 1, max_size: int | None = None
) -> None:
    """Raise a clear ``TypeError``/``ValueError`` for inputs the network cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor image batch [N, C, H, W], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} expects a floating-point image batch, got dtype {x.dtype} (convert with x.float() / 255)"
        )
    if x.dim() != 4:
        raise ValueError(
            f"{name} expects a 4-D batch [N, C, H, W], got a {x.dim()}-D tensor of shape {list(x.shape)}"
            + (" (add a batch axis with x[None])" if x.dim() == 3 else "")
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channels, got {x.shape[1]} (shape {list(x.shape)})")
    h, w = x.shape[-2], x.shape[-1]
    if h < min_size or w < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size}, got {h}x{w}")
    if max_size is not None and (h > max_size or w > max_size):
        what = f"exactly {max_size}x{max_size}" if max_size == min_size else f"at most {max_size}x{max_size}"
        raise ValueError(f"{name} takes images of {what}, got {h}x{w}")
    if multiple > 1 and (h % multiple or w % multiple):
        raise ValueError(f"{name} needs heights and widths divisible by {multiple}, got {h}x{w}")


def _first_leaf(tree):
    """The first tensor of a parameter tree, depth first (``None`` if it holds none)."""
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, Mapping):
        for v in tree.values():
            t = _first_leaf(v)
            if t is not None:
                return t
    return None


def check_device(x, params, *, name: str) -> None:
    """A ``ValueError`` naming both devices when the input is not where the parameters are."""
    p = _first_leaf(params)
    if p is not None and isinstance(x, torch.Tensor) and x.device != p.device:
        raise ValueError(
            f"{name}: the input is on {x.device} but the parameters are on {p.device}; move "
            f"the input (x.to({str(p.device)!r})) or the weights (vafunc.tree.tree_map)"
        )


# --------------------------------------------------------------------------- the model


def _model_def(name: str, config) -> ModelDef:
    """Unpickle a :class:`ModelDef`: the registered family of ``name`` with ``config``."""
    return ModelDef(name, config, get_entry(name).family)


_FEATURE_NAMES: dict = {}


def _feature_name_set(model: ModelDef) -> frozenset:
    if model not in _FEATURE_NAMES:
        _FEATURE_NAMES[model] = frozenset(model.feature_shapes())
    return _FEATURE_NAMES[model]


@dataclass(frozen=True)
class ModelDef:
    """A frozen, hashable model: a config plus the pure functions of its family.

    ``init(key) -> (params, state)`` and ``apply(params, state, x, *, train=False, rng=None)
    -> (logits, new_state)``; the contract is in ``docs/design.md``.
    """

    name: str
    config: Any
    family: Family = field(repr=False)

    def __reduce__(self):
        # by name and config (the family's functions are closures): a ModelDef, a partial over
        # its apply and a torch_compat module cross multiprocessing and torch.save
        return (_model_def, (self.name, self.config))

    # ---------------------------------------------------------------- metadata
    @property
    def entry(self) -> Entry:
        return get_entry(self.name)

    @property
    def metadata(self) -> dict:
        return self.entry.metadata

    @property
    def min_size(self) -> int:
        return self.family.min_size(self.config)

    @property
    def size_multiple(self) -> int:
        """What input heights and widths must be multiples of (1: any size from ``min_size``)."""
        return self.family.multiple(self.config)

    @property
    def max_size(self) -> int | None:
        """The largest input height and width (None: any size from ``min_size``)."""
        return self.family.max_size(self.config)

    def check_input(self, x) -> None:
        """A clear ``TypeError``/``ValueError`` for an input this model cannot take. Under
        ``torch.compile`` the size rules are left out (they are probed by running the forward on
        meta tensors, which dynamo would trace into the graph); eager calls check them."""
        sized = not torch.compiler.is_compiling()
        check_image(
            x,
            name=self.name,
            in_channels=self.in_channels,
            min_size=self.min_size if sized else 1,
            multiple=self.size_multiple if sized else 1,
            max_size=self.max_size if sized else None,
        )

    @property
    def in_channels(self) -> int:
        return self.family.in_channels(self.config)

    def num_params(self) -> int:
        return vtree.count_params(self.init(device="meta")[0])

    # ---------------------------------------------------------------- the contract
    def init(self, key=0, *, device=None, dtype=None) -> tuple[dict, dict]:
        """Fresh ``(params, state)`` from a key or int seed, with the reference's init scheme."""
        ini = Initializer.from_key(key, device=device, dtype=dtype)
        return vtree.partition_state(self.family.init(self.config, ini))

    def apply(self, params, state, x, *, train: bool = False, rng=None, **kw):
        """Pure forward pass: ``x [N, C, H, W] -> (logits [N, classes], new_state)``.

        In eval mode ``new_state is state``; in train mode BatchNorm uses batch statistics and
        the new running statistics are returned. ``rng`` (a :mod:`vafunc.core.random` key) drives
        dropout and stochastic depth and is required in train mode when their rates are non-zero.
        ``policy``: a :class:`vafunc.core.precision.Policy` (compute and output dtypes); ``attention``:
        ``"auto"`` (the rule of :func:`vafunc.core.layers.attention_path`), ``"math"`` or ``"fused"``.
        """
        if not isinstance(train, bool):
            raise TypeError(f"train must be a bool, got {type(train).__name__}")
        self.check_input(x)
        check_device(x, params, name=self.name)
        return self.family.apply(self.config, params, state, x, train=train, rng=rng, **kw)

    __call__ = apply

    # ---------------------------------------------------------------- features
    def feature_shapes(self, size: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every tap-able intermediate and its shape ``[1, C, H, W]`` for a ``size`` x ``size``
        input (default: 224, or the minimum if larger), computed on the meta device."""
        from vafunc.core.layers import Taps

        size = max(size or 224, self.min_size)
        params, state = self.init(device="meta")
        taps = Taps(None)
        x = torch.empty(1, self.in_channels, size, size, device="meta")
        self.family.apply(self.config, params, state, x, train=False, rng=None, taps=taps)
        return {k: tuple(v.shape) for k, v in taps.got.items()}

    @property
    def feature_names(self) -> list[str]:
        """Names accepted by :meth:`features`: the reference's module paths of stages and blocks."""
        return list(self.feature_shapes())

    def features(self, params, state, x, names, *, train: bool = False, rng=None, **kw):
        """Named intermediate outputs ``({name: tensor}, new_state)``; stops after the last one
        needed (the head is not computed unless asked for). ``policy=``/``attention=`` as in
        :meth:`apply` (features come out in the policy's output dtype)."""
        from vafunc.core.layers import Taps

        if isinstance(names, str):
            names = [names]
        names = list(names)
        known = () if torch.compiler.is_compiling() else _feature_name_set(self)
        unknown = [n for n in names if known and n not in known]
        if unknown:
            close = {n: difflib.get_close_matches(n, sorted(known), n=3) for n in unknown}
            raise ValueError(f"{self.name} has no features {unknown}; close names: {close} (see model.feature_names)")
        taps = Taps(names)
        self.check_input(x)
        check_device(x, params, name=self.name)
        _, new_state = self.family.apply(self.config, params, state, x, train=train, rng=rng, taps=taps, **kw)
        return {n: taps.got[n] for n in names}, new_state

    def intermediates(
        self,
        params,
        state,
        x,
        indices=None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
        **kw,
    ) -> list:
        """Dense block outputs as timm's ``forward_intermediates(x, indices, norm=, output_fmt=,
        return_prefix_tokens=, intermediates_only=True)``: ``indices`` an int (the last n blocks),
        block indices (negative from the end) or None (all); each output ``[N, D, h, w]``
        (``"NCHW"``) or ``[N, h * w, D]`` (``"NLC"``), the class / register / distillation tokens
        split off (returned beside each with ``return_prefix_tokens``); stops after the last block
        needed, as :meth:`features`. On Swin and MaxViT the "blocks" are timm's feature indices
        (Swin's four stages; MaxViT's stem and four stages) and ``norm`` reaches the last only.
        ``policy=``/``attention=`` as in :meth:`apply`."""
        if self.family.intermediates is None:
            raise TypeError(
                f"{self.name}: intermediates() is offered by the transformer families "
                "(timm_vit, vit, swin, maxvit); use features() for the others"
            )
        return self.family.intermediates(
            self,
            params,
            state,
            x,
            indices,
            norm=norm,
            output_fmt=output_fmt,
            return_prefix_tokens=return_prefix_tokens,
            **kw,
        )

    # ---------------------------------------------------------------- checkpoints
    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        p, s = self.init(device="meta")
        return {k: tuple(v.shape) for k, v in vtree.to_state_dict(p, s).items()}
