"""CoAtNet-0, in timm's layout: the paper's configuration and timm's own variant.

Dai et al. 2021, "CoAtNet: Marrying Convolution and Attention for All Data Sizes"
(arXiv:2106.04803). Sec. 2.3 and Fig. 4: a two-layer convolutional stem S0 (stride 2), then
stages S1-S4, each halving the resolution in its first block: S1 and S2 are pre-norm MBConv
blocks (expansion 4, squeeze-and-excitation 0.25), S3 and S4 are pre-norm transformer blocks
whose attention covers the whole map with a learned relative position bias ``w_{i-j}``
(Eq. 3, "relative attention"); a block that downsamples pools its input (and the shortcut,
which a 1x1 conv widens). Table 3 gives CoAtNet-0: L = (2, 2, 3, 5, 2) blocks, D = (64, 96,
192, 384, 768) channels (timm's ``coatnet_0_224`` counts the stem as one stage of two convs:
depths (2, 3, 5, 2) for S1-S4), head dimension 32; the head is average pooling, LayerNorm, a
Linear + Tanh pre-logits layer and the classifier (the original repository's).

``coatnet_0_rw_224`` is timm's own variant, trained before the original code was public, with
published ImageNet weights: stem (32, 64), depths (2, 3, 7, 2), SiLU in the MBConvs with an
activation after the pre-norm, the stride in an average pool in front of the 1x1 expansion
(expansion from the input width), SE before the depthwise conv's norm (ReLU, 0.25 of the
expanded width), no biases on the MBConv's projection and shortcut nor on the transformer
shortcut, attention width that of the block's input (the output projection widens), and a
LayerNorm + linear head.

State-dict names are timm's ``MaxxVit``: ``stem.conv1``/``norm1``/``conv2``;
``stages.{i}.blocks.{j}``: MBConv (``shortcut.expand``, ``pre_norm``, ``conv1_1x1``, ``norm1``,
``conv2_kxk``, ``se_early``/``norm2``/``se``, ``conv3_1x1``) or transformer (``shortcut.expand``,
``norm1`` (``norm1.norm`` when it downsamples), ``attn.qkv`` (1x1 conv), ``attn.rel_pos.
relative_position_bias_table``, ``attn.proj``, ``norm2``, ``mlp.fc1``/``fc2`` (1x1 convs));
``head.norm``/``head.pre_logits.fc``/``head.fc`` (paper) or ``norm``/``head.fc`` (rw). timm's
``relative_position_index`` is a non-persistent buffer: here a constant made in the forward.
The bias covers the whole map of its stage, so the input size is fixed (``img_size``, 224).

Init is timm's ``vit_eff``: convs of the stem and MBConvs normal with ``std = sqrt(2 /
fan_out)`` (``"goog"``), the transformer convs Xavier-uniform (MLP biases normal(0, 1e-6)), the
bias tables truncated normal(0, 0.02), the head linears torch's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from einops import rearrange

from .. import layers as L
from ..blocks import make_divisible
from ..kit import family
from ..registry import Reference, check_config, register
from .maxvit import TIMM_MBCONV, linear_schedule, mlp, prenorm_mbconv, relative_position_bias

PAPER = "Dai et al. 2021, CoAtNet: Marrying Convolution and Attention for All Data Sizes, arXiv:2106.04803"


class Variant(NamedTuple):
    """One row of timm's ``model_cfgs`` (the fields these two CoAtNets use)."""

    embed_dim: tuple
    depths: tuple
    stem_width: tuple
    head_hidden_size: int | None
    act: str                # MBConv activation ("gelu" / "silu")
    se_act: str
    pre_norm_act: bool
    stride_pool: bool       # timm's stride_mode "pool" (else "dw")
    expand_output: bool     # expansion (and SE width) from the output width (else the input's)
    output_bias: bool       # MBConv projection and shortcut biases
    se_early: bool
    shortcut_bias: bool     # transformer shortcut
    expand_first: bool      # attention width: the output's (else the input's)


VARIANTS = {
    "coatnet_0": Variant((96, 192, 384, 768), (2, 3, 5, 2), (64, 64), 768, "gelu", "silu", False, False, True,
                         True, False, True, True),
    "coatnet_0_rw": Variant((96, 192, 384, 768), (2, 3, 7, 2), (32, 64), None, "silu", "relu", True, True, False,
                            False, True, False, False),
}
_ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": L.relu}
BLOCKS = ("C", "C", "T", "T")
DIM_HEAD = 32


