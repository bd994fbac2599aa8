"""MaxViT-T in torchvision's layout, and the pieces it shares with CoAtNet.

Tu et al. 2022, "MaxViT: Multi-Axis Vision Transformer" (arXiv:2204.01697). Sec. 3 and Fig. 2:
a convolutional stem (two 3x3 convs, the first with stride 2), then four stages, each a stack
of MaxViT blocks. A block is an MBConv (pre-norm BatchNorm, 1x1 expansion, 3x3 depthwise conv
carrying the stage's stride 2 in its first block, squeeze-and-excitation, 1x1 projection) followed
by *block attention* (self-attention inside non-overlapping P x P windows) and *grid attention*
(self-attention over a fixed G x G grid that strides over the whole map), each a pre-norm
transformer layer (LayerNorm, relative-position multi-head attention, LayerNorm, MLP, both with
residuals) (Sec. 3.2, Eq. 3-4). The head is global average pooling, LayerNorm, a
Linear + Tanh "pre-logits" layer and the classifier. Table 1 gives MaxViT-T: stem 64, stages
of (2, 2, 5, 2) blocks at widths (64, 128, 256, 512), head dimension 32, P = G = 7, MBConv
expansion 4 and SE ratio 0.25 (of the output width); stochastic depth 0.2 (Sec. 4.1).

State-dict names are torchvision's ``MaxVit``: ``stem.0.{0,1}`` (conv, BN), ``stem.1.0`` (conv
with bias), ``blocks.{i}.layers.{j}.layers.MBconv`` (``proj.{0|1}`` shortcut conv behind a 3x3/2
average pool, ``layers.pre_norm``, ``layers.conv_a``/``conv_b`` (conv, BN), ``layers.
squeeze_excitation.fc1/fc2``, ``layers.conv_c``), ``...layers.{window,grid}_attention`` with
``attn_layer.0`` (LayerNorm), ``attn_layer.1`` (``relative_position_bias_table``,
``relative_position_index`` (a buffer, in the state tree), ``to_qkv``, ``merge``), ``mlp_layer.0``
(LayerNorm), ``mlp_layer.1``/``.3`` (linears); ``classifier.2`` (LayerNorm), ``classifier.3``
(Linear), ``classifier.5`` (Linear, no bias). BatchNorm eps 1e-3, momentum 0.01; every conv and
linear weight normal(0, 0.02) with zero bias, the bias tables truncated normal(0, 0.02).

Input sizes. Every stage's map must split into whole P x P windows and G x G grids, so H and W
are multiples of ``partition_size * 2 ** (stages + 1)`` (224 for MaxViT-T; declared with
``m.require_multiple``). torchvision's module runs only at the size it was built for (its grid
partition reads the height only, so it is square too); here any multiple works, non-square
included: block attention uses P x P windows, grid attention a G x G grid of cells of
``(H / G) x (W / G)`` pixels, as in the paper. At a square size the two agree value for value.

Shared with :mod:`vafunc.models.coatnet` (one implementation of each concept):
:func:`relative_position_index`, :func:`relative_position_bias`, :func:`prenorm_mbconv` (an
:class:`MBConv`, with its :class:`MBConvNames` layouts and their shortcuts :func:`proj` and
:func:`downsample2d`) and :func:`linear_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
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

PAPER = "Tu et al. 2022, MaxViT: Multi-Axis Vision Transformer, arXiv:2204.01697"

# --------------------------------------------------------------------------- shared pieces


def relative_position_index(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """``[h*w, h*w]`` int64: for tokens ``i`` and ``j`` of an ``h x w`` window (row-major), the
    row of the ``[(2h - 1) * (2w - 1), heads]`` bias table that holds their offset
    ``(dy, dx) = pos_i - pos_j``: ``(dy + h - 1) * (2w - 1) + (dx + w - 1)`` (Swin, Sec. 3.2;
    torchvision's MaxViT/Swin and timm's ``gen_relative_position_index`` build the same table)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = einops.rearrange(torch.stack((ys, xs)), "c h w -> c (h w)")
    d = einops.rearrange(pos, "c i -> c i 1") - einops.rearrange(pos, "c j -> c 1 j")
    return (d[0] + (h - 1)) * (2 * w - 1) + (d[1] + (w - 1))


