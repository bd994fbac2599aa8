"""A functional train step: ``(params, state, opt_state, batch, rng) -> (params, state, opt_state, metrics)``.

Built from ``model.apply(..., train=True)`` and a :mod:`vafunc.training.optim` optimizer; nothing is mutated.
``make_train_step(model, opt)`` trains one model; ``make_train_step(model, opt, ensemble=True)``
trains a stacked ensemble in one call, each member with its own BatchNorm statistics and dropout
keys. ``ensemble_method`` names the lowering as in :func:`vafunc.ensemble_apply`: ``"auto"`` (the
default) is ``"batched"`` where the family has a members-mode lowering and the stacked batch is
small (one forward and one backward for all members, :mod:`vafunc.research.members`), else ``"loop"`` (one
member after the other);
``"vmap"`` takes the members' gradients in one ``torch.vmap`` (``vmap(grad)``). The optimizer
update is element-wise, so it runs on the stacked trees directly.

Gradients (``grad=``): ``"autograd"`` (default for one model) differentiates with
``torch.autograd.grad`` on fresh leaf views of the parameters, the same engine path as
``loss.backward()`` with no functorch wrapping; ``"func"`` uses ``torch.func.grad`` (needed inside
other ``torch.func`` transforms and the only choice for a vmapped ensemble). Both are pure and give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vafunc.core import random as vrandom
from vafunc.core import tree as vtree
from vafunc.research.ensemble import ensemble_size, map_outputs, member_keys
from vafunc.research.members import Members
from vafunc.research.members import prefer as members_prefer
from vafunc.training.recalibrate import recalibrate_batch_norm

__all__ = [
    "make_train_step",
    "make_dp_train_step",
    "recalibrate_batch_norm",
    "cross_entropy",
    "segmentation_loss",
    "accuracy",
]


#: the label of pixels that no loss or score counts (VOC's object boundaries)
IGNORE_INDEX = 255


def cross_entropy(logits: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """The default loss: cross entropy of logits ``[N, C]``; dense logits (``[N, C, H, W]`` against
    labels ``[N, H, W]``) and a segmentation model's dict ``{"out", "aux"}`` get
    :func:`segmentation_loss` (pixels labelled ``IGNORE_INDEX`` not counted)."""
    if isinstance(logits, dict) or logits.dim() > 2:
        return segmentation_loss(logits, y)
    return F.cross_entropy(logits, y)


def segmentation_loss(
    logits: dict[str, torch.Tensor] | torch.Tensor,
    y: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    aux_weight: float = 0.5,
) -> torch.Tensor:
    """torchvision's segmentation recipe: per-pixel cross entropy of ``out`` (``[N, C, H, W]``
    against labels ``[N, H, W]``), pixels labelled ``ignore_index`` not counted, plus
    ``aux_weight`` times that of ``aux`` where the model has an auxiliary head."""
    if not isinstance(logits, dict):
        return F.cross_entropy(logits, y, ignore_index=ignore_index)
    loss = F.cross_entropy(logits["out"], y, ignore_index=ignore_index)
    if "aux" in logits:
        loss = loss + aux_weight * F.cross_entropy(logits["aux"], y, ignore_index=ignore_index)
    return loss


def accuracy(logits: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy; per pixel for dense logits (``out`` of a dict), over the pixels whose label
    is a class (not ``ignore_index``)."""
    if isinstance(logits, dict):
        logits = logits["out"]
    hit = logits.argmax(1) == y
    if logits.dim() <= 2:
        return hit.float().mean()
    keep = (y >= 0) & (y < logits.shape[1])
    return (hit & keep).sum() / keep.sum().clamp(min=1)


