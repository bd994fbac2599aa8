"""Explicit mixed precision: a :class:`Policy` says which dtype parameters are stored in, which
one the network computes in, and which one comes out (the JAX/jmp way, instead of
``torch.autocast``, whose thread-local casting cache misbehaves under ``vmap`` and ``grad``).

``model.apply(params, state, x, policy=Policy.bf16())``:

* the input is cast to ``compute``;
* every convolution and linear layer casts its weights (and its input) to ``compute``, inside
  the forward, so gradients flow back to the stored ``param``-dtype tensors;
* normalisation stays in float32: BatchNorm and LayerNorm keep their float32 weights and running
  statistics (the kernels accumulate in float32 and the running statistics are updated in
  float32), and the math attention path takes its softmax in float32; with ``fold_norm=True``,
  an eval-mode BatchNorm right after a convolution is instead folded into that convolution's
  weights and bias in the stored dtype, and the folded tensors are cast (no separate
  normalisation pass: faster, but on the trained EfficientNet-Lite0 in bfloat16 the logit error
  grows by ~40%, see benchmarks/README.md);
* the logits (and requested features) are cast to ``output``.

``vafunc.compile(..., dtype=torch.bfloat16)`` is ``Policy(param=float32, compute=bfloat16,
output=<the input's dtype>)``; ``make_train_step(..., policy=...)`` trains with one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Policy", "check_policy"]

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Policy:
    """Stored, computed and returned dtypes (floating torch dtypes)."""

    param: torch.dtype = torch.float32
    compute: torch.dtype = torch.float32
    output: torch.dtype = torch.float32
    fold_norm: bool = False

    def __post_init__(self):
        for f in ("param", "compute", "output"):
            v = getattr(self, f)
            if not isinstance(v, torch.dtype) or v not in _FLOATS:
                raise TypeError(f"Policy.{f} must be one of {[str(d) for d in _FLOATS]}, got {v!r}")
        if not isinstance(self.fold_norm, bool):
            raise TypeError(f"Policy.fold_norm must be a bool, got {self.fold_norm!r}")

    @classmethod
    def bf16(cls, output: torch.dtype = torch.float32, *, fold_norm: bool = False) -> Policy:
        """float32 parameters, bfloat16 compute, ``output`` logits (float32 by default)."""
        return cls(torch.float32, torch.bfloat16, output, fold_norm)

    @property
    def mixed(self) -> bool:
        """Whether compute differs from the stored dtype (layers then cast their weights)."""
        return self.compute != self.param

    def __str__(self) -> str:
        n = lambda d: str(d).replace("torch.", "")  # noqa: E731
        fold = ", fold_norm=True" if self.fold_norm else ""
        return f"Policy(param={n(self.param)}, compute={n(self.compute)}, output={n(self.output)}{fold})"


def check_policy(policy) -> Policy | None:
    """``policy`` if it is a :class:`Policy` or ``None``, else a clear ``TypeError``."""
    if policy is None or isinstance(policy, Policy):
        return policy
    raise TypeError(f"policy must be a vafunc.core.precision.Policy or None, got {type(policy).__name__}")


def dtype_mismatch(name: str, x_dtype, p_dtype) -> TypeError:
    """The error for a float input whose dtype is not the parameters' (no policy given)."""
    n = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return TypeError(
        f"{name}: the input is {n(x_dtype)} but the parameters are {n(p_dtype)}; cast the input "
        f"(x.to(torch.{n(p_dtype)})) or compute in another dtype with a precision policy: "
        f"model.apply(params, state, x, policy=vafunc.core.precision.Policy(param=torch.{n(p_dtype)}, "
        f"compute=torch.{n(x_dtype)}, output=torch.float32))"
    )