def relative_position_bias(m: Scope, window: tuple[int, int], heads: int, *, buffer: bool = True) -> Tensor:
    """The learned relative position bias of attention over an ``h x w`` window, ``[heads, h*w,
    h*w]``, added to the attention logits. Declares ``relative_position_bias_table`` (a parameter,
    truncated normal(0, 0.02)) and, with ``buffer``, ``relative_position_index`` (a constant
    buffer of the reference's state_dict: torchvision); without it the index is made in the forward
    (timm registers it as a non-persistent buffer, not in its state_dict)."""
    h, w = window
    table = m.param("relative_position_bias_table", ((2 * h - 1) * (2 * w - 1), heads), ("trunc_normal", 0.02))
    if buffer:
        index = m.buffer("relative_position_index", lambda: relative_position_index(h, w))
    else:  # a constant of the graph: a few integer ops on a small grid, made where the table lives
        index = relative_position_index(h, w, device=table.device)
    # contiguous, as the references: SDPA reads it row-wise
    return einops.rearrange(table[index], "i j heads -> heads i j").contiguous()


def linear_schedule(rate: float, n: int) -> list[float]:
    """``n`` stochastic-depth rates from 0 to ``rate``, spaced as ``numpy.linspace`` spaces them
    (torchvision's MaxViT; timm's ``calculate_drop_path_rates``), last one exactly ``rate``."""
    if n == 1:
        return [0.0]
    step = rate / (n - 1)
    return [rate if i == n - 1 else i * step for i in range(n)]


def proj(m: Scope, x: Tensor, cin: int, cout: int, stride: int, bias: bool = True) -> Tensor:
    """torchvision's MBConv shortcut ``proj``, an ``nn.Sequential``: with stride 2 a 3x3/2
    average pool (``count_include_pad``) ``0`` and a 1x1 conv ``1``; else the 1x1 conv ``0``."""
    if stride == 2:
        return m.conv("1", m.op("0", F.avg_pool2d, x, 3, 2, 1, tap=False), cout, 1, bias=bias)
    return m.conv("0", x, cout, 1, bias=bias)


def downsample2d(m: Scope, x: Tensor, cin: int, cout: int, stride: int = 2, bias: bool = True) -> Tensor:
    """timm's ``Downsample2d`` (``pool_type="avg2"``): a 2x2/2 average pool ``pool``, then a 1x1
    conv ``expand`` where the width changes (``stride`` is 2: the argument mirrors :func:`proj`)."""
    y = m.op("pool", F.avg_pool2d, x, 2, 2, tap=False)
    return y if cin == cout else m.conv("expand", y, cout, 1, bias=bias)


class MBConvNames(NamedTuple):
    """Where a pre-norm MBConv keeps its modules, inside the block's scope. ``layers``: the
    container of the residual branch (torchvision's ``nn.Sequential``), or None (timm's flat
    block). ``expand`` / ``dw``: a ``Conv2dNormActivation`` container (conv ``0``, norm ``1``,
    activation ``2``), or a ``(conv, norm)`` pair of the block's own. ``shortcut``: the name and
    the function (:func:`proj` or :func:`downsample2d`) of the shortcut; ``down``: the stride
    pool's module (timm's, with ``stride_pool``); ``drop_path``: the stochastic-depth module."""

    shortcut: tuple[str, Callable]
    layers: str | None
    pre_norm: str
    down: str
    expand: str | tuple[str, str]
    dw: str | tuple[str, str]
    se: str
    project: str
    drop_path: str


#: torchvision's ``MBConv``
TORCHVISION_MBCONV = MBConvNames(
    ("proj", proj), "layers", "pre_norm", "down", "conv_a", "conv_b", "squeeze_excitation", "conv_c", "stochastic_depth"
)
#: timm's ``MbConvBlock`` (MaxxVit, CoAtNet); ``se`` is ``"se_early"`` where SE precedes ``norm2``
TIMM_MBCONV = MBConvNames(
    ("shortcut", downsample2d),
    None,
    "pre_norm",
    "down",
    ("conv1_1x1", "norm1"),
    ("conv2_kxk", "norm2"),
    "se",
    "conv3_1x1",
    "drop_path",
)


