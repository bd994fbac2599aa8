"""Loading checkpoints into a model: resolve a tag or path, fetch into the torch.hub cache (hash
checked), read, check strictly against the model (with hints when it does not fit), and
:func:`identify` which registered models a state_dict fits."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from vafunc.core import registry
from vafunc.core import tree as vtree
from vafunc.io.hub.errors import WeightsError
from vafunc.io.hub.read import read_checkpoint
from vafunc.io.hub.table import _HASH_IN_NAME, Weights, find_weights, get_weights
from vafunc.io.state_dict import StateDictMismatch, from_state_dict, missing_num_batches_tracked, state_dict_size

__all__ = ["identify", "fetch", "verify_hash", "load_weights", "pretrained"]


@functools.cache
def _shapes(name: str) -> dict:
    return registry.get_model(name).state_dict_shapes()


@functools.cache
def _stored_sizes() -> dict[str, tuple[int, int]]:
    """Each registered model's :func:`state_dict_size`, from the rows ``vafunc list`` keeps in the
    package (``vafunc/core/models.json``) where they are the registry's current facts (tests/test_house.py
    checks that they are); a model without a current row is probed."""
    out, known = {}, set(registry.list_models())
    for name, r in registry.stored_rows().items():
        e = registry.get_entry(name) if name in known else None
        current = e is not None and (r["family"], r.get("task"), r["params"]) == (e.family.name, e.task, e.params)
        if current and "state_dict" in r:
            out[name] = tuple(r["state_dict"])
    return out


def identify(flat: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models (default configs) whose state_dict the checkpoint fits exactly, after each
    family's legacy-name translation."""
    found = []
    sizes = _stored_sizes()
    for name in registry.list_models():
        model = registry.get_model(name)
        cand = dict(flat)
        if model.family.remap is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cand, _ = model.family.remap(model.config, cand)
            except (ValueError, TypeError, KeyError):
                continue
        if name in sizes and sizes[name] != state_dict_size(cand):
            continue  # cannot fit: skips probing the model's shapes (135 models: 15 s -> well under 1 s)
        shapes = _shapes(name)
        for k in missing_num_batches_tracked(shapes, cand):
            cand[k] = None
        if set(cand) == set(shapes) and all(v is None or tuple(v.shape) == shapes[k] for k, v in cand.items()):
            found.append(name)
    return found


def _mismatch_hint(model, flat: dict) -> str:
    hints = []
    cfg = model.config
    shapes = model.state_dict_shapes()
    bad = [k for k in shapes if k in flat and tuple(flat[k].shape) != shapes[k]]
    if bad and hasattr(cfg, "num_classes") and all(shapes[k][:1] == (cfg.num_classes,) for k in bad):
        got = {int(flat[k].shape[0]) for k in bad}
        if len(got) == 1:
            n = got.pop()
            hints.append(f"the checkpoint's classifier has {n} classes: build the model with num_classes={n}")
    fits = [n for n in identify(flat) if n != model.name]
    if fits:
        hints.append(f"the checkpoint fits {', '.join(fits)}")
    return ("\nhint: " + "; ".join(hints)) if hints else ""


def _config_warning(model, w: Weights) -> None:
    cfg = model.config
    wrong = {k: v for k, v in w.config if getattr(cfg, k, v) != v}
    if wrong:
        fix = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        warnings.warn(
            f"{w.name} was trained for {model.name} with {fix}, but this model has "
            + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in wrong)
            + f"; its predictions will differ from the published ones. Build it with "
            f"vafunc.get_model({model.name!r}, {fix}) or use vafunc.hub.pretrained({model.name!r}, {w.tag!r})",
            stacklevel=3,
        )


def _offline() -> str | None:
    for var in ("VAFUNC_OFFLINE", "HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def fetch(weights: Weights, *, download: bool = True, progress: bool = True) -> Path:
    """The cache path of ``weights``, downloading the file (hash-checked) if it is not there yet."""
    dst = weights.cache_path
    if dst.is_file():
        return dst
    where = (
        f"Download {weights.url} on a machine with network access and put it at {dst} (the torch.hub "
        f"cache, $TORCH_HOME/hub/checkpoints), or pass the file's path instead of the tag"
    )
    reason = "download=False" if not download else _offline()
    if reason:
        raise WeightsError(
            f"{weights.name}: {weights.file} is not in the cache and downloading is off ({reason}). {where}"
        )
    import urllib.error

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(dst), hash_prefix=weights.hash_prefix, progress=progress)
    except RuntimeError as err:
        if "hash" in str(err):
            raise WeightsError(
                f"{weights.name}: the file downloaded from {weights.url} does not match the SHA-256 prefix "
                f"{weights.hash_prefix} in its name (a corrupt or altered download); nothing was saved. {where}"
            ) from None
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise WeightsError(f"{weights.name}: cannot download {weights.url} ({reason}); offline? {where}") from None
    return dst