def make_train_step(
    model,
    optimizer,
    loss_fn: Callable = cross_entropy,
    *,
    ensemble: bool = False,
    grad: str | None = None,
    ensemble_method: str = "auto",
    distributed: bool = False,
    sync_state: bool = False,
    donate: bool = False,
    policy=None,
    remat=None,
):
    """Return ``step(params, state, opt_state, x, y, rng=None) -> (params, state, opt_state, metrics)``.

    ``metrics`` holds detached ``loss`` and ``accuracy`` (per member ``[N]`` for an ensemble). For an
    ensemble, ``x``/``y`` are one batch shared by all members (``[B, ...]``) or one per member
    (``[N, B, ...]``), and ``rng`` is one key (split per member) or ``N`` keys.

    ``donate=True``: the step updates ``params`` and ``opt_state`` in place and returns them (their
    old values are gone; JAX's buffer donation); it saves a fresh allocation of every parameter and
    optimizer buffer per step. The default returns new tensors and leaves the inputs untouched.

    ``distributed=True``: data-parallel on ``torch.distributed`` (see :mod:`vafunc.training.distributed`):
    gradients (and with ``sync_state=True`` the BatchNorm statistics) are averaged over processes
    before the update; metrics are the process's own.

    ``policy``: a :class:`vafunc.core.precision.Policy` for the forward (e.g. ``Policy.bf16()``: float32
    parameters and optimizer state, bfloat16 compute, float32 logits and loss); gradients arrive
    in the parameters' dtype.

    On Linux, an ensemble's stacked gradients are large blocks that glibc maps and faults in afresh
    every step; :func:`vafunc.serving.memory.set_malloc_thresholds` (an explicit, process-wide opt-in)
    lets them be reused (see benchmarks/README.md for the figures).

    ``remat``: ``"blocks"`` or a list of block paths, recomputed in the backward instead of stored
    (``model.apply(..., remat=)``, :mod:`vafunc.core.remat`): less memory for about one more forward;
    every gradient path and ensemble lowering takes it.
    """
    from vafunc.core.precision import check_policy

    policy = check_policy(policy)
    fwd_kw = {} if policy is None else {"policy": policy}
    if remat is not None:
        fwd_kw["remat"] = remat
    if ensemble_method not in ("auto", "batched", "loop", "vmap"):
        raise ValueError(f"ensemble_method must be 'auto', 'batched', 'loop' or 'vmap', got {ensemble_method!r}")
    if ensemble and ensemble_method == "batched":
        from vafunc.research.members import covers

        if not covers(model):
            raise ValueError(f"{model.name} has no members-mode lowering (bare parameters); use ensemble_method='loop'")
    vmapped = ensemble and ensemble_method == "vmap"
    grad = grad or ("func" if vmapped else "autograd")
    if grad not in ("autograd", "func"):
        raise ValueError(f"grad must be 'autograd' or 'func', got {grad!r}")
    if vmapped and grad != "func":
        raise ValueError("a vmapped ensemble train step differentiates with torch.func (grad='func')")

    def objective(params, state, x, y, rng):
        logits, new_state = model.apply(params, state, x, train=True, rng=rng, **fwd_kw)
        loss = loss_fn(logits, y)
        return loss, (new_state, loss.detach(), accuracy(map_outputs(torch.Tensor.detach, logits), y))

    func_grad = torch.func.grad(objective, has_aux=True)

    def members_objective(params, state, x, y, keys):
        """All members in one members-mode forward: the sum of the members' losses, whose
        gradient is, member by member, each member's own."""
        n = ensemble_size(params)
        shared = x.dim() == 4
        xb = x if shared else x.reshape(n * x.shape[1], *x.shape[2:])
        logits, new_state = model.apply(
            params, state, xb, train=True, rng=keys, backend=Members(n, shared_input=shared), **fwd_kw
        )
        logits = map_outputs(lambda t: t.view(n, -1, *t.shape[1:]), logits)
        member = [map_outputs(lambda t, i=i: t[i], logits) for i in range(n)]
        ys = [y] * n if shared else list(y)
        losses = torch.stack([loss_fn(member[i], ys[i]) for i in range(n)])
        acc = torch.stack([accuracy(map_outputs(torch.Tensor.detach, member[i]), ys[i]) for i in range(n)])
        return losses.sum(), (new_state, losses.detach(), acc)

    def grads_autograd(params, state, x, y, rng, fn=objective):
        names = list(vtree.flatten(params))
        leaves = [t.detach().requires_grad_(True) for t in vtree.flatten(params).values()]
        with torch.enable_grad():
            loss, aux = fn(vtree.unflatten(dict(zip(names, leaves))), state, x, y, rng)
            g = torch.autograd.grad(loss, leaves)
        return vtree.unflatten(dict(zip(names, g))), aux

    single_grad = func_grad if grad == "func" else grads_autograd
    members_grad = (
        torch.func.grad(members_objective, has_aux=True)
        if grad == "func"
        else lambda *a: grads_autograd(*a, fn=members_objective)
    )

    def ensemble_grads(params, state, x, y, rng):
        n = ensemble_size(params)
        keys = member_keys(rng, n)
        shared = x.dim() == 4
        if vmapped:
            in_dims = (0, 0, None if shared else 0, None if shared else 0, None if keys is None else 0)
            return torch.vmap(func_grad, in_dims=in_dims)(params, state, x, y, keys)
        if ensemble_method == "batched" or (ensemble_method == "auto" and members_prefer(model, n, x)):
            return members_grad(params, state, x, y, keys)
        member_params, member_state = vtree.unstack(params), vtree.unstack(state) or [state] * n
        results = [
            single_grad(
                member_params[i],
                member_state[i],
                x if shared else x[i],
                y if shared else y[i],
                None if keys is None else keys[i],
            )
            for i in range(n)
        ]
        grads = vtree.stack([g for g, _ in results])
        new_state = vtree.stack([a[0] for _, a in results]) if state else state
        return grads, (new_state, torch.stack([a[1] for _, a in results]), torch.stack([a[2] for _, a in results]))

    def step(params, state, opt_state, x, y, rng=None):
        grads, (new_state, loss, acc) = (ensemble_grads if ensemble else single_grad)(params, state, x, y, rng)
        if distributed:
            from vafunc.training.distributed import all_reduce_mean

            grads = all_reduce_mean(grads)
            if sync_state and new_state:
                new_state = all_reduce_mean(new_state)
        params, opt_state = optimizer.update(grads, opt_state, params, donate=donate)
        new_state = vtree.tree_map(torch.Tensor.detach, new_state)
        return params, new_state, opt_state, {"loss": loss, "accuracy": acc}

    return step


