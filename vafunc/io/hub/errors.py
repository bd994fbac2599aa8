"""The error every checkpoint problem raises, shared by the table, the reader, the loader and the writer."""

from __future__ import annotations

__all__ = ["WeightsError", "SAFETENSORS_HINT"]

SAFETENSORS_HINT = "pip install 'vafunc[safetensors]'"


class WeightsError(ValueError):
    """A checkpoint cannot be found, read or used; the message names the file and the reason."""
