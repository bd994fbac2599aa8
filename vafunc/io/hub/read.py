"""Reading checkpoint files: the format from the content (a ``.pth``/``.pt`` zip archive, a legacy
pickle, ``.safetensors``), whatever the suffix, and the state_dict from the usual layouts (training
checkpoint wrappers, DataParallel's ``module.`` prefix). Nothing is checked against a model here."""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vafunc.io.hub.errors import SAFETENSORS_HINT, WeightsError

__all__ = ["read_checkpoint"]


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # torch's legacy (pre-1.6) format starts with a pickled magic number
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    return None


def _unsafe_global(message: str) -> str | None:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message) or re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return m.group(1)
    m = re.search(r"Unsupported (?:class|operand)[^\n]*", message)
    return m.group(0) if m else None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        bad = _unsafe_global(msg) if "Weights only load failed" in msg else None
        if bad:
            raise WeightsError(
                f"{path}: refused to load: the file is a pickle that would import {bad}, i.e. run code "
                "from the file, not just read tensors (torch.load(weights_only=True) allows only tensors "
                "and plain containers). If you trust its source, load it yourself with "
                "torch.load(path, weights_only=False) and pass the state_dict to vafunc.from_state_dict"
            ) from None
        raise WeightsError(f"{path}: truncated or corrupt PyTorch checkpoint ({msg.splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(f"{path}: truncated or corrupt PyTorch checkpoint ({first})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(f"{path} is a safetensors file; reading it needs safetensors: {SAFETENSORS_HINT}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on bad files
        if isinstance(err, ImportError):
            raise
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({first})") from None
    return flat, meta


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "module")


def _as_state_dict(obj: Any, path: Path) -> tuple[dict, list[str]]:
    """A flat ``{name: tensor}`` from what a checkpoint file holds (unwrapping the usual training
    checkpoint wrappers and DataParallel's ``module.`` prefix, with a note)."""
    notes = []
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)")
    if obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            inner = obj.get(k)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                notes.append(f"using the state_dict under checkpoint[{k!r}]")
                obj = inner
                break
        else:
            bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise WeightsError(
                f"{path}: not a state_dict: {len(bad)} entries are not tensors ({', '.join(bad[:8])}"
                f"{', ...' if len(bad) > 8 else ''}), and none of {list(_WRAPPER_KEYS)} holds one"
            )
    if not obj:
        raise WeightsError(f"{path}: the checkpoint holds no tensors")
    flat = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in flat):
        flat = {k[len("module.") :]: v for k, v in flat.items()}
        notes.append("removed the 'module.' prefix (a DataParallel checkpoint)")
    return flat, notes


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Read a checkpoint file: ``(flat state_dict, metadata, notes)``. Nothing is checked against a
    model here; the format is recognised from the content (``.pth``/``.pt`` zip or legacy pickle,
    ``.safetensors``), whatever the suffix."""
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty")
    kind = _sniff(path)
    if kind == "safetensors":
        flat, meta = _read_safetensors(path)
        notes = []
        if not flat:
            raise WeightsError(f"{path}: the safetensors file holds no tensors")
    elif kind in ("zip", "pickle"):
        obj = _read_torch(path)
        flat, notes = _as_state_dict(obj, path)
        meta = {}
    else:
        with open(path, "rb") as f:
            head = f.read(12)
        raise WeightsError(
            f"{path}: not a checkpoint: expected a PyTorch file (.pth/.pt: a zip archive or a pickle) or a "
            f".safetensors file, but the file starts with {head!r}"
        )
    return flat, meta, notes