class MBConv(NamedTuple):
    """A pre-norm MBConv (:func:`prenorm_mbconv`): ``cin -> cout`` channels, ``stride``, the 1x1
    expansion to ``expanded`` channels, SE to ``squeeze`` channels, the activations ``act`` and
    ``se_act`` (module-level functions), stochastic depth ``drop_path``; ``pre_act``: ``act``
    after the pre-norm; ``stride_pool``: the stride in a 2x2 average pool before the expansion
    (timm's ``stride_mode="pool"``) instead of the depthwise conv; ``se_early``: SE before the
    depthwise conv's norm; ``bias``: biases on the projection and the shortcut's conv."""

    cin: int
    cout: int
    stride: int
    expanded: int
    squeeze: int
    act: Callable
    se_act: Callable
    drop_path: float = 0.0
    pre_act: bool = False
    stride_pool: bool = False
    se_early: bool = False
    bias: bool = True


def _conv_norm_act(m: Scope, at: str | tuple[str, str], x: Tensor, cout: int, kernel: int, **kw: Any) -> Tensor:
    """Conv, norm, activation at ``at``: a ``Conv2dNormActivation`` block of that name, or the
    ``(conv, norm)`` pair of ``m`` (see :class:`MBConvNames`)."""
    if isinstance(at, str):
        return m.block(at, Scope.conv_norm_act, x, cout, kernel, tap=False, **kw)
    return m.conv_norm_act(x, cout, kernel, conv=at[0], norm=at[1], **kw)


def mbconv_branch(m: Scope, x: Tensor, b: MBConv, names: MBConvNames) -> Tensor:
    """The residual branch of :func:`prenorm_mbconv`: ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``."""
    if b.pre_act or m.defaults.get("norm_act"):  # timm's pre-norm is a BatchNormAct2d (act: identity or act)
        y = m.norm_act(names.pre_norm, x, b.act if b.pre_act else L.identity)
    else:
        y = m.batch_norm(names.pre_norm, x)
    stride = b.stride
    if b.stride_pool and stride == 2:
        y, stride = m.block(names.down, downsample2d, y, b.cin, b.cin, 2, False, tap=False), 1
    y = _conv_norm_act(m, names.expand, y, b.expanded, 1, act=b.act)
    if b.se_early:  # timm's se_early: the depthwise conv, SE, then its norm (+ act)
        y = m.conv(names.dw[0], y, b.expanded, 3, stride=stride, groups=b.expanded)
        y = m.block(names.se, Scope.squeeze_excite, y, b.squeeze, act=b.se_act, tap=False)
        y = m.norm_act(names.dw[1], y, b.act)
    else:
        y = _conv_norm_act(m, names.dw, y, b.expanded, 3, act=b.act, stride=stride, groups=b.expanded)
        y = m.block(names.se, Scope.squeeze_excite, y, b.squeeze, act=b.se_act, tap=False)
    return m.conv(names.project, y, b.cout, 1, bias=b.bias)