def verify_hash(path) -> str:
    """Check ``path``'s SHA-256 against the hash prefix in its name (``name-<prefix>.ext``)."""
    import hashlib

    path = Path(path)
    m = _HASH_IN_NAME.search(path.name)
    if not m:
        raise WeightsError(f"{path}: the file name has no hash prefix (name-<sha256 prefix>.ext) to check against")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if not digest.startswith(m.group(1)):
        raise WeightsError(
            f"{path}: SHA-256 {digest[: len(m.group(1))]}... does not match the prefix {m.group(1)} in its name: "
            "the file is corrupt or not the published one"
        )
    return digest


def resolve_weights(model, weights) -> tuple[Path | None, Weights | None]:
    """``weights`` (a tag, a :class:`Weights` or a path) -> ``(file path, table entry)``: a path
    gives ``(path, its table entry or None)``; a tag or a :class:`Weights` gives ``(None, entry)``
    (the file is the entry's cache file: :func:`fetch`). ``model``: a name or a ModelDef."""
    if isinstance(weights, Weights):
        return None, weights
    if isinstance(weights, os.PathLike):
        path = Path(weights)
        return path, find_weights(path)
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a tag (str), a path or a vafunc.hub.Weights, got {type(weights).__name__}")
    looks_like_path = (
        os.sep in weights
        or "/" in weights
        or Path(weights).suffix.lower() in (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
    )
    if looks_like_path or Path(weights).is_file():
        path = Path(weights)
        return path, find_weights(path)
    return None, get_weights(model, weights)


def load_weights(
    model,
    weights="DEFAULT",
    *,
    device=None,
    dtype: torch.dtype | None = None,
    download: bool = True,
    progress: bool = True,
    check_hash: bool = False,
) -> tuple[dict, dict]:
    """Load a checkpoint into ``(params, state)`` for ``model`` (a :class:`vafunc.ModelDef` or a name).

    ``weights``: a tag (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ...) that resolves to the torch.hub cache
    file (downloaded with hash checking if missing and ``download`` is true), or a path to a
    ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file. The
    load is strict: a checkpoint that does not fit raises :class:`WeightsError` listing every
    missing, unexpected and mis-shaped key, and nothing is returned half-loaded. ``device`` /
    ``dtype`` move and cast the tensors (floating-point ones only for ``dtype``).
    ``check_hash=True`` also checks the file's SHA-256 against the prefix in its name (torch.hub
    checks it when downloading; this re-checks a cached or copied file).
    """
    if isinstance(model, str):
        model = registry.get_model(model)
    if not isinstance(model, registry.ModelDef):
        raise TypeError(f"load_weights expects a vafunc ModelDef or a model name, got {type(model).__name__}")
    path, w = resolve_weights(model, weights)
    if path is None:
        if w.model != model.name:
            raise WeightsError(f"{w.name} are weights for {w.model}, not for {model.name}")
        path = fetch(w, download=download, progress=progress)
    if w is not None and w.model == model.name:
        _config_warning(model, w)
    if check_hash:
        verify_hash(path)
    flat, _meta, notes = read_checkpoint(path)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, state = from_state_dict(model, flat)
    except (StateDictMismatch, ValueError, TypeError) as err:
        raise WeightsError(f"{path} does not fit {model.name}: {err}{_mismatch_hint(model, flat)}") from None
    for c in caught:
        warnings.warn(f"{path}: {c.message}", c.category, stacklevel=2)
    if device is not None or dtype is not None:

        def move(t):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device) if device is not None else t

        params, state = vtree.tree_map(move, params), vtree.tree_map(move, state)
    return params, state


def pretrained(name: str, weights: str = "DEFAULT", *, download: bool = True, device=None, **config):
    """``(model, params, state)``: the model built with the config the checkpoint needs (plus
    ``config`` overrides), and the loaded weights. ``weights`` is a tag or a path."""
    path, w = resolve_weights(name, weights)
    need = dict(w.config) if (w is not None and w.model == name) else {}
    model = registry.get_model(name, **{**need, **config})
    params, state = load_weights(model, weights if path is not None else w, device=device, download=download)
    return model, params, state
