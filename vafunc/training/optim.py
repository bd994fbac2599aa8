"""Functional optimizers over parameter trees, in the optax style.

``opt = sgd(0.1, momentum=0.9)``; ``opt_state = opt.init(params)``;
``params, opt_state = opt.update(grads, opt_state, params)``. Nothing is mutated: every update
returns new tensors (computed with torch's multi-tensor ``_foreach`` kernels, the same kernels
``torch.optim``'s ``foreach`` implementations use; a donated SGD update of contiguous CPU tensors
takes torch's fused single-pass kernel), and the arithmetic follows ``torch.optim.SGD`` /
``torch.optim.AdamW`` step for step, so 20 steps on the same gradients give the same parameters.

Learning rates are floats or schedules: plain functions of the step count (an int64 tensor, so a
schedule works under ``torch.compile`` and ``vmap``), see :func:`cosine_schedule`,
:func:`warmup_cosine_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from vafunc.core import tree as vtree

__all__ = ["Optimizer", "sgd", "adamw", "constant_schedule", "cosine_schedule", "warmup_cosine_schedule"]

Schedule = Callable[[torch.Tensor], torch.Tensor | float]
LR = float | Schedule


@dataclass(frozen=True)
class Optimizer:
    """A pair of pure functions: ``init(params) -> opt_state`` and
    ``update(grads, opt_state, params, *, donate=False) -> (new_params, new_opt_state)``.

    ``donate=True`` hands ``grads``, ``params`` and the optimizer's buffers over to the update, which
    then writes the results into them in place (JAX's buffer donation): the same numbers, without
    allocating a fresh copy of every parameter and buffer each step (the benchmarks' train rows
    show the difference). The caller must not use the donated trees afterwards.
    """

    init: Callable
    update: Callable
    name: str = ""


def _lr_at(lr: LR, step: torch.Tensor):
    return lr(step) if callable(lr) else lr


def _check_lr(lr, name):
    if not callable(lr) and (not isinstance(lr, (int, float)) or lr < 0):
        raise ValueError(f"{name}: lr must be a non-negative float or a schedule, got {lr!r}")


def _flat(tree: Mapping) -> tuple[list[str], list[torch.Tensor]]:
    f = vtree.flatten(tree)
    return list(f), list(f.values())


def _check_same(names, grads_tree, what="grads"):
    g_names, g = _flat(grads_tree)
    if g_names != names:
        missing = sorted(set(names) - set(g_names))
        extra = sorted(set(g_names) - set(names))
        raise ValueError(f"{what} do not match params: missing {missing[:5]}, extra {extra[:5]}")
    return g


# --------------------------------------------------------------------------- SGD


def _fusable(*lists) -> list[int]:
    """Indices where torch's fused single-pass kernels (``torch._fused_sgd_``) may take over a
    donated update: plain contiguous CPU tensors of one floating dtype, outside ``torch.compile``
    and ``torch.func`` transforms (the kernel reads memory linearly: a transposed gradient would be
    read wrongly, so strided tensors keep the ``_foreach`` path)."""
    if torch.compiler.is_compiling() or not hasattr(torch, "_fused_sgd_"):
        return []
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    out = []
    for i, ts in enumerate(zip(*lists)):
        t0 = ts[0]
        if (
            t0.device.type == "cpu"
            and t0.dtype.is_floating_point
            and all(
                t.device == t0.device
                and t.dtype == t0.dtype
                and t.shape == t0.shape
                and t.is_contiguous()
                and not wrapped(t)
                for t in ts
            )
        ):
            out.append(i)
    return out


def sgd(
    lr: LR, momentum: float = 0.0, *, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
) -> Optimizer:
    """``torch.optim.SGD``: ``d = g + wd * p``; ``buf = d`` on the first step, then
    ``buf = momentum * buf + (1 - dampening) * d``; ``d = d + momentum * buf`` (Nesterov) or ``buf``;
    ``p = p - lr * d``."""
    _check_lr(lr, "sgd")
    if momentum < 0 or weight_decay < 0:
        raise ValueError(f"sgd: momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("sgd: Nesterov momentum requires momentum > 0 and dampening = 0")

    def init(params):
        state = {"step": torch.zeros((), dtype=torch.int64)}
        if momentum:
            state["momentum"] = vtree.tree_map(torch.zeros_like, params)
        return state

    def foreach_update(p, d, buf, step, lr_t, donate):
        """The update with torch's multi-tensor kernels: ``(new params, new momentum buffers)``."""
        if weight_decay:
            if donate:
                torch._foreach_add_(d, p, alpha=weight_decay)
            else:
                d = torch._foreach_add(d, p, alpha=weight_decay)
        if momentum:
            # torch: buf = d on the first step, momentum * buf + (1 - dampening) * d afterwards. The
            # buffer starts at zero, so without dampening the general formula is already exact.
            if donate and not dampening:
                torch._foreach_mul_(buf, momentum)
                torch._foreach_add_(buf, d)
            else:
                updated = torch._foreach_mul(buf, momentum)
                torch._foreach_add_(updated, d, alpha=1.0 - dampening)
                if dampening:
                    first = step == 0
                    updated = [torch.where(first, di, ui) for di, ui in zip(d, updated)]
                buf = updated
            if nesterov:
                d = torch._foreach_add(d, buf, alpha=momentum)
            else:
                d = buf
        if donate:
            if isinstance(lr_t, torch.Tensor):
                torch._foreach_sub_(p, torch._foreach_mul(d, lr_t))
            else:
                torch._foreach_add_(p, d, alpha=-lr_t)
            return p, buf
        if isinstance(lr_t, torch.Tensor):
            return torch._foreach_sub(p, torch._foreach_mul(d, lr_t)), buf
        return torch._foreach_add(p, d, alpha=-lr_t), buf

    def update(grads, opt_state, params, *, donate: bool = False):
        names, p = _flat(params)
        d = _check_same(names, grads)
        step = opt_state["step"]
        lr_t = _lr_at(lr, step)
        if isinstance(lr_t, torch.Tensor):
            lr_t = lr_t.to(p[0].dtype)
        buf = _flat(opt_state["momentum"])[1] if momentum else None
        fused = []
        if donate and not dampening and (not isinstance(lr_t, torch.Tensor) or lr_t.device.type == "cpu"):
            fused = _fusable(p, d, *([buf] if momentum else []))
        if fused:
            # one pass over each parameter, gradient and buffer where the _foreach kernels make three
            # (faster; see benchmarks/README.md); the same arithmetic, in place
            pick = lambda ts: [ts[i] for i in fused]  # noqa: E731
            torch._fused_sgd_(
                pick(p),
                pick(d),
                pick(buf) if momentum else [],
                weight_decay=weight_decay,
                momentum=momentum,
                lr=lr_t,
                dampening=0.0,
                nesterov=nesterov,
                maximize=False,
                is_first_step=False,
            )
        new_p, new_buf = list(p), list(buf) if momentum else None
        taken = set(fused)
        rest = [i for i in range(len(p)) if i not in taken]
        if rest:
            pick = lambda ts: [ts[i] for i in rest]  # noqa: E731
            rp, rb = foreach_update(pick(p), pick(d), pick(buf) if momentum else None, step, lr_t, donate)
            for j, i in enumerate(rest):
                new_p[i] = rp[j]
                if momentum:
                    new_buf[i] = rb[j]
        new_state = {"step": step + 1}
        if momentum:
            new_state["momentum"] = vtree.unflatten(dict(zip(names, new_buf)))
        return vtree.unflatten(dict(zip(names, new_p))), new_state

    return Optimizer(init, update, "sgd")


# --------------------------------------------------------------------------- AdamW


def adamw(
    lr: LR = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
) -> Optimizer:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019): decoupled decay ``p *= 1 - lr * wd``, then
    Adam with bias correction: ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
    _check_lr(lr, "adamw")
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"adamw: betas must be in [0, 1), got {betas}")

    def init(params):
        zeros = vtree.tree_map(torch.zeros_like, params)
        return {
            "step": torch.zeros((), dtype=torch.int64),
            "exp_avg": zeros,
            "exp_avg_sq": vtree.tree_map(torch.zeros_like, params),
        }

    def update(grads, opt_state, params, *, donate: bool = False):
        names, p = _flat(params)
        g = _check_same(names, grads)
        _, m = _flat(opt_state["exp_avg"])
        _, v = _flat(opt_state["exp_avg_sq"])
        step = opt_state["step"] + 1
        lr_t = _lr_at(lr, opt_state["step"])
        if donate:
            if weight_decay:
                torch._foreach_mul_(p, 1.0 - lr_t * weight_decay)
            torch._foreach_lerp_(m, g, 1.0 - b1)
            torch._foreach_mul_(v, b2)
        else:
            if weight_decay:
                p = torch._foreach_mul(p, 1.0 - lr_t * weight_decay)
            m = torch._foreach_lerp(m, g, 1.0 - b1)
            v = torch._foreach_mul(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - b2)
        t = step.to(torch.float64)
        bc1 = 1.0 - b1**t
        bc2_sqrt = torch.sqrt(1.0 - b2**t)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt.to(v[0].dtype))
        torch._foreach_add_(denom, eps)
        step_size = (lr_t / bc1).to(p[0].dtype)
        upd = torch._foreach_div(m, denom)
        torch._foreach_mul_(upd, step_size)
        if donate:
            torch._foreach_sub_(p, upd)
            new_p = p
        else:
            new_p = torch._foreach_sub(p, upd)
        return vtree.unflatten(dict(zip(names, new_p))), {
            "step": step,
            "exp_avg": vtree.unflatten(dict(zip(names, m))),
            "exp_avg_sq": vtree.unflatten(dict(zip(names, v))),
        }

    return Optimizer(init, update, "adamw")


# --------------------------------------------------------------------------- schedules


def constant_schedule(value: float) -> Schedule:
    return lambda step: value


def cosine_schedule(base_lr: float, total_steps: int, final_lr: float = 0.0) -> Schedule:
    """``final + (base - final) * (1 + cos(pi * step / total)) / 2`` (``CosineAnnealingLR``'s
    closed form), held at ``final_lr`` after ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def schedule(step):
        s = torch.as_tensor(step, dtype=torch.float64).clamp(max=total_steps)
        return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + torch.cos(math.pi * s / total_steps))

    return schedule


def warmup_cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> Schedule:
    """Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``, then
    cosine decay to ``final_lr`` at ``total_steps``."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    cos = cosine_schedule(base_lr, total_steps - warmup_steps, final_lr)

    def schedule(step):
        s = torch.as_tensor(step, dtype=torch.float64)
        warm = base_lr * (s + 1) / max(warmup_steps, 1)
        return torch.where(s < warmup_steps, warm, cos(s - warmup_steps))

    return schedule