def prenorm_mbconv(
    m: Scope, x: Tensor, b: MBConv, names: MBConvNames = TORCHVISION_MBCONV, rng: Tensor | None = None
) -> Tensor:
    """The pre-norm MBConv of MaxViT (Sec. 3.1) and CoAtNet (Sec. 2.1; timm's ``MbConvBlock``):
    ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``.

    ``shortcut(x) + drop_path(conv1x1(se(dw_kxk(conv1x1(norm(x))))))``: BatchNorm on the input
    (with ``act`` when ``pre_act``: timm's early CoAtNets; a family with ``norm_act`` has timm's
    ``BatchNormAct2d`` there, its activation the identity without ``pre_act``),
    then the stride pool (``stride_pool``), 1x1 expansion to ``expanded`` (BN, ``act``), 3x3
    depthwise conv with ``stride`` (BN, ``act``), SE to ``squeeze`` channels (``se_act``, sigmoid
    gate; before the depthwise conv's BN when ``se_early``), a 1x1 projection (bias when
    ``bias``). The shortcut is the identity where ``stride == 1`` and ``cin == cout``, else the
    layout's (pooling and a 1x1 conv); stochastic depth keyed by ``rng`` (default: the scope's key).
    """
    where, shortcut = names.shortcut  # the shortcut first: its tensors precede the branch's in the state_dict
    res = (
        x
        if b.stride == 1 and b.cin == b.cout
        else m.block(where, shortcut, x, b.cin, b.cout, b.stride, b.bias, tap=False)
    )
    if names.layers is None:
        y = mbconv_branch(m, x, b, names)
    else:
        y = m.block(names.layers, mbconv_branch, x, b, names, tap=False, sequential=True)
    return m.drop_path(y, b.drop_path, m.rng if rng is None else rng, name=names.drop_path) + res


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class MaxVitConfig:
    """torchvision ``MaxVit`` keywords (``input_size``, ``norm_layer``, ``activation_layer``
    aside: any size that is a multiple of :func:`size_multiple` runs; BatchNorm(1e-3, 0.01) and
    GELU are the architecture's).

    ``stochastic_depth_prob``: the rate of the last block; block ``b`` of ``B`` (counted over all
    stages) drops its three residual branches at ``stochastic_depth_prob * b / (B - 1)``.
    ``attention_dropout`` / ``mlp_dropout``: dropout on the attention layer's and the MLP's
    outputs (torchvision's placement: after the projection, not on the attention weights).
    """

    stem_channels: int = 64
    partition_size: int = 7
    block_channels: tuple = (64, 128, 256, 512)
    block_layers: tuple = (2, 2, 5, 2)
    head_dim: int = 32
    stochastic_depth_prob: float = 0.2
    squeeze_ratio: float = 0.25
    expansion_ratio: float = 4.0
    mlp_ratio: int = 4
    mlp_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        for f in ("block_channels", "block_layers"):
            v = getattr(self, f)
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
                raise TypeError(f"{f} must be a sequence of positive ints, got {v!r}")
            v = tuple(v)
            if not v or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in v):
                raise ValueError(f"{f} must be a non-empty sequence of positive ints, got {v!r}")
            object.__setattr__(self, f, v)
        if len(self.block_channels) != len(self.block_layers):
            raise ValueError(
                f"block_channels and block_layers differ in length: {self.block_channels} vs {self.block_layers}"
            )
        for f in ("squeeze_ratio", "expansion_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{f} must be a positive number, got {v!r}")
            object.__setattr__(self, f, float(v))
        check_config(
            self,
            positive_ints=("stem_channels", "partition_size", "head_dim", "mlp_ratio", "num_classes", "in_channels"),
            rates=("stochastic_depth_prob", "mlp_dropout", "attention_dropout"),
        )
        for c in self.block_channels:
            if c % self.head_dim:
                raise ValueError(f"block width {c} is not divisible by head_dim={self.head_dim}")
        for f in ("stochastic_depth_prob", "mlp_dropout", "attention_dropout"):
            object.__setattr__(self, f, float(getattr(self, f)))


def size_multiple(cfg: MaxVitConfig) -> int:
    """What H and W must be multiples of: the last stage (stride ``2 ** (stages + 1)``) must still
    split into whole ``partition_size`` windows (224 for MaxViT-T)."""
    return cfg.partition_size * 2 ** (len(cfg.block_channels) + 1)


# --------------------------------------------------------------------------- the network


def partition_attention(
    m: Scope, x: Tensor, cfg: MaxVitConfig, kind: str, rate: float, width: int | None = None
) -> Tensor:
    """Block (``kind="window"``) or grid (``"grid"``) attention, torchvision's
    ``PartitionAttentionLayer``: ``[N, C, H, W] -> same`` (``width``: C, read off ``x`` when not
    given; the network passes it from the config).

    The map is cut into groups of ``P x P`` tokens: windows of adjacent pixels, or a ``P x P``
    grid of pixels ``(H/P, W/P)`` apart. Within each group, a pre-norm transformer layer:
    ``t + drop_path(attn_layer(t))``, then ``t + drop_path(mlp_layer(t))`` (one
    ``stochastic_dropout`` module for both, as torchvision's). Key slots of the scope's key: 0
    the attention layer's dropout, 1 its stochastic depth, 2 the MLP's dropout, 3 its stochastic
    depth.
    """
    p = cfg.partition_size
    c = x.shape[1] if width is None else width
    if kind == "window":  # windows of P x P adjacent pixels
        t = einops.rearrange(x, "b c (nh ph) (nw pw) -> b (nh nw) (ph pw) c", ph=p, pw=p)
    else:  # a P x P grid whose cells are (H/P) x (W/P)
        t = einops.rearrange(x, "b c (ph nh) (pw nw) -> b (nh nw) (ph pw) c", ph=p, pw=p)
    y = m.block(
        "attn_layer", attn_layer, t, c // cfg.head_dim, (p, p), c, cfg.attention_dropout, tap=False, rng=m.key(0)
    )
    t = t + m.drop_path(y, rate, m.key(1), name="stochastic_dropout")
    y = m.block("mlp_layer", mlp_layer, t, c * cfg.mlp_ratio, c, cfg.mlp_dropout, tap=False, rng=m.key(2))
    t = t + m.drop_path(y, rate, m.key(3), name="stochastic_dropout")
    nh = x.shape[2] // p  # a node of FX's graph (einops' functions are opaque nodes there)
    if kind == "window":
        return einops.rearrange(t, "b (nh nw) (ph pw) c -> b c (nh ph) (nw pw)", nh=nh, ph=p)
    return einops.rearrange(t, "b (nh nw) (ph pw) c -> b c (ph nh) (pw nw)", nh=nh, ph=p)


