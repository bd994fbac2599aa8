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
A BatchNorm followed by an activation (the stem's ``norm1``, the MBConvs' ``norm1``/``norm2``
and, in the rw variant, ``pre_norm``) is one module in timm (``BatchNormAct2d``): the family
declares ``norm_act``.

Init is timm's ``vit_eff``: convs of the stem and MBConvs normal with ``std = sqrt(2 /
fan_out)`` (``"goog"``), the transformer convs Xavier-uniform (MLP biases normal(0, 1e-6)), the
bias tables truncated normal(0, 0.02), the head linears torch's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core import layers as L
from vafunc.core.blocks import make_divisible
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register
from vafunc.models.maxvit import (
    TIMM_MBCONV,
    MBConv,
    downsample2d,
    linear_schedule,
    prenorm_mbconv,
    relative_position_bias,
)

PAPER = "Dai et al. 2021, CoAtNet: Marrying Convolution and Attention for All Data Sizes, arXiv:2106.04803"


class Variant(NamedTuple):
    """One row of timm's ``model_cfgs`` (the fields these two CoAtNets use)."""

    embed_dim: tuple
    depths: tuple
    stem_width: tuple
    head_hidden_size: int | None
    act: str  # MBConv activation ("gelu" / "silu")
    se_act: str
    pre_norm_act: bool
    stride_pool: bool  # timm's stride_mode "pool" (else "dw")
    expand_output: bool  # expansion (and SE width) from the output width (else the input's)
    output_bias: bool  # MBConv projection and shortcut biases
    se_early: bool
    shortcut_bias: bool  # transformer shortcut
    expand_first: bool  # attention width: the output's (else the input's)


