"""The Vision Transformers researchers fine-tune today, in timm's layouts: DeiT / DeiT III, DINOv2
(with and without registers), the CLIP and SigLIP image towers and EVA-02, as one family.

All are Dosovitskiy et al.'s ViT (arXiv:2010.11929: patch embedding, learned position embedding,
pre-norm blocks of multi-head self-attention and an MLP), configured by what each paper changed:

* **DeiT** (Touvron et al. 2021, arXiv:2012.12877): a distillation token beside the class token,
  read by a second head; at inference the two heads' logits are averaged (Sec. 4).
* **DeiT III** (Touvron et al. 2022, arXiv:2204.07118) and **DINOv2** (Oquab et al. 2023,
  arXiv:2304.07193): layer scale (CaiT's per-channel factor on each residual branch); DeiT III
  adds the position embedding to the patch tokens only; DINOv2's giant uses a SwiGLU MLP
  (Shazeer 2020), packed in one ``fc1`` as timm's ``GluMlp``.
* **Registers** (Darcet et al. 2024, arXiv:2309.16588): extra learned tokens after the class
  token, without position embedding, dropped at the output.
* **CLIP** (Radford et al. 2021, arXiv:2103.00020): a LayerNorm before the blocks (``norm_pre``), a
  patch embedding without bias, LayerNorm eps 1e-5; OpenAI's checkpoints use QuickGELU
  (``x * sigmoid(1.702 x)``).
* **SigLIP** (Zhai et al. 2023, arXiv:2303.15343): no class token; the image embedding is an
  attention-pooling head (one learned latent query attending over the patch tokens, then an
  MLP: timm's ``AttentionPoolLatent``), or the patch tokens' average (the ``gap`` variant).
* **EVA-02** (Fang et al. 2023, arXiv:2303.11331): 2-D rotary position embedding (RoPE) on the
  patch tokens' queries and keys, SwiGLU MLP (packed ``fc1`` for tiny and small; separate
  ``fc1_g``/``fc1_x`` with a LayerNorm inside, "sub-LN", for base and large, which also have
  separate ``q_proj``/``k_proj``/``v_proj``), average pooling with ``fc_norm``.

**Any input size**, as timm's ``dynamic_img_size=True``: heights and widths are multiples of the
patch size; the position embedding stored for ``img_size`` is resampled to the input's patch grid
as timm's ``resample_abs_pos_embed`` does (bicubic, antialiased, ``align_corners=False``, prefix
tokens' entries kept), and EVA-02's rotary embedding is built for the grid (its coordinates
rescaled to the pre-training grid ``ref_feat_shape``, as timm does).

State-dict names and order are timm's (``cls_token``, ``reg_token``, ``pos_embed``, ``dist_token``,
``patch_embed.proj``, ``norm_pre``, ``blocks.{i}.{norm1, attn.{qkv | q_bias, v_bias, qkv |
q_proj, k_proj, v_proj}, proj}, ls1.gamma, norm2, mlp.{fc1 | fc1_g, fc1_x, norm}, fc2}, ls2.gamma}``,
``norm``, ``attn_pool.{latent, q, kv, proj, norm, mlp}``, ``fc_norm``, ``head``, ``head_dist``).
Heads follow timm's defaults: DINOv2, SigLIP and the EVA-02 pre-training checkpoints have
``num_classes=0`` (the pooled features are the output), the CLIP towers a linear head.
:func:`intermediates` is timm's ``forward_intermediates(..., intermediates_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register
from vafunc.models._tokens import intermediates_of, rope_apply, rope_embedding, timm_position_embedding

PAPER = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words, arXiv:2010.11929 (timm's ViT / EVA layouts)"

LAYOUTS = ("vit", "eva")  # timm's VisionTransformer (and VisionTransformerDistilled), timm's Eva
POOLS = ("token", "avg", "map")
MLPS = ("mlp", "glu", "swiglu")  # Mlp; GluMlp / SwiGLUPacked (one fc1, SiLU gate first); SwiGLU (fc1_g, fc1_x)
# one FX node each: they read the patch grid off the tensor's shape
torch.fx.wrap("timm_position_embedding")
torch.fx.wrap("rope_embedding")

ACTS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu}


@dataclass(frozen=True)
class TimmViTConfig:
    """timm's ``VisionTransformer`` / ``Eva`` keywords (their names), plus ``layout`` (which of the
    two module layouts), ``distilled`` (DeiT's distillation token and ``head_dist``), ``norm_eps``
    (timm's ``LayerNorm`` 1e-6, CLIP's 1e-5), ``act`` (the MLP activation) and ``mlp`` (``"mlp"``,
    ``"glu"`` packed SwiGLU, ``"swiglu"`` split SwiGLU with ``scale_mlp``'s sub-LN). ``img_size``
    is the size the position embedding is stored for; any multiple of ``patch_size`` runs."""

    layout: str = "vit"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qkv_fused: bool = True
    init_values: float | None = None
    class_token: bool = True
    reg_tokens: int = 0
    distilled: bool = False
    no_embed_class: bool = False
    pre_norm: bool = False
    fc_norm: bool | None = None
    norm_eps: float = 1e-6
    act: str = "gelu"
    mlp: str = "mlp"
    scale_mlp: bool = False
    rope: bool = False
    ref_feat_shape: int | None = None
    rope_temperature: float = 10000.0
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        check_config(
            self,
            positive_ints=("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"),
            rates=("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"),
            bools=(
                *("qkv_bias", "qkv_fused", "class_token", "distilled"),
                *("no_embed_class", "pre_norm", "scale_mlp", "rope"),
            ),
        )
        for f, allowed in (("layout", LAYOUTS), ("global_pool", POOLS), ("mlp", MLPS), ("act", tuple(ACTS))):
            if getattr(self, f) not in allowed:
                raise ValueError(f"{f} must be one of {allowed}, got {getattr(self, f)!r}")
        for f in ("num_classes", "reg_tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative int, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' reads the class token: class_token must be True")
        if self.distilled and (self.layout != "vit" or self.global_pool != "token" or self.reg_tokens):
            raise ValueError("distilled (DeiT's distillation token) needs layout 'vit', pool 'token', no reg_tokens")
        if self.layout == "eva" and (self.init_values is not None or self.pre_norm):
            raise ValueError("layout='eva' here covers EVA-02 (no layer scale, no pre-norm)")
        if self.layout == "vit" and (self.rope or not self.qkv_fused or self.scale_mlp or self.mlp == "swiglu"):
            raise ValueError("rope, qkv_fused=False, scale_mlp and mlp='swiglu' are EVA's (layout='eva')")
        if self.rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"rope needs a head width divisible by 4, got {self.embed_dim // self.num_heads}")
        if self.fc_norm is not None and not isinstance(self.fc_norm, bool):
            raise TypeError(f"fc_norm must be a bool or None, got {self.fc_norm!r}")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patch tokens: class, distillation and register tokens."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        """timm: the final norm moves after the pooling (``fc_norm``) for average pooling by default."""
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm


# --------------------------------------------------------------------------- the blocks


def attention(m: Scope, x: Tensor, cfg: TimmViTConfig, sin: Tensor | None, cos: Tensor | None) -> Tensor:
    """Multi-head self-attention ``[N, L, D] -> [N, L, D]`` (timm's ``Attention`` / ``EvaAttention``):
    a fused ``qkv`` projection (EVA-02 tiny/small: without bias, its bias the parameters ``q_bias``
    and ``v_bias`` with a zero key bias) or ``q_proj``/``k_proj``/``v_proj``; RoPE on the patch
    tokens' queries and keys; the kit's attention (dropout: slot 0 of the scope's key); ``proj``
    and its dropout (slot 1)."""
    d, heads = cfg.embed_dim, cfg.num_heads
    if not cfg.qkv_fused:
        q, k, v = (
            einops.rearrange(m.linear(n, x, d, bias=b), "n l (h e) -> n h l e", h=heads)
            for n, b in (("q_proj", cfg.qkv_bias), ("k_proj", False), ("v_proj", cfg.qkv_bias))
        )
    else:
        if cfg.layout == "eva" and cfg.qkv_bias:  # timm's EvaAttention: q/v biases of its own, k's zero
            # (biases of the [N, L, 3D] product: under a per-sample tape or members mode they get a batch axis)
            qb, vb = m.param("q_bias", (d,), batched=x.dim()), m.param("v_bias", (d,), batched=x.dim())
            c = m.child("qkv", module=("Linear", (("in_features", d), ("out_features", 3 * d), ("bias", False))))
            w = c.param("weight", (3 * d, d), ("trunc_normal", 0.02))
            qkv = m.linear_with(x, w, torch.cat((qb, torch.zeros_like(qb), vb), -1))
        else:
            qkv = m.linear("qkv", x, 3 * d, bias=cfg.qkv_bias)
        q, k, v = einops.rearrange(qkv, "n l (three h e) -> three n h l e", three=3, h=heads).unbind(0)
    if sin is not None:
        n = cfg.num_prefix_tokens
        q = torch.cat([q[:, :, :n], rope_apply(q[:, :, n:], sin, cos)], 2).type_as(v)
        k = torch.cat([k[:, :, :n], rope_apply(k[:, :, n:], sin, cos)], 2).type_as(v)
    y = m.attention(q, k, v, rate=cfg.attn_drop_rate, rng=m.key(0))
    y = m.linear("proj", einops.rearrange(y, "n h l e -> n l (h e)"), d)
    return m.dropout(y, cfg.proj_drop_rate, m.key(1), name="proj_drop")


def mlp(m: Scope, x: Tensor, cfg: TimmViTConfig, hidden: int, act: str, out: int) -> Tensor:
    """timm's ``Mlp`` (``fc1``, activation, ``fc2``), ``GluMlp`` (one ``fc1`` of 2 x the gated
    width, ``silu(first half) * second half``) or ``SwiGLU`` (``fc1_g``, ``fc1_x``, the sub-LN
    ``norm`` with ``scale_mlp``); dropouts ``drop1``/``drop2`` at slots 0 and 1 of the scope's key."""
    rate = cfg.proj_drop_rate
    if cfg.mlp == "mlp" or out != cfg.embed_dim:  # (the attention pool's MLP is a plain one)
        y = ACTS[act](m.linear("fc1", x, hidden))
    elif cfg.mlp == "glu":
        g, y = m.linear("fc1", x, hidden).chunk(2, -1)
        y = F.silu(g) * y
    else:
        y = F.silu(m.linear("fc1_g", x, hidden)) * m.linear("fc1_x", x, hidden)
    y = m.dropout(y, rate, m.key(0), name="drop1")
    if cfg.scale_mlp:
        y = m.layer_norm("norm", y, eps=cfg.norm_eps)
    return m.dropout(m.linear("fc2", y, out), rate, m.key(1), name="drop2")


def _gamma(m: Scope, y: Tensor, d: int, value: float) -> Tensor:
    """timm's ``LayerScale`` (CaiT, Sec. 2.1): ``y * gamma``, ``gamma [D]``."""
    return y * m.layer_scale("gamma", d, value, shape=(d,), ndim=y.dim())


def block(m: Scope, x: Tensor, cfg: TimmViTConfig, sin: Tensor | None, cos: Tensor | None, drop_path: float) -> Tensor:
    """timm's pre-norm ``Block`` / ``EvaBlock``: ``x + drop_path(ls1(attn(norm1 x)))``, then the
    same with ``norm2``/``mlp``/``ls2``. Keys: slot 0 the attention's, 1 the MLP's, 2 and 3 the
    two drop paths."""
    d, eps = cfg.embed_dim, cfg.norm_eps
    y = m.block("attn", attention, m.layer_norm("norm1", x, eps=eps), cfg, sin, cos, tap=False, rng=m.key(0))
    if cfg.init_values is not None:
        y = m.block("ls1", _gamma, y, d, cfg.init_values, tap=False)
    x = x + m.drop_path(y, drop_path, m.key(2), name="drop_path1")
    hidden = int(d * cfg.mlp_ratio) * (2 if cfg.layout == "eva" and cfg.mlp == "glu" else 1)
    y = m.block("mlp", mlp, m.layer_norm("norm2", x, eps=eps), cfg, hidden, cfg.act, d, tap=False, rng=m.key(1))
    if cfg.init_values is not None:
        y = m.block("ls2", _gamma, y, d, cfg.init_values, tap=False)
    return x + m.drop_path(y, drop_path, m.key(3), name="drop_path2")


def blocks(m: Scope, t: Tensor, cfg: TimmViTConfig, sin: Tensor | None, cos: Tensor | None) -> Tensor:
    """``blocks.{i}``, block ``i`` keyed by slot ``i``; stochastic depth rising linearly to
    ``drop_path_rate`` (timm's rule)."""
    rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.drop_path_rate else [0.0] * cfg.depth
    for i in range(cfg.depth):
        t = m.block(str(i), block, t, cfg, sin, cos, rates[i], rng=m.key(i))
    return t


def attention_pool(m: Scope, x: Tensor, cfg: TimmViTConfig) -> Tensor:
    """SigLIP's head, timm's ``AttentionPoolLatent``: a learned ``latent [1, 1, D]`` query
    (projected by ``q``) attends over the tokens (``kv``), then ``proj`` and a residual MLP
    (``x + mlp(norm x)``): ``[N, L, D] -> [N, D]``."""
    d, heads = cfg.embed_dim, cfg.num_heads
    latent = m.param("latent", (1, 1, d), ("trunc_normal", d**-0.5), batched=True)
    q = einops.rearrange(m.linear("q", latent.expand(x.shape[0], -1, -1), d), "n l (h e) -> n h l e", h=heads)
    k, v = einops.rearrange(m.linear("kv", x, 2 * d), "n l (two h e) -> two n h l e", two=2, h=heads).unbind(0)
    y = m.linear("proj", einops.rearrange(m.attention(q, k, v), "n h l e -> n l (h e)"), d)
    z = m.layer_norm("norm", y, eps=cfg.norm_eps)
    y = y + m.block("mlp", mlp, z, cfg, int(d * cfg.mlp_ratio), "gelu", d, tap=False)
    return y[:, 0]


def patch_embed(m: Scope, x: Tensor, cfg: TimmViTConfig) -> Tensor:
    """timm's ``PatchEmbed`` with ``dynamic_img_size``: ``proj`` (a P x P / P conv, no bias under
    CLIP's pre-norm) to ``[N, H/P, W/P, D]`` (NHWC)."""
    p = cfg.patch_size
    y = m.conv("proj", x, cfg.embed_dim, p, stride=p, padding=0, bias=not cfg.pre_norm)
    return einops.rearrange(y, "n d h w -> n h w d")


# --------------------------------------------------------------------------- the network


def forward(m: Scope, cfg: TimmViTConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> [N, num_classes]`` (``num_classes=0``: the pooled ``[N, D]`` features).

    Feature names (timm's module paths): ``patch_embed`` (NHWC, as timm's dynamic-size patch
    embedding), ``norm_pre`` (CLIP), every block ``blocks.{i}`` (tokens ``[N, L, D]``, prefix tokens
    first), ``norm``, ``attn_pool``, ``fc_norm`` where the model has them. Keys: slot 0 the
    position-embedding dropout, 1 the blocks (block ``i``: slot ``i`` of that), 2 the head dropout
    (3 the distillation head's).
    """
    p, d, n = cfg.patch_size, cfg.embed_dim, cfg.num_prefix_tokens
    m.require_multiple(p)
    stored = cfg.img_size // p
    cls = m.param("cls_token", (1, 1, d), ("normal", 1e-6), batched=True) if cfg.class_token else None
    reg = m.param("reg_token", (1, cfg.reg_tokens, d), ("normal", 1e-6), batched=True) if cfg.reg_tokens else None
    pos_len = stored * stored + (0 if cfg.no_embed_class else n)
    pos = m.param("pos_embed", (1, pos_len, d), ("trunc_normal", 0.02), batched=True)
    dist = m.param("dist_token", (1, 1, d), ("trunc_normal", 0.02), batched=True) if cfg.distilled else None
    y = m.block("patch_embed", patch_embed, x, cfg)
    pe = timm_position_embedding(pos, y, stored, 0 if cfg.no_embed_class else n)
    tokens = einops.rearrange(y, "n h w d -> n (h w) d")
    prefix = [t.expand(tokens.shape[0], -1, -1) for t in (cls, dist, reg) if t is not None]
    if cfg.no_embed_class:
        t = torch.cat([*prefix, tokens + pe], 1) if prefix else tokens + pe
    else:
        t = torch.cat([*prefix, tokens], 1) + pe
    t = m.dropout(t, cfg.pos_drop_rate, m.key(0), name="pos_drop")
    sin = cos = None
    if cfg.rope:  # (two tensors, not a tuple: torch_compat's blocks compare their arguments)
        sin, cos = rope_embedding(y, d // cfg.num_heads, cfg.ref_feat_shape, cfg.rope_temperature)
    if cfg.pre_norm:
        t = m.tap("norm_pre", m.layer_norm("norm_pre", t, eps=cfg.norm_eps))
    t = m.block("blocks", blocks, t, cfg, sin, cos, tap=False, rng=m.key(1))
    if not cfg.use_fc_norm:
        t = m.tap("norm", m.layer_norm("norm", t, eps=cfg.norm_eps))
    if cfg.global_pool == "map":
        y = m.block("attn_pool", attention_pool, t[:, n:], cfg)
    elif cfg.global_pool == "avg":
        y = t[:, n:].mean(1)
    else:
        y = t[:, 0]
    if cfg.use_fc_norm:
        y = m.tap("fc_norm", m.layer_norm("fc_norm", y, eps=cfg.norm_eps))
    if cfg.distilled:  # DeiT: the class and distillation heads averaged (timm, unless distilled_training)
        y = m.dropout(y, cfg.drop_rate, m.key(2), name="head_drop")
        yd = m.dropout(t[:, 1], cfg.drop_rate, m.key(3), name="head_drop")
        if not cfg.num_classes:
            return (y + yd) / 2
        return (m.linear("head", y, cfg.num_classes) + m.linear("head_dist", yd, cfg.num_classes)) / 2
    y = m.dropout(y, cfg.drop_rate, m.key(2), name="head_drop")
    if cfg.num_classes:
        return m.linear("head", y, cfg.num_classes)
    # timm's nn.Identity head: the slot a linear probe is put in (torch_compat: ``m.head = nn.Linear(...)``)
    return m.block("head", _features_out, y, tap=False, module=("Identity", ()))


def _features_out(m: Scope, y: Tensor) -> Tensor:
    return y


def _norm(cfg: TimmViTConfig) -> tuple[str, float] | None:
    """The final norm ``forward_intermediates(norm=True)`` applies (None: timm's ``nn.Identity``)."""
    return None if cfg.use_fc_norm else ("norm", cfg.norm_eps)


FAMILY = family(
    "timm_vit",
    TimmViTConfig,
    forward,
    paper=PAPER,
    init_size=lambda cfg: cfg.img_size,
    defaults={"linear": ("trunc_normal", 0.02), "conv": "kaiming_fan_in_uniform"},
    in_channels=lambda cfg: cfg.in_chans,
    intermediates=lambda model, *a, **kw: intermediates_of(
        model,
        *a,
        depth=model.config.depth,
        patch=model.config.patch_size,
        prefix=model.config.num_prefix_tokens,
        norm_layer=_norm(model.config),
        **kw,
    ),
)

# --------------------------------------------------------------------------- the variants

_DEIT3 = dict(no_embed_class=True, init_values=1e-6)
_DINO = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0)
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp="glu")
_REG = dict(reg_tokens=4, no_embed_class=True)
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_SIGLIP = dict(class_token=False, num_classes=0)
_EVA = dict(layout="eva", patch_size=14, global_pool="avg", num_classes=0, mlp_ratio=4 * 2 / 3)
_EVA.update(rope=True, ref_feat_shape=16)
_EVA_BL = dict(qkv_fused=False, mlp="swiglu", scale_mlp=True)
_S, _B, _L = dict(embed_dim=384, num_heads=6), dict(), dict(embed_dim=1024, depth=24, num_heads=16)

#: timm's builders' arguments, with timm's parameter counts (``timm.create_model(name)``)
VARIANTS = {
    "deit_tiny_patch16_224": (dict(embed_dim=192, num_heads=3), 5717416),
    "deit_small_patch16_224": (_S, 22050664),
    "deit_base_patch16_224": (_B, 86567656),
    "deit_base_distilled_patch16_224": (dict(distilled=True), 87338192),
    "deit3_small_patch16_224": ({**_S, **_DEIT3}, 22059496),
    "deit3_base_patch16_224": (_DEIT3, 86585320),
    "vit_small_patch14_dinov2": ({**_DINO, **_S}, 22056192),
    "vit_base_patch14_dinov2": (_DINO, 86579712),
    "vit_large_patch14_dinov2": ({**_DINO, **_L}, 304367616),
    "vit_giant_patch14_dinov2": ({**_DINO, **_GIANT}, 1136479232),
    "vit_small_patch14_reg4_dinov2": ({**_DINO, **_S, **_REG}, 22057344),
    "vit_base_patch14_reg4_dinov2": ({**_DINO, **_REG}, 86582016),
    "vit_large_patch14_reg4_dinov2": ({**_DINO, **_L, **_REG}, 304370688),
    "vit_giant_patch14_reg4_dinov2": ({**_DINO, **_GIANT, **_REG}, 1136483840),
    "vit_base_patch16_clip_224": (_CLIP, 86568424),
    "vit_base_patch16_clip_quickgelu_224": ({**_CLIP, "act": "quick_gelu", "num_classes": 512}, 86193152),
    "vit_large_patch14_clip_224": ({**_CLIP, **_L, "patch_size": 14}, 304204776),
    "vit_base_patch16_siglip_224": ({**_SIGLIP, "global_pool": "map"}, 92884224),
    "vit_base_patch16_siglip_gap_224": ({**_SIGLIP, "global_pool": "avg", "fc_norm": False}, 85797120),
    "vit_so400m_patch14_siglip_224": (
        {
            **_SIGLIP,
            "global_pool": "map",
            "patch_size": 14,
            "embed_dim": 1152,
            "depth": 27,
            "num_heads": 16,
            "mlp_ratio": 3.7362,
        },
        427680704,
    ),
    "eva02_tiny_patch14_224": ({**_EVA, "embed_dim": 192, "num_heads": 3, "mlp": "glu"}, 5502144),
    "eva02_small_patch14_224": ({**_EVA, **_S, "mlp": "glu"}, 21621120),
    "eva02_base_patch14_224": ({**_EVA, **_EVA_BL}, 85758720),
    "eva02_large_patch14_224": ({**_EVA, **_EVA_BL, **_L}, 303268800),
}

for _name, (_kw, _n) in VARIANTS.items():
    register(_name, FAMILY, params=_n, reference=Reference("timm", _name, (("dynamic_img_size", True),)), **_kw)