@dataclass(frozen=True)
class CoAtNetConfig:
    """timm ``MaxxVit`` keywords for the CoAtNet rows (``in_chans`` is ``in_channels`` here;
    ``variant``: the ``model_cfgs`` row). ``drop_rate``: dropout before the classifier;
    ``drop_path_rate``: stochastic depth of the last block, block ``b`` of ``B`` at
    ``drop_path_rate * b / (B - 1)``. ``img_size``: the input size the relative position biases
    are built for (square; inputs must have it)."""

    variant: str = "coatnet_0"
    img_size: int = 224
    num_classes: int = 1000
    in_channels: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        check_config(self, positive_ints=("img_size", "num_classes", "in_channels"),
                     rates=("drop_rate", "drop_path_rate"))
        if self.img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32 (the network's stride), got {self.img_size}")
        for f in ("drop_rate", "drop_path_rate"):
            object.__setattr__(self, f, float(getattr(self, f)))


# --------------------------------------------------------------------------- blocks


def _downsample(m, x, cout: int, *, bias: bool):
    """timm's ``Downsample2d`` (``avg2``): 2x2/2 average pool, then a 1x1 conv at ``expand``
    when the width changes."""
    y = F.avg_pool2d(x, 2, 2)
    return y if x.shape[1] == cout else m.conv("expand", y, cout, 1, bias=bias)


def _shortcut(cout: int, stride: int, bias: bool):
    def shortcut(m, x):
        return _downsample(m.child("shortcut"), x, cout, bias=bias) if stride == 2 else x

    return shortcut


def mbconv_block(m, x, v: Variant, cout: int, stride: int, rate: float):
    """timm's ``MbConvBlock`` (the shared :func:`~vafunc.models.maxvit.prenorm_mbconv`)."""
    mid = make_divisible((cout if v.expand_output else x.shape[1]) * 4.0)
    act = _ACTS[v.act]
    names = TIMM_MBCONV._replace(se=("se_early.fc1", "se_early.fc2")) if v.se_early else TIMM_MBCONV
    down = (lambda y: F.avg_pool2d(y, 2, 2)) if v.stride_pool and stride == 2 else None
    return prenorm_mbconv(m, x, cout, stride=stride, expanded=mid, squeeze=int(0.25 * (cout if v.expand_output else mid)),
                          act=act, se_act=_ACTS[v.se_act], shortcut=_shortcut(cout, stride, v.output_bias),
                          names=names, pre_act=v.pre_norm_act, down=down, se_early=v.se_early,
                          project_bias=v.output_bias, drop_path=rate)


def attention2d(m, x, cout: int, heads: int, window):
    """timm's ``Attention2d`` over the whole ``[N, C, H, W]`` map: 1x1 conv ``qkv`` packing
    ``heads x (q k v) x head_dim``, attention with the relative position bias of the
    ``H x W`` window, heads merged to channels, 1x1 conv ``proj`` to ``cout``."""
    h, w = x.shape[2], x.shape[3]
    c = heads * DIM_HEAD
    qkv = m.conv("qkv", x, 3 * c, 1, bias=True, init="xavier_uniform")
    bias = relative_position_bias(m.child("rel_pos"), window, heads, buffer=False)
    # tokens-major copies, as timm makes them: SDPA is slow on a strided head dimension
    q, k, v = rearrange(qkv, "b (h three d) y x -> three b h (y x) d", three=3, h=heads).contiguous()
    o = rearrange(m.attention(q, k, v, bias=bias), "b h (y x) d -> b (h d) y x", y=h)
    return m.conv("proj", o, cout, 1, bias=True, init="xavier_uniform")


def transformer_block(m, x, v: Variant, cout: int, stride: int, rate: float, window):
    """timm's ``TransformerBlock2d``: ``shortcut(x) + drop_path(attn(norm1(x)))``, then
    ``x + drop_path(mlp(norm2(x)))``, LayerNorm2d (eps 1e-6) and 1x1-conv MLP (ratio 4, GELU).
    A downsampling block pools after ``norm1.norm`` and in the shortcut. Keys: slot 0 / 1 the two
    residuals' stochastic depth."""
    cin = x.shape[1]
    if stride == 2:
        res = _downsample(m.child("shortcut"), x, cout, bias=v.shortcut_bias)
        n = m.child("norm1")
        y = F.avg_pool2d(n.layer_norm2d("norm", x), 2, 2)
    else:
        res, y = x, m.layer_norm2d("norm1", x)
    heads = (cout if v.expand_first else cin) // DIM_HEAD
    y = attention2d(m.child("attn"), y, cout, heads, window)
    x = res + m.drop_path(y, rate, m.key(0))
    y = m.layer_norm2d("norm2", x)
    f = m.child("mlp")
    y = f.conv("fc2", F.gelu(f.conv("fc1", y, 4 * cout, 1, bias=True, init="xavier_uniform_mlp")), cout, 1,
               bias=True, init="xavier_uniform_mlp")
    return x + m.drop_path(y, rate, m.key(1))


def stem(m, x, v: Variant):
    """3x3/2 conv, BN + act, 3x3 conv (no biases): ``[N, 3, H, W] -> [N, C, H/2, W/2]``."""
    y = m.conv_norm_act(x, v.stem_width[0], 3, conv="conv1", norm="norm1", act=_ACTS[v.act], stride=2)
    return m.conv("conv2", y, v.stem_width[1], 3)


def stage(m, x, cfg: CoAtNetConfig, i: int, rates, feat: int):
    v = VARIANTS[cfg.variant]
    s = m.child("blocks")
    for j, rate in enumerate(rates):
        stride = 2 if j == 0 else 1
        if BLOCKS[i] == "C":
            x = s.block(str(j), mbconv_block, x, v, v.embed_dim[i], stride, rate, rng=m.key(j))
        else:
            x = s.block(str(j), transformer_block, x, v, v.embed_dim[i], stride, rate, (feat, feat), rng=m.key(j))
    return x


def forward(m, cfg: CoAtNetConfig, x):
    """``x [N, C, img_size, img_size] -> logits [N, num_classes]``.

    Feature names (timm's module paths, NCHW): ``stem`` (stride 2), every block
    ``stages.{i}.blocks.{j}`` and every stage ``stages.{i}`` (strides 4, 8, 16, 32).
    Randomness: stage ``i`` uses ``fold_in(rng, i)``, its block ``j`` ``fold_in(that, j)`` (an
    MBConv's stochastic depth takes it whole; a transformer block's two residuals use its slots
    0 and 1); the head's dropout ``fold_in(rng, 4)``.
    """
    v = VARIANTS[cfg.variant]
    if x.shape[-2:] != (cfg.img_size, cfg.img_size):
        raise ValueError(f"coatnet expects {cfg.img_size}x{cfg.img_size} inputs (img_size: its relative position "
                         f"biases cover the whole map), got {x.shape[-2]}x{x.shape[-1]}")
    m.require_multiple(cfg.img_size)
    y = m.block("stem", stem, x, v)
    rates = linear_schedule(cfg.drop_path_rate, sum(v.depths))
    st = m.child("stages", rng=m.rng)
    b, feat = 0, cfg.img_size // 2
    for i, n in enumerate(v.depths):
        feat //= 2
        y = st.block(str(i), stage, y, cfg, i, rates[b:b + n], feat, rng=st.key(i))
        b += n
    if v.head_hidden_size:
        h = m.child("head")
        y = h.layer_norm2d("norm", F.adaptive_avg_pool2d(y, 1)).flatten(1)
        y = h.child("pre_logits").linear("fc", y, v.head_hidden_size).tanh()
    else:
        y = F.adaptive_avg_pool2d(m.layer_norm2d("norm", y), 1).flatten(1)
        h = m.child("head")
    y = m.dropout(y, cfg.drop_rate, m.key(4))
    return h.linear("fc", y, cfg.num_classes)


FAMILY = family("coatnet", CoAtNetConfig, forward, paper=PAPER, init_size=lambda cfg: cfg.img_size,
                max_size=lambda cfg: cfg.img_size, defaults={"conv": "goog", "linear": "torch_default"})

register("coatnet_0_224", FAMILY, params=25036820, reference=Reference("timm", "coatnet_0_224"),
         notes="Table 3 of the paper (CoAtNet-0), as timm's coatnet_0_224 (untrained there).", variant="coatnet_0")
register("coatnet_0_rw_224", FAMILY, params=27435562, reference=Reference("timm", "coatnet_0_rw_224"),
         notes="timm's CoAtNet-0 variant (sw_in1k weights).", variant="coatnet_0_rw")
