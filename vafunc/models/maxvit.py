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
:func:`relative_position_index`, :func:`relative_position_bias`, :func:`prenorm_mbconv` (with
its :class:`MBConvNames` layouts), :func:`mlp` and :func:`linear_schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from ..kit import family
from ..registry import Reference, check_config, register

PAPER = "Tu et al. 2022, MaxViT: Multi-Axis Vision Transformer, arXiv:2204.01697"

# --------------------------------------------------------------------------- shared pieces


def relative_position_index(h: int, w: int, device=None) -> torch.Tensor:
    """``[h*w, h*w]`` int64: for tokens ``i`` and ``j`` of an ``h x w`` window (row-major), the
    row of the ``[(2h - 1) * (2w - 1), heads]`` bias table that holds their offset
    ``(dy, dx) = pos_i - pos_j``: ``(dy + h - 1) * (2w - 1) + (dx + w - 1)`` (Swin, Sec. 3.2;
    torchvision's MaxViT/Swin and timm's ``gen_relative_position_index`` build the same table)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = rearrange(torch.stack((ys, xs)), "c h w -> c (h w)")
    d = rearrange(pos, "c i -> c i 1") - rearrange(pos, "c j -> c 1 j")
    return (d[0] + (h - 1)) * (2 * w - 1) + (d[1] + (w - 1))


def relative_position_bias(m, window: tuple[int, int], heads: int, *, buffer: bool = True):
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
    return rearrange(table[index], "i j heads -> heads i j").contiguous()  # as the references: SDPA reads it row-wise


def linear_schedule(rate: float, n: int) -> list[float]:
    """``n`` stochastic-depth rates from 0 to ``rate``, spaced as ``numpy.linspace`` spaces them
    (torchvision's MaxViT; timm's ``calculate_drop_path_rates``), last one exactly ``rate``."""
    if n == 1:
        return [0.0]
    step = rate / (n - 1)
    return [rate if i == n - 1 else i * step for i in range(n)]


class MBConvNames(NamedTuple):
    """Where a pre-norm MBConv keeps its tensors: dotted paths inside the block's scope
    (``(conv, norm)`` pairs for the 1x1 expansion and the depthwise conv, ``(fc1, fc2)`` for SE)."""

    pre_norm: str
    expand: tuple[str, str]
    dw: tuple[str, str]
    se: tuple[str, str]
    project: str


#: torchvision's ``MBConv``
TORCHVISION_MBCONV = MBConvNames("layers.pre_norm", ("layers.conv_a.0", "layers.conv_a.1"),
                                 ("layers.conv_b.0", "layers.conv_b.1"),
                                 ("layers.squeeze_excitation.fc1", "layers.squeeze_excitation.fc2"), "layers.conv_c")
#: timm's ``MbConvBlock`` (MaxxVit, CoAtNet)
TIMM_MBCONV = MBConvNames("pre_norm", ("conv1_1x1", "norm1"), ("conv2_kxk", "norm2"), ("se.fc1", "se.fc2"),
                          "conv3_1x1")


class _Scopes:
    """Child scopes of ``m`` by dotted path, each module's scope made once (train mode records
    the new BatchNorm statistics per scope object, so a module must not get two)."""

    def __init__(self, m):
        self.memo = {"": m}

    def __call__(self, path: str):
        parent, _, leaf = path.rpartition(".")
        return self.scope(parent), leaf

    def scope(self, path: str):
        s = self.memo.get(path)
        if s is None:
            parent, _, name = path.rpartition(".")
            s = self.memo[path] = self.scope(parent).child(name)
        return s


def prenorm_mbconv(m, x, cout: int, *, stride: int, expanded: int, squeeze: int, act: Callable,
                   se_act: Callable, shortcut: Callable, names: MBConvNames = TORCHVISION_MBCONV,
                   pre_act: bool = False, down: Callable | None = None, se_early: bool = False,
                   project_bias: bool = True, drop_path: float = 0.0, rng=None):
    """The pre-norm MBConv of MaxViT (Sec. 3.1) and CoAtNet (Sec. 2.1; timm's ``MbConvBlock``):
    ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``.

    ``shortcut(m, x) + drop_path(conv1x1(se(dw_kxk(conv1x1(norm(x))))))``: BatchNorm on the input
    (with ``act`` when ``pre_act``: timm's early CoAtNets), then ``down`` (a pooling that carries
    the stride instead of the depthwise conv, timm's ``stride_mode="pool"``), 1x1 expansion to
    ``expanded`` (BN, ``act``), 3x3 depthwise conv with ``stride`` (BN, ``act``), SE to
    ``squeeze`` channels (``se_act``, sigmoid gate; before the depthwise conv's BN when
    ``se_early``), a 1x1 projection (bias when ``project_bias``). ``shortcut`` is the reference's
    (identity, or pooling + 1x1 conv); stochastic depth keyed by ``rng``.
    """
    res = shortcut(m, x)
    at = _Scopes(m)
    s, n = at(names.pre_norm)
    y = s.batch_norm(n, x)
    if pre_act:
        y = act(y)
    if down is not None:
        y, stride = down(y), 1
    (s, c), (_, n) = at(names.expand[0]), at(names.expand[1])
    y = s.conv_norm_act(y, expanded, 1, conv=c, norm=n, act=act)
    (s, c), (sn, n) = at(names.dw[0]), at(names.dw[1])
    if se_early:
        y = s.conv(c, y, expanded, 3, stride=stride, groups=expanded)
    else:
        y = s.conv_norm_act(y, expanded, 3, conv=c, norm=n, act=act, stride=stride, groups=expanded)
    (se, f1), (_, f2) = at(names.se[0]), at(names.se[1])  # its scope after the conv's (key order)
    y = se.squeeze_excite(y, squeeze, act=se_act, fc1=f1, fc2=f2)
    if se_early:
        y = act(sn.batch_norm(n, y))
    s, c = at(names.project)
    y = s.conv(c, y, cout, 1, bias=project_bias)
    return m.drop_path(y, drop_path, m.rng if rng is None else rng) + res


def mlp(m, x, hidden: int, *, fc1: str, fc2: str, act: Callable = F.gelu):
    """The transformer MLP ``fc2(act(fc1(x)))`` over the last axis, ``[..., C] -> [..., C]``."""
    return m.linear(fc2, act(m.linear(fc1, x, hidden)), x.shape[-1])


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

    def __post_init__(self):
        for f in ("block_channels", "block_layers"):
            v = getattr(self, f)
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
                raise TypeError(f"{f} must be a sequence of positive ints, got {v!r}")
            v = tuple(v)
            if not v or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in v):
                raise ValueError(f"{f} must be a non-empty sequence of positive ints, got {v!r}")
            object.__setattr__(self, f, v)
        if len(self.block_channels) != len(self.block_layers):
            raise ValueError(f"block_channels and block_layers differ in length: {self.block_channels} vs "
                             f"{self.block_layers}")
        for f in ("squeeze_ratio", "expansion_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{f} must be a positive number, got {v!r}")
            object.__setattr__(self, f, float(v))
        check_config(self, positive_ints=("stem_channels", "partition_size", "head_dim", "mlp_ratio", "num_classes",
                                          "in_channels"),
                     rates=("stochastic_depth_prob", "mlp_dropout", "attention_dropout"))
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


def partition_attention(m, x, cfg: MaxVitConfig, kind: str, rate: float):
    """Block (``kind="window"``) or grid (``"grid"``) attention, torchvision's
    ``PartitionAttentionLayer``: ``[N, C, H, W] -> same``.

    The map is cut into groups of ``P x P`` tokens: windows of adjacent pixels, or a ``P x P``
    grid of pixels ``(H/P, W/P)`` apart. Within each group, a pre-norm transformer layer:
    ``t + drop_path(dropout(attn(LN(t))))``, then ``t + drop_path(dropout(mlp(LN(t))))``.
    Key slots of the scope's key: 0 attention-output dropout, 1 its stochastic depth, 2 MLP
    dropout, 3 its stochastic depth.
    """
    p = cfg.partition_size
    c = x.shape[1]
    if kind == "window":  # windows of P x P adjacent pixels
        t = rearrange(x, "b c (nh ph) (nw pw) -> b (nh nw) (ph pw) c", ph=p, pw=p)
    else:  # a P x P grid whose cells are (H/P) x (W/P)
        t = rearrange(x, "b c (ph nh) (pw nw) -> b (nh nw) (ph pw) c", ph=p, pw=p)
    a = m.child("attn_layer")
    y = a.layer_norm("0", t)
    y = rel_attention(a.child("1"), y, c // cfg.head_dim, (p, p))
    t = t + m.drop_path(m.dropout(y, cfg.attention_dropout, m.key(0)), rate, m.key(1))
    f = m.child("mlp_layer")
    y = mlp(f, f.layer_norm("0", t), c * cfg.mlp_ratio, fc1="1", fc2="3")
    t = t + m.drop_path(m.dropout(y, cfg.mlp_dropout, m.key(2)), rate, m.key(3))
    nh, nw = x.shape[2] // p, x.shape[3] // p
    if kind == "window":
        return rearrange(t, "b (nh nw) (ph pw) c -> b c (nh ph) (nw pw)", nh=nh, ph=p)
    return rearrange(t, "b (nh nw) (ph pw) c -> b c (ph nh) (pw nw)", nh=nh, ph=p)


def rel_attention(m, t, heads: int, window: tuple[int, int]):
    """torchvision's ``RelativePositionalMultiHeadAttention``: ``[..., L, C] -> same``, ``L`` the
    window's ``h*w`` tokens; ``to_qkv`` packs ``(q k v) x (heads, head_dim)``; the logits are
    scaled by ``C ** -0.5`` (the full width: torchvision's choice) and get the relative position
    bias; heads merged and projected by ``merge``."""
    c = t.shape[-1]
    bias = relative_position_bias(m, window, heads)  # own tensors precede the linears
    q, k, v = rearrange(m.linear("to_qkv", t, 3 * c), "... l (three h d) -> three ... h l d", three=3, h=heads)
    o = m.attention(q, k, v, bias=bias, scale=c ** -0.5)
    return m.linear("merge", rearrange(o, "... h l d -> ... l (h d)"), c)


def _proj(cout: int, stride: int):
    """torchvision's MBConv shortcut: identity, or (3x3/2 average pool, count_include_pad) and a
    1x1 conv with bias at ``proj.{1|0}``."""

    def shortcut(m, x):
        if stride == 1 and x.shape[1] == cout:
            return x
        p = m.child("proj")
        if stride == 2:
            return p.conv("1", F.avg_pool2d(x, 3, 2, 1), cout, 1, bias=True)
        return p.conv("0", x, cout, 1, bias=True)

    return shortcut


def maxvit_layer(m, x, cfg: MaxVitConfig, cout: int, stride: int, rate: float):
    """One MaxViT block (Fig. 2), torchvision's ``MaxVitLayer``: MBConv, block attention, grid
    attention. ``[N, cin, H, W] -> [N, cout, H/stride, W/stride]``. Keys: ``fold_in(key, 0)``
    the MBConv's stochastic depth, ``fold_in(key, 1)`` / ``(key, 2)`` the two attention layers'."""
    s = m.child("layers")
    x = s.block("MBconv", prenorm_mbconv, x, cout, stride=stride, expanded=int(cout * cfg.expansion_ratio),
                squeeze=int(cout * cfg.squeeze_ratio), act=F.gelu, se_act=F.silu, shortcut=_proj(cout, stride),
                drop_path=rate, tap=False, rng=m.key(0))
    x = s.block("window_attention", partition_attention, x, cfg, "window", rate, rng=m.key(1), tap=False)
    return s.block("grid_attention", partition_attention, x, cfg, "grid", rate, rng=m.key(2), tap=False)


def stage(m, x, cfg: MaxVitConfig, cout: int, rates, index: int):
    """A stage (torchvision's ``MaxVitBlock``): its blocks at ``layers.{j}``, the first with
    stride 2; block ``j`` gets the key ``fold_in(rng, index + j)``."""
    s = m.child("layers")
    for j, rate in enumerate(rates):
        x = s.block(str(j), maxvit_layer, x, cfg, cout, 2 if j == 0 else 1, rate, rng=m.key(index + j))
    return x


def stem(m, x, c: int):
    """3x3/2 conv, BN, GELU, then a 3x3 conv with bias: ``[N, 3, H, W] -> [N, c, H/2, W/2]``."""
    y = m.child("0").conv_norm_act(x, c, 3, stride=2, act=F.gelu)
    return m.child("1").conv("0", y, c, 3, bias=True)


def forward(m, cfg: MaxVitConfig, x):
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
    blocks = m.child("blocks", rng=m.rng)
    b = 0
    for i, (cout, n) in enumerate(zip(cfg.block_channels, cfg.block_layers)):
        y = blocks.block(str(i), stage, y, cfg, cout, rates[b:b + n], b, rng=blocks.rng)
        b += n
    c = m.child("classifier")
    y = c.layer_norm("2", F.adaptive_avg_pool2d(y, 1).flatten(1))
    y = torch.tanh(c.linear("3", y, y.shape[-1]))
    return c.linear("5", y, cfg.num_classes, bias=False)


FAMILY = family("maxvit", MaxVitConfig, forward, paper=PAPER, init_size=lambda cfg: size_multiple(cfg),
                defaults={"conv": ("normal", 0.02), "linear": ("normal", 0.02), "eps": 1e-3, "momentum": 0.01})

register(
    "maxvit_t",
    FAMILY,
    params=30919624,
    reference=Reference("torchvision", "maxvit_t"),
    notes="Table 1 of the paper (MaxViT-T); torchvision's builder (stochastic depth 0.2).",
)
