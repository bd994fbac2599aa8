"""Pieces of token (ViT-style) networks shared by families: timm's position-embedding resampling,
2-D rotary position embedding, and dense intermediates (timm's ``forward_intermediates``, of
plain ViTs and of hierarchical networks such as Swin and MaxViT) read off the kit's feature taps.
Not a family (the leading underscore keeps ``vafunc.models`` from
importing it as one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "resample_position_embedding",
    "timm_position_embedding",
    "rope_embedding",
    "rope_apply",
    "take_indices",
    "intermediates_of",
    "stage_intermediates",
]

_LOW = (torch.float16, torch.bfloat16)


def resample_position_embedding(
    pos: torch.Tensor,
    grid: tuple[int, ...],
    stored: tuple[int, int],
    prefix: int = 1,
    *,
    align_corners: bool = True,
    antialias: bool = False,
) -> torch.Tensor:
    """A learned ``[B, prefix + sh * sw, D]`` position embedding stored for the ``stored = (sh, sw)``
    patch grid, for a ``grid = (gh, gw)`` grid: unchanged when the grids agree, else the patch part
    resampled bicubically (torchvision: ``align_corners=True``; timm's ``resample_abs_pos_embed``:
    ``align_corners=False, antialias=True``), the ``prefix`` tokens' part (class, register,
    distillation tokens; 0: none) kept in front."""
    grid = tuple(grid)
    if grid == tuple(stored):
        return pos
    head, img = pos[:, :prefix], pos[:, prefix:]
    img = einops.rearrange(img, "b (h w) d -> b d h w", h=stored[0], w=stored[1])
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=align_corners, antialias=antialias)
    img = einops.rearrange(img, "b d h w -> b (h w) d")
    return torch.cat([head, img], 1) if prefix else img


def timm_position_embedding(pos: Tensor, grid: Tensor, stored: int, prefix: int) -> Tensor:
    """timm's ``resample_abs_pos_embed`` for a ``dynamic_img_size`` model: the ``[B, prefix +
    stored^2, D]`` embedding for the patch grid of ``grid`` (the NHWC patch embedding), resampled
    bicubically with antialiasing (``align_corners=False``) in at least float32 when the grid
    differs, the ``prefix`` tokens' entries kept."""
    size = tuple(grid.shape[1:3])
    if size == (stored, stored):
        return pos
    dtype = pos.dtype
    out = resample_position_embedding(
        pos.float() if dtype in _LOW else pos, size, (stored, stored), prefix, align_corners=False, antialias=True
    )
    return out.to(dtype)


def rope_embedding(grid: Tensor, head_dim: int, ref: int | None, temperature: float = 10000.0) -> tuple[Tensor, Tensor]:
    """EVA-02's 2-D rotary position embedding (Su et al. 2021, RoFormer, Eq. 13, applied per axis;
    timm's ``RotaryEmbeddingCat`` with ``in_pixels=False``) for the patch grid of ``grid`` (NHWC):
    ``(sin, cos)``, each ``[gh * gw, head_dim]``. A quarter of the head width are frequencies
    ``temperature ** (-j / (head_dim / 4))``; each is applied to the row and to the column index
    (rescaled to a ``ref x ref`` grid when ``ref`` is given, EVA's rule for other sizes), and each
    angle covers two adjacent channels (the interleaved layout). Computed in float32 (float64 for a
    float64 input), as timm does, without parameters."""
    gh, gw = grid.shape[1], grid.shape[2]
    dtype = torch.float64 if grid.dtype == torch.float64 else torch.float32
    nb = head_dim // 4
    bands = 1.0 / (temperature ** (torch.arange(nb, device=grid.device).to(dtype) / nb))
    axes = [torch.arange(s, device=grid.device).to(dtype) for s in (gh, gw)]
    if ref is not None:
        axes = [t / s * ref for t, s in zip(axes, (gh, gw))]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).unsqueeze(-1) * bands  # [gh, gw, 2, nb]
    return _sincos(pos)


@torch.library.custom_op("vafunc::rope_sincos", mutates_args=())
def _sincos(pos: Tensor) -> tuple[Tensor, Tensor]:
    """The tables ``sin(pos)``, ``cos(pos)`` for angles ``pos [gh, gw, 2, nb]``, each ``[gh * gw,
    4 * nb]`` with every angle twice (adjacent channels), as one opaque operator: inductor inlines
    an index-only pointwise computation (no tensor read) into each of its readers, so the tables'
    transcendental functions and index arithmetic ran again inside every block's fused kernel
    (EVA-02 small's bf16 compiled forward: 0.975x timm's, whose tables are folded constants)."""
    return tuple(f(pos).flatten(-2).flatten(0, -2).repeat_interleave(2, -1) for f in (torch.sin, torch.cos))


@_sincos.register_fake
def _(pos):
    out = pos.new_empty(pos.shape[0] * pos.shape[1], 2 * pos.shape[2] * pos.shape[3])
    return out, torch.empty_like(out)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate each adjacent channel pair of ``x [..., L, head_dim]`` by its angle:
    ``x * cos + rot(x) * sin`` with ``rot([x0, x1, ...]) = [-x1, x0, ...]``, in ``x``'s dtype."""
    rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return (x * cos + rot * sin).to(x.dtype)