# --------------------------------------------------------------------------- DP-SGD


def _has_batch_norm(state) -> bool:
    return any(k.endswith("running_mean") for k in vtree.flatten(state))


def gaussian_noise(key, params, std: float) -> dict:
    """``N(0, std^2)`` noise shaped like ``params``, drawn from a ``torch.Generator`` seeded by the
    vafunc ``key`` (64 bits of it): the same key gives the same noise (on one torch version and
    device), different keys independent noise. One generator per device draws every leaf in
    tree order."""
    seed = int(vrandom.bits(key, (1,))[0]) << 32 | int(vrandom.bits(vrandom.fold_in(key, 1), (1,))[0])
    gens: dict = {}

    def draw(t):
        g = gens.get(t.device)
        if g is None:
            g = gens[t.device] = torch.Generator(device=t.device).manual_seed(seed)
        return torch.randn(t.shape, generator=g, dtype=t.dtype, device=t.device).mul_(std)

    return vtree.tree_map(draw, params)


def make_dp_train_step(
    model,
    optimizer,
    loss_fn: Callable = cross_entropy,
    *,
    clip_norm: float,
    noise_multiplier: float,
    train: bool = True,
    chunk_size: int | None = None,
):
    """DP-SGD (Abadi et al. 2016, Algorithm 1): ``step(params, state, opt_state, x, y, rng) ->
    (params, state, opt_state, metrics)``.

    Each step:

    1. the per-sample gradient norms ``n_i`` of ``loss_fn(logits[i:i+1], y[i:i+1])``
       (:func:`vafunc.per_sample_grad_norms`: ghost norms, no per-sample gradient is stored);
    2. one backward of ``sum_i c_i loss_i`` with the clip factors ``c_i = min(1, clip_norm / (n_i +
       1e-6))`` (Opacus' rule), which is the sum of the clipped per-sample gradients;
    3. Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` added to that sum
       (:func:`gaussian_noise`, from ``fold_in(rng, 1)``), then the division by the batch size
       ``B`` and the optimizer's update.

    ``rng`` is required: pass a fresh key every step (``vafunc.random.fold_in(key, step)``), or the
    noise repeats. ``fold_in(rng, 0)`` keys the model's dropout / stochastic depth, the same in
    both passes. ``train=True`` runs the model in train mode, which BatchNorm would make couple
    the samples: such models are refused (use a GroupNorm model, ``resnet50_gn`` or ``norm="group"``,
    or ``train=False``, BatchNorm in eval mode with its running statistics). ``chunk_size`` bounds
    the memory of the norm pass (eval mode or a model without random layers: a chunk draws other
    dropout masks than the full batch).

    ``metrics``: ``loss`` (mean of the per-sample losses), ``accuracy``, ``grad_norm`` (mean
    per-sample norm before clipping), ``clipped`` (fraction of samples clipped).

    Privacy accounting is not part of vafunc. The step's parameters are what an accountant needs:
    with Poisson sampling at rate ``q = B / dataset size`` over ``T`` steps, e.g. Opacus'
    ``opacus.accountants.RDPAccountant`` (``history=[(noise_multiplier, q, T)]``, then
    ``get_epsilon(delta)``) or ``dp_accounting``'s ``PoissonSampledDpEvent(q,
    GaussianDpEvent(noise_multiplier))`` composed ``T`` times.
    """
    from vafunc.research.persample import _per_sample_losses, per_sample_grad_norms

    if not isinstance(clip_norm, (int, float)) or not clip_norm > 0:
        raise ValueError(f"clip_norm must be a positive number (math.inf: no clipping), got {clip_norm!r}")
    if not isinstance(noise_multiplier, (int, float)) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a non-negative number, got {noise_multiplier!r}")
    if chunk_size is not None and train:
        raise ValueError("chunk_size needs train=False: chunks of a train-mode batch draw other dropout masks")
    clip_norm, noise_multiplier = float(clip_norm), float(noise_multiplier)

    def step(params, state, opt_state, x, y, rng=None):
        if not vrandom.is_key(rng) or rng.dim() != 1:
            raise TypeError(f"the DP step needs a fresh vafunc.core.random key per step (its noise), got {rng!r}")
        if train and _has_batch_norm(state):
            raise ValueError(
                f"{model.name}: DP-SGD needs per-sample gradients, and train-mode BatchNorm mixes the samples "
                "of a batch; use a GroupNorm model (resnet50_gn, or norm='group') or train=False (BatchNorm "
                "in eval mode)"
            )
        k_model, k_noise = vrandom.fold_in(rng, 0), vrandom.fold_in(rng, 1)
        b = x.shape[0]
        norms = per_sample_grad_norms(
            model, params, state, x, y, loss_fn, chunk_size=chunk_size, train=train, rng=k_model
        )
        factors = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        names = list(vtree.flatten(params))
        leaves = [t.detach().requires_grad_(True) for t in vtree.flatten(params).values()]
        with torch.enable_grad():
            logits, new_state = model.apply(
                vtree.unflatten(dict(zip(names, leaves))), state, x, train=train, rng=k_model
            )
            losses = _per_sample_losses(loss_fn, logits, y)
            g = torch.autograd.grad((losses * factors).sum(), leaves)
        grads = vtree.unflatten(dict(zip(names, g)))
        if noise_multiplier:
            noise = gaussian_noise(k_noise, grads, noise_multiplier * clip_norm)
            grads = vtree.tree_map(torch.add, grads, noise)
        grads = vtree.tree_map(lambda t: t.div_(b), grads)
        params, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {
            "loss": losses.detach().mean(),
            "accuracy": accuracy(map_outputs(torch.Tensor.detach, logits), y),
            "grad_norm": norms.mean(),
            "clipped": (norms > clip_norm).float().mean(),
        }
        return params, vtree.tree_map(torch.Tensor.detach, new_state), opt_state, metrics

    return step
