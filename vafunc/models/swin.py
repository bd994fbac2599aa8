"""Swin Transformer (v1) and Swin Transformer V2, T/S/B, in torchvision's layout.

Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(arXiv:2103.14030). A 4x4 patch embedding (a 4x4/4 conv and a LayerNorm), then four stages of
transformer blocks at strides 4, 8, 16 and 32, joined by *patch merging* (each 2x2 group of
tokens concatenated to 4C channels, LayerNorm, linear to 2C). Self-attention is computed inside
non-overlapping M x M windows (W-MSA, Sec. 3.2) with a learned relative position bias
``B`` indexed by the offset between two tokens (Eq. 4: ``softmax(Q K^T / sqrt(d) + B) V``);
every second block shifts the windows by ``M // 2`` (SW-MSA), computed as a cyclic shift of the
map plus an attention mask that keeps tokens from different regions apart ("efficient batch
computation for shifted configuration", Fig. 4). Blocks are pre-norm:
``x + attn(LN(x))``, ``x + MLP(LN(x))``. Table 7 / Sec. 3.3 give the variants (window M = 7,
head dimension 32, MLP ratio 4):

=======  ====  ================  ==================
Swin-T   96    (2, 2, 6, 2)      (3, 6, 12, 24)
Swin-S   96    (2, 2, 18, 2)     (3, 6, 12, 24)
Swin-B   128   (2, 2, 18, 2)     (4, 8, 16, 32)
=======  ====  ================  ==================

Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution" (arXiv:2111.09883),
Sec. 3, changes three things, all in the block: *res-post-norm* (``x + LN(attn(x))``,
``x + LN(MLP(x))``); *scaled cosine attention* (Eq. 2: ``cos(q, k) / tau + B``, with a learned
per-head ``logit_scale = log(1 / tau)``, clamped at ``log(100)``); and a *log-spaced continuous
position bias* (Sec. 3.3, Eq. 3-4): a small MLP (``cpb_mlp``: 2 -> 512 -> heads) maps the
log-spaced relative coordinates ``sign(d) log2(1 + |d|) / 3`` (``d`` scaled to [-8, 8]) to the
bias, squashed to ``16 * sigmoid(.)`` as in the authors' code. Patch merging normalises after
the reduction (``PatchMergingV2``) and the k projection has no bias. torchvision's V2 variants
have the v1 widths and depths with M = 8 (for its 256x256 weights).

torchvision pads every map that is not a multiple of the window (bottom/right, zeros) before
attention and crops after it, and pads odd maps before patch merging, so any input of at least
4x4 runs; the shift is switched off on an axis whose padded length is a single window. vafunc
does the same, so its outputs equal torchvision's at every size.

State-dict names are torchvision's: ``features.0.{0: conv, 2: LayerNorm}`` (stem; ``.1`` is the
permute to channels-last), ``features.{1,3,5,7}.{j}`` blocks (``norm1``, ``attn.{qkv, proj}``,
``attn.relative_position_bias_table`` + buffer ``attn.relative_position_index`` in v1;
``attn.logit_scale``, buffers ``attn.relative_coords_table`` and ``attn.relative_position_index``,
``attn.cpb_mlp.{0, 2}`` in v2; ``norm2``, ``mlp.{0, 3}``), ``features.{2,4,6}.{reduction, norm}``
(patch merging), ``norm`` and ``head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register
from vafunc.models._tokens import stage_intermediates

PAPER = "Liu et al. 2021, Swin Transformer: Hierarchical Vision Transformer using Shifted Windows, arXiv:2103.14030"
PAPER_V2 = "Liu et al. 2022, Swin Transformer V2: Scaling Up Capacity and Resolution, arXiv:2111.09883"

#: Table 7 of the v1 paper: (embed_dim, depths, num_heads) per variant
VARIANTS = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}

#: torchvision's builders' stochastic depth rates (the papers' ImageNet-1K recipes)
STOCHASTIC_DEPTH = {"t": 0.2, "s": 0.3, "b": 0.5}


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in t):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return t


@dataclass(frozen=True)
class SwinConfig:
    """torchvision ``SwinTransformer`` keywords (``norm_layer``, ``block`` and
    ``downsample_layer`` aside), plus ``version``: 1 (``SwinTransformerBlock``, ``PatchMerging``)
    or 2 (``SwinTransformerBlockV2``, ``PatchMergingV2``: what torchvision's ``swin_v2_*``
    builders pass as ``block`` / ``downsample_layer``).

    ``dropout``: after the attention projection and after each MLP linear; ``attention_dropout``:
    on the attention probabilities; ``stochastic_depth_prob``: the rate of the last block, block
    ``b`` of ``B`` drops its residual branches with ``stochastic_depth_prob * b / (B - 1)``
    (all three: train mode only, need ``rng``).
    """

    patch_size: tuple = (4, 4)
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: tuple = (7, 7)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth_prob: float = 0.1
    num_classes: int = 1000
    version: int = 1
    in_channels: int = 3

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("patch_size", _pair(self.patch_size, "patch_size"))
        set_("window_size", _pair(self.window_size, "window_size"))
        for what in ("depths", "num_heads"):
            try:
                v = tuple(getattr(self, what))
            except TypeError:
                raise TypeError(f"{what} must be a sequence of positive ints, got {getattr(self, what)!r}") from None
            if not v or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in v):
                raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {v!r}")
            set_(what, v)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have the same length")
        check_config(
            self,
            positive_ints=("num_classes", "in_channels", "embed_dim"),
            rates=("dropout", "attention_dropout", "stochastic_depth_prob"),
        )
        for i, h in enumerate(self.num_heads):
            if (self.embed_dim << i) % h:
                raise ValueError(f"stage {i} has {self.embed_dim << i} channels, not divisible by num_heads[{i}]={h}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.version not in (1, 2) or isinstance(self.version, bool):
            raise ValueError(f"version must be 1 or 2, got {self.version!r}")
        if self.version == 2 and min(self.window_size) < 2:
            raise ValueError(
                f"Swin V2 needs windows of at least 2x2 (its coordinates are divided by M - 1), got {self.window_size}"
            )
        for f in ("mlp_ratio", "dropout", "attention_dropout", "stochastic_depth_prob"):
            set_(f, float(getattr(self, f)))


class BlockSpec(NamedTuple):
    heads: int
    window: tuple[int, int]
    shift: tuple[int, int]  # nominal: (0, 0) or M // 2; switched off per axis on one-window maps
    hidden: int  # MLP width
    drop_path: float
    dim: int  # channels of the stage


def plan(cfg: SwinConfig) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per stage, its blocks: stage ``i`` has ``embed_dim * 2**i`` channels; odd blocks shift
    by ``M // 2``; block ``b`` (counted over all stages) has stochastic depth
    ``stochastic_depth_prob * b / (B - 1)`` (torchvision's schedule)."""
    total = sum(cfg.depths)
    last = max(total - 1.0, 1.0)  # one block in all: rate 0 (torchvision divides by zero)
    shifted = tuple(w // 2 for w in cfg.window_size)
    out, b = [], 0
    for i, (n, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
        hidden = int((cfg.embed_dim << i) * cfg.mlp_ratio)
        out.append(
            tuple(
                BlockSpec(
                    heads,
                    cfg.window_size,
                    shifted if j % 2 else (0, 0),
                    hidden,
                    cfg.stochastic_depth_prob * (b + j) / last,
                    cfg.embed_dim << i,
                )
                for j in range(n)
            )
        )
        b += n
    return tuple(out)


# --------------------------------------------------------------------------- windows


def _windows(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(pad_bottom, pad_right, shift_h, shift_w)`` for an ``h x w`` map: padded up to whole
    windows; no shift along an axis that is a single window once padded (torchvision's rule)."""
    (wh, ww), (sh, sw) = window, shift
    pb, pr = -h % wh, -w % ww
    return pb, pr, (sh if h + pb > wh else 0), (sw if w + pr > ww else 0)


def shift_mask(
    hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The shifted-window attention mask ``[nW, M*M, M*M]`` of a padded ``hp x wp`` map: 0
    between tokens of the same region of the cyclically shifted map, -100 between regions
    (torchvision's value; a bias added to the logits). Along an axis with shift ``s > 0`` the
    regions are ``[0, L - M)``, ``[L - M, L - s)``, ``[L - s, L)``; with no shift, one region."""
    (wh, ww), (sh, sw) = window, shift

    def regions(n: int, m: int, s: int) -> Tensor:
        p = torch.arange(n, device=device)
        return (p >= n - m).long() + (p >= n - s).long() if s else torch.zeros(n, dtype=torch.long, device=device)

    r = regions(hp, wh, sh)[:, None] * 3 + regions(wp, ww, sw)[None, :]
    r = einops.rearrange(r, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=wh, ww=ww)
    return (r[:, None, :] != r[:, :, None]).to(dtype) * -100.0


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """``[(M*M) * (M*M)]`` int64: for tokens ``i, j`` of a window, the row of the bias table
    of their offset ``(dh, dw) = pos_i - pos_j``: ``(dh + wh - 1) * (2 ww - 1) + dw + ww - 1``
    (torchvision's buffer)."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = einops.rearrange(coords, "c h w -> (h w) c")
    rel = einops.rearrange(flat, "n c -> n 1 c") - einops.rearrange(flat, "m c -> 1 m c")
    index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1
    return einops.rearrange(index, "n m -> (n m)")


def relative_coords_table(wh: int, ww: int) -> torch.Tensor:
    """Swin V2's log-spaced relative coordinates ``[1, 2wh-1, 2ww-1, 2]`` (float32): every
    offset scaled to [-8, 8], then ``sign(d) * log2(1 + |d|) / 3`` (Sec. 3.3, Eq. 4; torchvision's
    buffer, same float32 operations)."""
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    t = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), -1)
    t = t / torch.tensor([wh - 1, ww - 1], dtype=torch.float32) * 8
    t = torch.sign(t) * torch.log2(torch.abs(t) + 1.0) / 3.0
    return einops.rearrange(t, "a b c -> 1 a b c")


def _gather_bias(table: Tensor, index: Tensor, n: int) -> torch.Tensor:
    """A per-offset table ``[T, heads]`` (or ``[1, a, b, heads]``) -> the bias ``[heads, n, n]``."""
    t = einops.rearrange(table, "... h -> (...) h").index_select(0, index)  # (much faster than table[index])
    # contiguous, as the references keep it: attention reads the bias along rows, and under
    # torch.compile a heads-innermost frozen constant turns the fused softmax into gathers
    # (compiled swin_t bf16 spent twice torchvision's time in its softmax kernels)
    return einops.rearrange(t, "(n m) h -> h n m", n=n).contiguous()


def _cpb_bias(m: Scope, coords: Tensor, index: Tensor, heads: int, n: int, dtype: torch.dtype) -> Tensor:
    """Swin V2's continuous position bias: ``16 * sigmoid(cpb_mlp(coords))`` gathered to
    ``[heads, n, n]``; ``cpb_mlp`` = Linear(2, 512), ReLU, Linear(512, heads, no bias)."""
    t = m.block("cpb_mlp", cpb_mlp, coords.to(dtype), heads, tap=False)
    return 16 * torch.sigmoid(_gather_bias(t, index, n))


def cpb_mlp(m: Scope, coords: Tensor, heads: int) -> Tensor:
    """``cpb_mlp``: ``0`` Linear(2, 512), ``1`` ReLU, ``2`` Linear(512, heads, no bias)."""
    return m.linear("2", m.op("1", L.relu_, m.linear("0", coords, 512), tap=False), heads, bias=False)


def _pad_with(t: Tensor, value: Tensor, pb: int, pr: int) -> Tensor:
    """``t [B, H, W, D]`` padded at the bottom / right with the vector ``value [D]``."""
    b, h, w, d = t.shape
    out = value.expand(b, h + pb, w + pr, d).contiguous()  # (torch.cat of expanded tensors is slow)
    out[:, :h, :w] = t
    return out


def window_attention(m: Scope, x: Tensor, spec: BlockSpec, cfg: SwinConfig, mask: Tensor | None = None) -> Tensor:
    """(Shifted) window multi-head self-attention, torchvision's ``shifted_window_attention``:
    ``[B, H, W, C] -> same``: pad to whole windows (zeros), cyclic shift (``torch.roll``),
    partition, attention with the relative position bias (plus ``mask``, the stage's shift
    mask, on shifted blocks) as ``bias`` of ``m.attention``, projection, and back.

    Where the map is padded, the padded tokens are zeros, so their q/k/v are exactly the qkv
    bias: the qkv projection runs on the real tokens only and its output is padded with the bias
    vector, and the output projection runs after the crop (same values; at small inputs, where
    a 1x1 map becomes a 7x7 window, this is most of the work). ``mask``: the stage's shift mask,
    made here when not given (a block called on its own). Keys: slot 2 of the scope's key for
    attention dropout, slot 3 for the dropout after the projection. ``qkv`` is an ``nn.Linear``
    of the reference whose tensors its forward reads; the declaration does the same."""
    b, h, w, c = x.shape
    (wh, ww), heads, n = spec.window, spec.heads, spec.window[0] * spec.window[1]
    pb, pr, sh, sw = _windows(h, w, spec.window, spec.shift)
    shifted, padded = bool(sh or sw), bool(pb or pr)
    hp, wp = h + pb, w + pr
    if cfg.version == 1:
        table = m.param("relative_position_bias_table", ((2 * wh - 1) * (2 * ww - 1), heads), ("trunc_normal", 0.02))
    else:
        logit_scale = m.param("logit_scale", (heads, 1, 1), ("full", math.log(10.0)))
        coords = m.buffer("relative_coords_table", lambda: relative_coords_table(wh, ww))
    index = m.buffer("relative_position_index", lambda: relative_position_index(wh, ww))
    p = m.child("qkv", module=("Linear", (("in_features", c), ("out_features", 3 * c))))
    weight = p.param("weight", (3 * c, c), ("trunc_normal", 0.02))
    qb = p.param("bias", (3 * c,), ("zeros",))
    if cfg.version == 2:  # no k bias (torchvision zeroes that third of qkv.bias at every call)
        qb = torch.cat((qb[:c], torch.zeros_like(qb[c : 2 * c]), qb[2 * c :]))
    split = "b (nh wh) (nw ww) (three h d) -> three (b nh nw) h (wh ww) d"
    if padded:  # project the real tokens, pad with the padded tokens' projection (the bias)
        qkv = _pad_with(F.linear(x, weight, qb), qb, pb, pr)
        if shifted:
            qkv = torch.roll(qkv, (-sh, -sw), (1, 2))
        q, k, v = einops.rearrange(qkv, split, three=3, h=heads, wh=wh, ww=ww)
    else:  # partition the C-channel map (a third of the bytes), then project
        if shifted:
            x = torch.roll(x, (-sh, -sw), (1, 2))
        x = einops.rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=wh, ww=ww)
        q, k, v = einops.rearrange(F.linear(x, weight, qb), "b n (three h d) -> three b h n d", three=3, h=heads)
    if cfg.version == 1:
        bias = _gather_bias(table, index, n)
    else:  # cpb_mlp is registered after proj (its tensors come last): declared there at init
        bias = x.new_empty((heads, n, n)) if m.initializing else _cpb_bias(m, coords, index, heads, n, x.dtype)
    scale = None
    if cfg.version == 2:  # scaled cosine attention: the per-head 1/tau goes into q, SDPA's scale is 1
        q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        k, scale = F.normalize(k, dim=-1), 1.0
    if mask is None and shifted and not m.initializing:
        mask = shift_mask(hp, wp, spec.window, (sh, sw), dtype=x.dtype, device=x.device)
    if mask is not None and shifted:  # [nW, n, n] + [heads, n, n] -> [(b nW), heads, n, n], one pass
        nw = mask.shape[0]
        bias = (bias + mask.view(1, nw, 1, n, n).expand(b, nw, 1, n, n)).flatten(0, 1)
    else:
        bias = bias.unsqueeze(0)
    y = m.attention(
        q, k, v, bias=bias, scale=scale, rate=cfg.attention_dropout, rng=m.key(2) if cfg.attention_dropout else None
    )
    # merge the heads and reverse the partition in one copy (b inferred: nh and nw are never 0, an
    # empty batch is)
    y = einops.rearrange(y, "(b nh nw) h (wh ww) d -> b (nh wh) (nw ww) (h d)", nh=hp // wh, nw=wp // ww, wh=wh, ww=ww)
    if shifted:
        y = torch.roll(y, (sh, sw), (1, 2))
    if padded:  # contiguous: a strided input's product rounds by its address (not reproducible)
        y = y[:, :h, :w].contiguous()
    y = m.linear("proj", y, c)
    if cfg.version == 2 and m.initializing:
        _cpb_bias(m, coords, index, heads, n, x.dtype)
    return m.dropout(y, cfg.dropout, m.key(3) if cfg.dropout else None)


def mlp(m: Scope, x: Tensor, hidden: int, rate: float, width: int) -> Tensor:
    """torchvision's ``MLP``: ``0`` Linear, ``1`` GELU, ``2`` Dropout (key slot 4), ``3``
    Linear, ``4`` Dropout (slot 5)."""
    y = m.op("1", F.gelu, m.linear("0", x, hidden), tap=False)
    y = m.linear("3", m.dropout(y, rate, m.key(4) if rate else None, name="2"), width)
    return m.dropout(y, rate, m.key(5) if rate else None, name="4")


def _post_norm(m: Scope, name: str, x: Tensor, branch: Callable[..., Tensor], *args: Any) -> Tensor:
    """V2's ``norm(branch(x, *args))``. The reference registers the norm before the branch, so
    at init it is declared first (on ``x``: the branch keeps the shape)."""
    if m.initializing:
        m.layer_norm(name, x)
        return branch(x, *args)
    return m.layer_norm(name, branch(x, *args))


def swin_block(m: Scope, x: Tensor, spec: BlockSpec, cfg: SwinConfig, mask: Tensor | None) -> Tensor:
    """``SwinTransformerBlock`` (v1, pre-norm) or ``SwinTransformerBlockV2`` (res-post-norm):
    ``[B, H, W, C] -> same``. Key slots (of the block's key): 0 and 1 stochastic depth of the
    attention and MLP branches, 2 and 3 attention dropout and projection dropout, 4 and 5 the
    MLP's dropouts."""
    rng = m.rng
    sd = spec.drop_path
    attn = lambda t: m.block("attn", window_attention, t, spec, cfg, mask, tap=False, rng=rng)  # noqa: E731
    feed = lambda t: m.block("mlp", mlp, t, spec.hidden, cfg.dropout, spec.dim, tap=False, rng=rng)  # noqa: E731
    if cfg.version == 1:
        y = attn(m.layer_norm("norm1", x))  # the norm before the attention: init order is call order
    else:
        y = _post_norm(m, "norm1", x, attn)
    x = m.drop_path(y, sd, m.key(0) if sd else None).add_(x)
    y = feed(m.layer_norm("norm2", x)) if cfg.version == 1 else _post_norm(m, "norm2", x, feed)
    return m.drop_path(y, sd, m.key(1) if sd else None).add_(x)


def stage(m: Scope, x: Tensor, specs: tuple[BlockSpec, ...], cfg: SwinConfig, index: int) -> Tensor:
    """The blocks of one stage; the shift mask is built once for the stage (every shifted block
    of it sees the same map size). Block ``j`` gets the key ``fold_in(rng, index + j)``."""
    mask = None
    shifted = next((s for s in specs if s.shift != (0, 0)), None)
    if shifted is not None:
        _, h, w, _ = x.shape
        pb, pr, sh, sw = _windows(h, w, shifted.window, shifted.shift)
        if sh or sw:
            mask = shift_mask(h + pb, w + pr, shifted.window, (sh, sw), dtype=x.dtype, device=x.device)
    for j, spec in enumerate(specs):
        x = m.block(str(j), swin_block, x, spec, cfg, mask if spec.shift != (0, 0) else None, rng=m.key(index + j))
    return x


def patch_merging(m: Scope, x: Tensor, version: int) -> Tensor:
    """``PatchMerging`` (v1: LayerNorm(4C), then ``reduction``) or ``PatchMergingV2``
    (``reduction``, then LayerNorm(2C)): ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]``; odd
    maps are padded; the 4C channels are the 2x2 group in torchvision's order (top-left,
    bottom-left, top-right, bottom-right)."""
    _, h, w, c = x.shape
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = einops.rearrange(x, "b (h i) (w j) c -> b h w (j i c)", i=2, j=2)
    if version == 2:
        return m.layer_norm("norm", m.linear("reduction", x, 2 * c, bias=False))
    if m.initializing:  # the reference registers reduction before norm
        y = m.linear("reduction", x, 2 * c, bias=False)
        m.layer_norm("norm", x)
        return y
    return m.linear("reduction", m.layer_norm("norm", x), 2 * c, bias=False)


def stem(m: Scope, x: Tensor, cfg: SwinConfig) -> Tensor:
    """Patch embedding: ``0`` conv (patch x patch / patch, with bias), ``1`` permute to
    channels-last, ``2`` LayerNorm. ``[B, 3, H, W] -> [B, H/4, W/4, C]``."""
    p = cfg.patch_size
    y = m.op("1", channels_last, m.conv("0", x, cfg.embed_dim, p, stride=p, padding=0, bias=True), tap=False)
    return m.layer_norm("2", y)


def channels_last(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H, W, C]`` (torchvision's ``Permute([0, 2, 3, 1])``)."""
    return einops.rearrange(x, "b c h w -> b h w c")


def features(m: Scope, x: Tensor, cfg: SwinConfig) -> Tensor:
    """torchvision's ``features``: the patch embedding ``0``, then each stage ``2i+1`` and the
    patch merging ``2i+2`` after it (but the last)."""
    y = m.block("0", stem, x, cfg)
    b, stages = 0, plan(cfg)
    for i, specs in enumerate(stages):
        y = m.block(str(2 * i + 1), stage, y, specs, cfg, b, rng=m.rng)
        b += len(specs)
        if i + 1 < len(stages):
            y = m.block(str(2 * i + 2), patch_merging, y, cfg.version)
    return y


def forward(m: Scope, cfg: SwinConfig, x: Tensor) -> Tensor:
    """``x [B, C, H, W] -> logits [B, num_classes]``.

    Feature names (torchvision's module paths), all channels-last ``[B, H, W, C]``:
    ``features.0`` (patch embedding, stride 4), every block ``features.{2i+1}.{j}``, every stage
    ``features.{2i+1}`` (strides 4, 8, 16, 32), every patch merging ``features.{2i+2}`` and
    ``norm`` (the final LayerNorm). Keys: block ``b`` (counted over all stages) uses
    ``fold_in(rng, b)``, with the slots of :func:`swin_block`.
    """
    y = m.block("features", features, x, cfg, tap=False, rng=m.rng)
    y = m.tap("norm", m.layer_norm("norm", y))
    y = F.adaptive_avg_pool2d(einops.rearrange(y, "b h w c -> b c h w"), 1).flatten(1)
    return m.linear("head", y, cfg.num_classes)


#: torchvision's init: every Linear (cpb_mlp and the MLPs included) trunc_normal(std=0.02) with
#: zero biases; the patch-embedding conv keeps torch's default; bias tables trunc_normal(0.02).
_DEFAULTS = {"conv": "kaiming_fan_in_uniform", "linear": ("trunc_normal", 0.02)}


def intermediates(model, params: dict, state: dict, x: Tensor, indices=None, **kw) -> list:
    """timm's ``SwinTransformer.forward_intermediates(..., intermediates_only=True)``: feature ``i``
    is stage ``i``'s output ``features.{2i+1}`` (timm's stage ``i`` starts with the patch merging
    that torchvision keeps in ``features.{2i}``, so the outputs are the same), ``[N, C, H, W]``;
    ``norm=True`` applies the final ``norm`` to the last stage only
    (:meth:`vafunc.core.registry.ModelDef.intermediates`)."""
    names = [f"features.{2 * i + 1}" for i in range(len(model.config.depths))]
    return stage_intermediates(
        model, params, state, x, indices, names=names, channels_last=True, norm_layer=("norm", 1e-5), **kw
    )


FAMILY = family("swin", SwinConfig, forward, paper=PAPER, defaults=_DEFAULTS, intermediates=intermediates)

for _v, _n, _n2 in [("t", 28288354, 28351570), ("s", 49606258, 49737442), ("b", 87768224, 87930848)]:
    _c, _d, _h = VARIANTS[_v]
    register(
        f"swin_{_v}",
        FAMILY,
        params=_n,
        reference=Reference("torchvision", f"swin_{_v}"),
        embed_dim=_c,
        depths=_d,
        num_heads=_h,
        window_size=(7, 7),
        stochastic_depth_prob=STOCHASTIC_DEPTH[_v],
    )
    register(
        f"swin_v2_{_v}",
        FAMILY,
        params=_n2,
        reference=Reference("torchvision", f"swin_v2_{_v}"),
        paper=PAPER_V2,
        embed_dim=_c,
        depths=_d,
        num_heads=_h,
        window_size=(8, 8),
        stochastic_depth_prob=STOCHASTIC_DEPTH[_v],
        version=2,
    )
