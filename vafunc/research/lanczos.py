"""Lanczos with full reorthogonalisation over a curvature operator's products (used by
:func:`vafunc.curvature.hessian_eigenvalues` and :func:`vafunc.curvature.hessian_density`).

The basis lives in one preallocated ``[s, steps + 1, dim]`` tensor; each product is written into
the slot it becomes (``CurvatureOperator.apply_many(..., out=)``) and orthogonalised there in
place, so a step allocates nothing of the parameter count's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor


class Operator(Protocol):
    """What :func:`lanczos` needs of an operator (``vafunc.curvature.CurvatureOperator`` is one)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def apply_many(
        self, vs: Sequence[Tensor], progress: Callable[[int], None] | None = None, out: Sequence[Tensor] | None = None
    ) -> list[Tensor]: ...


__all__ = ["lanczos", "tridiag"]


def _dot64(a: Tensor, b: Tensor, chunk: int = 1 << 16) -> float:
    """``a . b`` of two flat vectors, float32 products summed per chunk and the chunks in float64
    (the accuracy of a float64 sum without a float64 copy of either vector)."""
    n = a.numel() // chunk * chunk
    total = torch.bmm(a[:n].view(-1, 1, chunk), b[:n].view(-1, chunk, 1)).double().sum() if n else 0.0
    return float(total + torch.dot(a[n:], b[n:]).double()) if n < a.numel() else float(total)


def lanczos(op: Operator, v0: Tensor, steps: int, *, k: int = 0, tol: float = 0.0, progress=None):
    """Lanczos with full reorthogonalisation on the rows of ``v0 [s, dim]`` at once (one pass over
    the batches per step serves all rows). With ``k``: stop when the ``k`` largest Ritz values of
    the (single) row have residual bounds ``|beta_m s_mi| <= tol |theta_i|``. Returns the
    tridiagonal ``T [s, m, m]`` (float64), the basis ``Q [s, m, dim]`` and convergence. Each
    product is written into the basis slot it becomes and orthogonalised there, in place."""
    s = v0.shape[0]
    steps = min(steps, op.dim)
    q = torch.empty(s, steps + 1, op.dim, dtype=op.dtype, device=op.device)
    q[:, 0] = v0 / v0.norm(dim=1, keepdim=True)
    alpha = torch.zeros(s, steps, dtype=torch.float64)
    beta = torch.zeros(s, steps, dtype=torch.float64)
    m, converged = steps, False
    for j in range(steps):
        w = q[:, j + 1]
        op.apply_many(list(q[:, j]), progress, out=list(w))
        for i in range(s):
            alpha[i, j] = _dot64(w[i], q[i, j])
            w[i].add_(q[i, j], alpha=-float(alpha[i, j]))
            if j:
                w[i].add_(q[i, j - 1], alpha=-float(beta[i, j - 1]))
        basis = q[:, : j + 1]
        before = w.norm(dim=1)
        for _ in range(2):  # full reorthogonalisation; a second pass where the first cancelled much
            w[:, None].baddbmm_(torch.bmm(basis, w[:, :, None]).transpose(1, 2), basis, alpha=-1)
            after = w.norm(dim=1)  # ("twice is enough", Parlett: repeat when the norm fell below 1/sqrt 2)
            if bool((after > 0.7071 * before).all()):
                break
            before = after
        beta[:, j] = after.double().cpu()
        if k:
            t = tridiag(alpha[:, : j + 1], beta[:, :j])[0]
            theta, vec = torch.linalg.eigh(t)
            top = min(k, j + 1)
            res = beta[0, j] * vec[-1, -top:].abs()
            if j + 1 >= k and bool((res <= tol * theta[-top:].abs()).all()):
                m, converged = j + 1, True
                break
        if bool((beta[:, j] <= 1e-10 * alpha[:, : j + 1].abs().amax(1).clamp_min(1e-30)).any()):
            m, converged = j + 1, True  # an invariant subspace: the Ritz values are exact
            break
        w.div_(beta[:, j, None].to(w))
    return tridiag(alpha[:, :m], beta[:, : m - 1]), q[:, :m], converged


def tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    t = torch.diag_embed(alpha)
    if beta.shape[1]:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return t
