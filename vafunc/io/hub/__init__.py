"""Published pretrained weights: the table of checkpoints, loading and saving checkpoint files.

* :func:`list_weights` / :func:`get_weights`: the published ImageNet-1k checkpoints as facts
  (:class:`Weights`): file name and URL (the hash prefix is part of the file name), the evaluation
  transform, reported accuracy and GFLOPs. Every torchvision classification checkpoint, timm's
  ``legacy_xception.tf_in1k`` (vafunc ``xception``) and ``mobilenetv1_100.ra4_e3600_r224_in1k``
  (vafunc ``mobilenet_v1``), and Cadene's BN-Inception (vafunc ``inception_v2``).
* :func:`load_weights` ``(model, "IMAGENET1K_V2" | "DEFAULT" | path) -> (params, state)``: a tag
  resolves to the torch.hub cache file (``$TORCH_HOME/hub/checkpoints/<file>``), downloaded with
  hash checking when it is missing (never at import); a path reads ``.pth``/``.pt`` with
  ``torch.load(weights_only=True)`` or ``.safetensors``. Loading is strict and all-or-nothing.
* :func:`save_weights` writes ``.safetensors`` or ``.pth`` atomically.
* :func:`pretrained` ``(name, tag) -> (model, params, state)`` builds the model with the config the
  checkpoint needs (e.g. torchvision's Inception-v3 weights expect ``transform_input=True``).
  ``pretrained("seresnet50.a1_in1k")``, timm's ``name.tag``, reads the tag's Hugging Face repository
  through the HF cache (:mod:`~vafunc.hub.timm_hub`: :func:`get_timm_tag`, :func:`list_timm_tags`,
  :func:`fetch_hub_files`; the ``hub`` extra).

Every problem raises :class:`WeightsError` (a ``ValueError``) that names the file and what is wrong.

The package's modules, each importing only those above it: :mod:`~vafunc.hub.errors`,
:mod:`~vafunc.hub.table` (the table, from the package data file ``weights.csv``),
:mod:`~vafunc.hub.read` (file formats and state_dict layouts), :mod:`~vafunc.hub.load` (tags,
the cache, loading into a model), :mod:`~vafunc.hub.timm_hub` (timm's tags, from the package data
file ``timm_pretrained.csv``, and the Hugging Face cache; its :func:`pretrained` is the package's,
dispatching to ``load.pretrained`` for a model name) and :mod:`~vafunc.hub.write` (atomic saving).
"""

from vafunc.io.hub.errors import SAFETENSORS_HINT, WeightsError
from vafunc.io.hub.load import fetch, identify, load_weights, resolve_weights, verify_hash
from vafunc.io.hub.read import read_checkpoint
from vafunc.io.hub.table import NORMALIZATIONS, Weights, cache_dir, find_weights, get_weights, list_weights
from vafunc.io.hub.timm_hub import TimmTag, fetch_hub_files, get_timm_tag, list_timm_tags, pretrained
from vafunc.io.hub.write import atomic_write, save_weights

__all__ = [
    "SAFETENSORS_HINT",
    "NORMALIZATIONS",
    "fetch",
    "atomic_write",
    "Weights",
    "WeightsError",
    "list_weights",
    "get_weights",
    "find_weights",
    "load_weights",
    "save_weights",
    "read_checkpoint",
    "pretrained",
    "cache_dir",
    "identify",
    "verify_hash",
    "resolve_weights",
    "TimmTag",
    "get_timm_tag",
    "list_timm_tags",
    "fetch_hub_files",
]