def attn_layer(m: Scope, t: Tensor, heads: int, window: tuple[int, int], width: int, rate: float) -> Tensor:
    """torchvision's ``attn_layer``: LayerNorm ``0``, :func:`rel_attention` ``1``, dropout ``2``
    (keyed by the scope's key). ``[..., L, C] -> same``."""
    y = m.block("1", rel_attention, m.layer_norm("0", t), heads, window, width, tap=False)
    return m.dropout(y, rate, m.rng, name="2")


def mlp_layer(m: Scope, t: Tensor, hidden: int, width: int, rate: float) -> Tensor:
    """torchvision's ``mlp_layer``: LayerNorm ``0``, Linear ``1``, GELU ``2``, Linear ``3``,
    dropout ``4`` (keyed by the scope's key). ``[..., C] -> same``."""
    y = m.linear("1", m.layer_norm("0", t), hidden)
    y = m.linear("3", m.op("2", F.gelu, y, tap=False), width)
    return m.dropout(y, rate, m.rng, name="4")


def rel_attention(m: Scope, t: Tensor, heads: int, window: tuple[int, int], width: int) -> Tensor:
    """torchvision's ``RelativePositionalMultiHeadAttention``: ``[..., L, C] -> same``, ``L`` the
    window's ``h*w`` tokens, ``C = width``; ``to_qkv`` packs ``(q k v) x (heads, head_dim)``; the
    logits are scaled by ``C ** -0.5`` (the full width: torchvision's choice) and get the relative
    position bias; heads merged and projected by ``merge``."""
    bias = relative_position_bias(m, window, heads)  # own tensors precede the linears
    qkv = m.linear("to_qkv", t, 3 * width)
    q, k, v = einops.rearrange(qkv, "... l (three h d) -> three ... h l d", three=3, h=heads)
    o = m.attention(q, k, v, bias=bias, scale=width**-0.5)
    return m.linear("merge", einops.rearrange(o, "... h l d -> ... l (h d)"), width)


def maxvit_layer(m: Scope, x: Tensor, cfg: MaxVitConfig, cin: int, cout: int, stride: int, rate: float) -> Tensor:
    """One MaxViT block (Fig. 2), torchvision's ``MaxVitLayer``: its ``layers`` (an
    ``nn.Sequential``) are the MBConv, block attention and grid attention
    (:func:`maxvit_layers`). ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``."""
    return m.block("layers", maxvit_layers, x, cfg, cin, cout, stride, rate, tap=False, sequential=True, rng=m.rng)


def maxvit_layers(m: Scope, x: Tensor, cfg: MaxVitConfig, cin: int, cout: int, stride: int, rate: float) -> Tensor:
    """``MBconv``, ``window_attention``, ``grid_attention``. Keys: ``fold_in(key, 0)`` the
    MBConv's stochastic depth, ``fold_in(key, 1)`` / ``(key, 2)`` the two attention layers'."""
    b = MBConv(
        cin,
        cout,
        stride,
        int(cout * cfg.expansion_ratio),
        int(cout * cfg.squeeze_ratio),
        F.gelu,
        F.silu,
        drop_path=rate,
    )
    x = m.block("MBconv", prenorm_mbconv, x, b, tap=False, rng=m.key(0))
    x = m.block("window_attention", partition_attention, x, cfg, "window", rate, cout, rng=m.key(1), tap=False)
    return m.block("grid_attention", partition_attention, x, cfg, "grid", rate, cout, rng=m.key(2), tap=False)


def stage(m: Scope, x: Tensor, cfg: MaxVitConfig, cin: int, cout: int, rates: tuple, index: int) -> Tensor:
    """A stage (torchvision's ``MaxVitBlock``): its blocks at ``layers.{j}`` (an ``nn.ModuleList``
    there: a container that is never called), the first with stride 2; block ``j`` gets the key
    ``fold_in(rng, index + j)``."""
    s = m.child("layers", module=("ModuleList", ()))
    for j, rate in enumerate(rates):
        x = s.block(
            str(j), maxvit_layer, x, cfg, cin if j == 0 else cout, cout, 2 if j == 0 else 1, rate, rng=m.key(index + j)
        )
    return x


