"""A real Hugging Face hub cache, written as ``huggingface_hub`` writes one, for tests without network.

``put_timm_model(cache, repo_id, model)`` saves a timm model as timm publishes it (``model.safetensors``
and ``config.json`` from ``timm.models.save_for_hf``) into ``cache`` (``$HF_HOME/hub``) in the layout
``huggingface_hub`` downloads into::

    models--timm--<name>.<tag>/
        blobs/<sha256 of the file>           the content (git's LFS pointer hash for large files)
        snapshots/<commit>/model.safetensors  -> ../../blobs/<sha256>   (relative symlinks)
        snapshots/<commit>/config.json        -> ../../blobs/<sha256>
        refs/main                             <commit>
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["put_timm_model", "repo_folder"]


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def put_timm_model(cache, repo_id: str, model, *, commit: str | None = None) -> Path:
    """Write ``model`` (a timm ``nn.Module``) into the hub cache ``cache`` as ``repo_id``'s ``main``;
    returns the snapshot folder."""
    from timm.models import save_for_hf

    folder = repo_folder(cache, repo_id)
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()  # a 40-hex commit id, as the hub's
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        for name in ("model.safetensors", "config.json"):
            data = (Path(tmp) / name).read_bytes()
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(os.path.relpath(blob, snap), link)
    (folder / "refs" / "main").write_text(commit)
    return snap