def take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: ``None`` every block, an int ``n`` the last ``n`` blocks, a
    sequence those blocks (negative counted from the end); sorted and each once, as timm's
    forward yields them (in block order)."""
    if indices is None:
        indices = depth
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(indices, str):
        raise TypeError(f"indices must be an int, a sequence of ints or None, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices}: the last-n count must be in 1..{depth}")
        return list(range(depth - indices, depth))
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"indices must hold ints, got {i!r}")
        j = depth + i if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"block index {i} is out of range for {depth} blocks ({-depth}..{depth - 1})")
        out.append(j)
    if not out:
        raise ValueError("indices is empty: name at least one block")
    return sorted(set(out))


def _check_options(output_fmt: str, norm: bool, return_prefix_tokens: bool) -> None:
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    for f, v in (("norm", norm), ("return_prefix_tokens", return_prefix_tokens)):
        if not isinstance(v, bool):
            raise TypeError(f"{f} must be a bool, got {v!r}")


def _final_norm(params: dict, norm_layer: tuple[str, float], y: Tensor) -> Tensor:
    """The LayerNorm ``norm_layer = (dotted module path, eps)`` over the last axis of ``y``, its
    tensors cast to ``y``'s dtype (a precision policy's compute dtype)."""
    p = params
    for part in norm_layer[0].split("."):
        p = p[part]
    return F.layer_norm(y, y.shape[-1:], p["weight"].to(y.dtype), p["bias"].to(y.dtype), norm_layer[1])


def intermediates_of(
    model: Any,
    params: dict,
    state: dict,
    x: Tensor,
    indices: int | Sequence[int] | None = None,
    *,
    depth: int,
    patch: int,
    prefix: int,
    norm_layer: tuple[str, float] | None,
    names: str = "blocks.{}",
    norm: bool = False,
    output_fmt: str = "NCHW",
    return_prefix_tokens: bool = False,
    **kw: Any,
) -> list:
    """timm's ``forward_intermediates(x, indices, norm=, output_fmt=, return_prefix_tokens=,
    intermediates_only=True)`` for a token network, read off the kit's feature taps (the forward
    stops after the last requested block): the outputs of the blocks ``names.format(i)`` for
    ``take_indices(depth, indices)``, in block order, each normalised by the final LayerNorm
    ``norm_layer = (name, eps)`` with ``norm=True`` (None: the network has none there), the
    ``prefix`` tokens split off, the patch tokens as ``[N, D, H/patch, W/patch]`` (``"NCHW"``) or
    ``[N, HW/patch^2, D]`` (``"NLC"``); with ``return_prefix_tokens`` (and prefix tokens) each item is
    ``(patch tokens, prefix tokens [N, prefix, D])``. ``kw``: ``policy=``, ``attention=``."""
    _check_options(output_fmt, norm, return_prefix_tokens)
    take = take_indices(depth, indices)
    feats, _ = model.features(params, state, x, [names.format(i) for i in take], **kw)
    gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
    out = []
    for i in take:
        y = feats[names.format(i)]
        if norm and norm_layer is not None:
            y = _final_norm(params, norm_layer, y)
        head, y = y[:, :prefix], y[:, prefix:]
        if output_fmt == "NCHW":
            y = y.reshape(y.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous()
        out.append((y, head) if return_prefix_tokens and prefix else y)
    return out


def stage_intermediates(
    model: Any,
    params: dict,
    state: dict,
    x: Tensor,
    indices: int | Sequence[int] | None = None,
    *,
    names: Sequence[str],
    channels_last: bool,
    norm_layer: tuple[str, float] | None,
    norm: bool = False,
    output_fmt: str = "NCHW",
    return_prefix_tokens: bool = False,
    **kw: Any,
) -> list:
    """timm's ``forward_intermediates(x, indices, norm=, intermediates_only=True)`` for a
    hierarchical network (Swin, MaxViT), read off the kit's feature taps as
    :func:`intermediates_of` (the forward stops after the last requested one): feature ``i`` is the
    tap ``names[i]`` (timm's feature indices: MaxViT's stem and stages, Swin's stages), for
    ``take_indices(len(names), indices)``, in order. The taps are ``[N, H, W, C]`` maps
    (``channels_last``, Swin) or ``[N, C, H, W]``; each comes back as ``[N, C, H, W]`` (``"NCHW"``,
    the only layout timm offers here) or ``[N, H * W, C]`` (``"NLC"``, row-major tokens). With
    ``norm=True`` the final LayerNorm ``norm_layer`` is applied to the last feature only (it is
    sized for the last stage; None: the network's norm sits in its head, timm's ``nn.Identity``).
    These networks have no prefix tokens, so ``return_prefix_tokens`` changes nothing, as on a
    ViT without them. ``kw``: ``policy=``, ``attention=``."""
    _check_options(output_fmt, norm, return_prefix_tokens)
    take = take_indices(len(names), indices)
    feats, _ = model.features(params, state, x, [names[i] for i in take], **kw)
    out = []
    for i in take:
        y = feats[names[i]]
        last_norm = norm and norm_layer is not None and i == len(names) - 1
        if not channels_last and (last_norm or output_fmt == "NLC"):
            y = y.permute(0, 2, 3, 1)
        if last_norm:
            y = _final_norm(params, norm_layer, y)
        if output_fmt == "NLC":
            y = y.flatten(1, 2)
        if output_fmt == "NCHW" and (channels_last or last_norm):
            y = y.permute(0, 3, 1, 2)
        out.append(y.contiguous())
    return out