def conv_bias(m: Scope, x: Tensor, cout: int, kernel: int) -> Tensor:
    """A ``Conv2dNormActivation`` with neither norm nor activation: the conv ``0``, with bias."""
    return m.conv("0", x, cout, kernel, bias=True)


def stem(m: Scope, x: Tensor, c: int) -> Tensor:
    """``0``: 3x3/2 conv, BN, GELU; ``1``: a 3x3 conv with bias. ``[N, 3, H, W] -> [N, c, H/2, W/2]``."""
    y = m.block("0", Scope.conv_norm_act, x, c, 3, stride=2, act=F.gelu, tap=False)
    return m.block("1", conv_bias, y, c, 3, tap=False)


def classifier(m: Scope, x: Tensor, width: int, num_classes: int) -> Tensor:
    """torchvision's ``classifier``: average pool ``0``, flatten ``1``, LayerNorm ``2``, Linear
    ``3``, Tanh ``4``, Linear ``5`` (no bias). ``[N, C, H, W] -> [N, num_classes]``."""
    y = m.op("1", torch.flatten, m.op("0", F.adaptive_avg_pool2d, x, 1, tap=False), 1, tap=False)
    y = m.op("4", torch.tanh, m.linear("3", m.layer_norm("2", y), width), tap=False)
    return m.linear("5", y, num_classes, bias=False)


def forward(m: Scope, cfg: MaxVitConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``, H and W multiples of :func:`size_multiple`.

    Feature names (torchvision's module paths, NCHW): ``stem`` (stride 2), every block
    ``blocks.{i}.layers.{j}`` and every stage ``blocks.{i}`` (strides 4, 8, 16, 32).
    Randomness: block ``b`` (counted over all stages) uses ``fold_in(rng, b)``; inside it, slot 0
    the MBConv's stochastic depth, slots 1 / 2 the block / grid attention layers, each with slots
    0-3 (attention dropout, its stochastic depth, MLP dropout, its stochastic depth).
    """
    m.require_multiple(size_multiple(cfg))
    y = m.block("stem", stem, x, cfg.stem_channels)
    rates = linear_schedule(cfg.stochastic_depth_prob, sum(cfg.block_layers))
    blocks = m.child("blocks", rng=m.rng, module=("ModuleList", ()))  # torchvision's: never called
    b, cin = 0, cfg.stem_channels
    for i, (cout, n) in enumerate(zip(cfg.block_channels, cfg.block_layers)):
        y = blocks.block(str(i), stage, y, cfg, cin, cout, tuple(rates[b : b + n]), b, rng=blocks.rng)
        b, cin = b + n, cout
    return m.block("classifier", classifier, y, cfg.block_channels[-1], cfg.num_classes, tap=False)


def intermediates(model, params: dict, state: dict, x: Tensor, indices=None, **kw) -> list:
    """timm's ``MaxxVit.forward_intermediates(..., intermediates_only=True)``: feature 0 is the
    ``stem``, feature ``i + 1`` stage ``i``'s output ``blocks.{i}``, ``[N, C, H, W]``. The final
    LayerNorm sits in the classifier, after the pooling (timm's ``norm`` is an ``nn.Identity`` on
    the MaxViT checkpoints), so ``norm=True`` changes nothing, as there
    (:meth:`vafunc.core.registry.ModelDef.intermediates`)."""
    names = ["stem", *(f"blocks.{i}" for i in range(len(model.config.block_layers)))]
    return stage_intermediates(
        model, params, state, x, indices, names=names, channels_last=False, norm_layer=None, **kw
    )


FAMILY = family(
    "maxvit",
    MaxVitConfig,
    forward,
    paper=PAPER,
    init_size=lambda cfg: size_multiple(cfg),
    defaults={"conv": ("normal", 0.02), "linear": ("normal", 0.02), "eps": 1e-3, "momentum": 0.01},
    intermediates=intermediates,
)

register(
    "maxvit_t",
    FAMILY,
    params=30919624,
    reference=Reference("torchvision", "maxvit_t"),
    notes="Table 1 of the paper (MaxViT-T); torchvision's builder (stochastic depth 0.2).",
)