VARIANTS = {
    "coatnet_0": Variant(
        (96, 192, 384, 768), (2, 3, 5, 2), (64, 64), 768, "gelu", "silu", False, False, True, True, False, True, True
    ),
    "coatnet_0_rw": Variant(
        (96, 192, 384, 768), (2, 3, 7, 2), (32, 64), None, "silu", "relu", True, True, False, False, True, False, False
    ),
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

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        check_config(
            self, positive_ints=("img_size", "num_classes", "in_channels"), rates=("drop_rate", "drop_path_rate")
        )
        if self.img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32 (the network's stride), got {self.img_size}")
        for f in ("drop_rate", "drop_path_rate"):
            object.__setattr__(self, f, float(getattr(self, f)))


# --------------------------------------------------------------------------- blocks


def mbconv_block(m: Scope, x: Tensor, v: Variant, cin: int, cout: int, stride: int, rate: float) -> Tensor:
    """timm's ``MbConvBlock`` (the shared :func:`~vafunc.models.maxvit.prenorm_mbconv`)."""
    mid = make_divisible((cout if v.expand_output else cin) * 4.0)
    b = MBConv(
        cin,
        cout,
        stride,
        mid,
        int(0.25 * (cout if v.expand_output else mid)),
        _ACTS[v.act],
        _ACTS[v.se_act],
        drop_path=rate,
        pre_act=v.pre_norm_act,
        stride_pool=v.stride_pool,
        se_early=v.se_early,
        bias=v.output_bias,
    )
    return prenorm_mbconv(m, x, b, TIMM_MBCONV._replace(se="se_early") if v.se_early else TIMM_MBCONV)


def attention2d(m: Scope, x: Tensor, cout: int, heads: int, window: tuple[int, int]) -> Tensor:
    """timm's ``Attention2d`` over the whole ``[N, C, H, W]`` map (``(H, W) = window``): 1x1
    conv ``qkv`` packing ``heads x (q k v) x head_dim``, attention with the relative position
    bias of the window, heads merged to channels, 1x1 conv ``proj`` to ``cout``. The bias table
    lives in ``rel_pos`` (timm's ``RelPosBias``, whose forward adds it to the attention logits;
    here the bias goes to the fused attention as its mask, so that module is never called)."""
    c = heads * DIM_HEAD
    qkv = m.conv("qkv", x, 3 * c, 1, bias=True, init="xavier_uniform")
    bias = relative_position_bias(m.child("rel_pos", module=("Holder", ())), window, heads, buffer=False)
    # tokens-major copies, as timm makes them: SDPA is slow on a strided head dimension
    q, k, v = einops.rearrange(qkv, "b (h three d) y x -> three b h (y x) d", three=3, h=heads).contiguous()
    o = einops.rearrange(m.attention(q, k, v, bias=bias), "b h (y x) d -> b (h d) y x", y=window[0])
    return m.conv("proj", o, cout, 1, bias=True, init="xavier_uniform")


def norm_down(m: Scope, x: Tensor, cin: int) -> Tensor:
    """``norm1`` of a downsampling transformer block, an ``nn.Sequential``: LayerNorm2d ``norm``
    (eps 1e-6), then timm's ``Downsample2d`` ``down`` (a 2x2/2 average pool)."""
    return m.block("down", downsample2d, m.layer_norm2d("norm", x), cin, cin, 2, False, tap=False)


def conv_mlp(m: Scope, x: Tensor, hidden: int, cout: int) -> Tensor:
    """timm's ``ConvMlp``: 1x1 conv ``fc1`` to ``hidden``, GELU ``act``, 1x1 conv ``fc2``."""
    y = m.op("act", F.gelu, m.conv("fc1", x, hidden, 1, bias=True, init="xavier_uniform_mlp"), tap=False)
    return m.conv("fc2", y, cout, 1, bias=True, init="xavier_uniform_mlp")


def transformer_block(
    m: Scope, x: Tensor, v: Variant, cin: int, cout: int, stride: int, rate: float, window: tuple[int, int]
) -> Tensor:
    """timm's ``TransformerBlock2d``: ``shortcut(x) + drop_path1(attn(norm1(x)))``, then
    ``x + drop_path2(mlp(norm2(x)))``, LayerNorm2d (eps 1e-6) and 1x1-conv MLP (ratio 4, GELU).
    A downsampling block pools after ``norm1.norm`` and in the shortcut. Keys: slot 0 / 1 the two
    residuals' stochastic depth."""
    if stride == 2:
        res = m.block("shortcut", downsample2d, x, cin, cout, 2, v.shortcut_bias, tap=False)
        y = m.block("norm1", norm_down, x, cin, tap=False, sequential=True)
    else:
        res, y = x, m.layer_norm2d("norm1", x)
    heads = (cout if v.expand_first else cin) // DIM_HEAD
    y = m.block("attn", attention2d, y, cout, heads, window, tap=False)
    x = res + m.drop_path(y, rate, m.key(0), name="drop_path1")
    y = m.block("mlp", conv_mlp, m.layer_norm2d("norm2", x), 4 * cout, cout, tap=False)
    return x + m.drop_path(y, rate, m.key(1), name="drop_path2")


def stem(m: Scope, x: Tensor, v: Variant) -> Tensor:
    """3x3/2 conv, BN + act (timm's ``BatchNormAct2d``), 3x3 conv (no biases):
    ``[N, 3, H, W] -> [N, C, H/2, W/2]``."""
    y = m.conv_norm_act(x, v.stem_width[0], 3, conv="conv1", norm="norm1", act=_ACTS[v.act], stride=2)
    return m.conv("conv2", y, v.stem_width[1], 3)


def stage(m: Scope, x: Tensor, cfg: CoAtNetConfig, i: int, rates: tuple, feat: int) -> Tensor:
    """timm's ``MaxxVitStage`` ``i``: its blocks in the ``nn.Sequential`` ``blocks``."""
    return m.block("blocks", stage_blocks, x, cfg, i, rates, feat, tap=False, rng=m.rng)


def stage_blocks(m: Scope, x: Tensor, cfg: CoAtNetConfig, i: int, rates: tuple, feat: int) -> Tensor:
    """The blocks of stage ``i`` (MBConvs in S1-S2, transformer blocks in S3-S4 over the
    ``feat x feat`` map), the first with stride 2; block ``j`` gets the key ``fold_in(rng, j)``."""
    v = VARIANTS[cfg.variant]
    cout = v.embed_dim[i]
    for j, rate in enumerate(rates):
        cin, stride = (v.embed_dim[i - 1] if i else v.stem_width[1], 2) if j == 0 else (cout, 1)
        if BLOCKS[i] == "C":
            x = m.block(str(j), mbconv_block, x, v, cin, cout, stride, rate, rng=m.key(j))
        else:
            x = m.block(str(j), transformer_block, x, v, cin, cout, stride, rate, (feat, feat), rng=m.key(j))
    return x


def stages(m: Scope, x: Tensor, cfg: CoAtNetConfig) -> Tensor:
    """timm's ``stages``: stage ``i`` at ``i`` with the key ``fold_in(rng, i)``."""
    v = VARIANTS[cfg.variant]
    rates = linear_schedule(cfg.drop_path_rate, sum(v.depths))
    b, feat = 0, cfg.img_size // 2
    for i, n in enumerate(v.depths):
        feat //= 2
        x = m.block(str(i), stage, x, cfg, i, tuple(rates[b : b + n]), feat, rng=m.key(i))
        b += n
    return x


def pre_logits(m: Scope, x: Tensor, hidden: int) -> Tensor:
    """timm's ``pre_logits``, an ``nn.Sequential``: Linear ``fc``, Tanh ``act``."""
    return m.op("act", torch.tanh, m.linear("fc", x, hidden), tap=False)


def norm_mlp_head(m: Scope, x: Tensor, hidden: int, num_classes: int, rate: float) -> Tensor:
    """timm's ``NormMlpClassifierHead`` (the paper's head): average pool ``global_pool``,
    LayerNorm2d ``norm``, ``flatten``, ``pre_logits``, dropout ``drop`` (the scope's key), Linear
    ``fc``. ``[N, C, H, W] -> [N, num_classes]``."""
    y = m.layer_norm2d("norm", m.op("global_pool", F.adaptive_avg_pool2d, x, 1, tap=False))
    y = m.op("flatten", torch.flatten, y, 1, tap=False)
    y = m.block("pre_logits", pre_logits, y, hidden, tap=False, sequential=True)
    return m.linear("fc", m.dropout(y, rate, m.rng, name="drop"), num_classes)


def classifier_head(m: Scope, x: Tensor, num_classes: int, rate: float) -> Tensor:
    """timm's ``ClassifierHead``: average pool and flatten ``global_pool``, dropout ``drop`` (the
    scope's key), Linear ``fc``. ``[N, C, H, W] -> [N, num_classes]``."""
    y = m.op("global_pool", L.global_avg_pool, x, tap=False)
    return m.linear("fc", m.dropout(y, rate, m.rng, name="drop"), num_classes)


def forward(m: Scope, cfg: CoAtNetConfig, x: Tensor) -> Tensor:
    """``x [N, C, img_size, img_size] -> logits [N, num_classes]``.

    Feature names (timm's module paths, NCHW): ``stem`` (stride 2), every block
    ``stages.{i}.blocks.{j}`` and every stage ``stages.{i}`` (strides 4, 8, 16, 32).
    Randomness: stage ``i`` uses ``fold_in(rng, i)``, its block ``j`` ``fold_in(that, j)`` (an
    MBConv's stochastic depth takes it whole; a transformer block's two residuals use its slots
    0 and 1); the head's dropout ``fold_in(rng, 4)``.
    """
    v = VARIANTS[cfg.variant]
    # the size probe (min_size); apply's inputs are checked by the model (multiple and maximum: img_size)
    if m.initializing and x.shape[-2:] != (cfg.img_size, cfg.img_size):
        raise ValueError(
            f"coatnet expects {cfg.img_size}x{cfg.img_size} inputs (img_size: its relative position "
            f"biases cover the whole map), got {x.shape[-2]}x{x.shape[-1]}"
        )
    m.require_multiple(cfg.img_size)
    y = m.block("stem", stem, x, v)
    y = m.block("stages", stages, y, cfg, tap=False, rng=m.rng)
    if v.head_hidden_size:
        return m.block(
            "head", norm_mlp_head, y, v.head_hidden_size, cfg.num_classes, cfg.drop_rate, tap=False, rng=m.key(4)
        )
    y = m.layer_norm2d("norm", y)
    return m.block("head", classifier_head, y, cfg.num_classes, cfg.drop_rate, tap=False, rng=m.key(4))


#: timm's layout: each BatchNorm with an activation is one module (``BatchNormAct2d``)
FAMILY = family(
    "coatnet",
    CoAtNetConfig,
    forward,
    paper=PAPER,
    init_size=lambda cfg: cfg.img_size,
    max_size=lambda cfg: cfg.img_size,
    defaults={"conv": "goog", "linear": "torch_default", "norm_act": True},
)

register(
    "coatnet_0_224",
    FAMILY,
    params=25036820,
    reference=Reference("timm", "coatnet_0_224"),
    notes="Table 3 of the paper (CoAtNet-0), as timm's coatnet_0_224 (untrained there).",
    variant="coatnet_0",
)
register(
    "coatnet_0_rw_224",
    FAMILY,
    params=27435562,
    reference=Reference("timm", "coatnet_0_rw_224"),
    notes="timm's CoAtNet-0 variant (sw_in1k weights).",
    variant="coatnet_0_rw",
)
