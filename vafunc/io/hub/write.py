"""Writing checkpoint files atomically: ``.safetensors`` or ``.pth``/``.pt``, under the final name
only once completely written and flushed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from vafunc.core import tree as vtree
from vafunc.io.hub.errors import SAFETENSORS_HINT, WeightsError

__all__ = ["atomic_write", "save_weights"]


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path`` and rename it over ``path``
    only once complete and flushed to disk: an interrupted write leaves no file (or the old one)."""
    path = Path(os.fspath(path))
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise WeightsError(f"{path}: the folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _plain_tensors(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in flat.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_weights: {k} is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise ValueError(f"save_weights: {k} is a meta tensor (no data); initialise the model on a real device")
        t = v.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel():
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_weights(params, state, path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``(params, state)`` as a reference-named state_dict to ``path``, atomically.

    ``.safetensors`` (needs ``safetensors``; ``metadata`` goes into its header) or ``.pth``/``.pt``
    (``torch.save``, loadable by ``torch.load(weights_only=True)`` and torchvision's
    ``load_state_dict``). The file appears under its final name only once completely written.
    """
    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    flat = _plain_tensors(vtree.to_state_dict(params, state))
    if suffix == ".safetensors":
        try:
            from safetensors.torch import save as st_save
        except ImportError:
            raise ImportError(f"writing {path} needs safetensors: {SAFETENSORS_HINT}") from None
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        data = st_save(flat, metadata=meta)
        atomic_write(path, lambda f: f.write(data))
    elif suffix in (".pth", ".pt", ".bin"):
        atomic_write(path, lambda f: torch.save(flat, f))
    else:
        raise WeightsError(f"{path}: unknown checkpoint suffix {suffix!r}; use .safetensors, .pth or .pt")
    return path
