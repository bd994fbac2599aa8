"""Vision Transformer (ViT) B/16, B/32, L/16, L/32, H/14 in torchvision's layout.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (arXiv:2010.11929). The image is cut
into non-overlapping P x P patches, each linearly embedded (Eq. 1: one P x P / P convolution); a
learnable class token is put in front, learned 1-D position embeddings are added, and a stack of
pre-norm Transformer encoder blocks (Eq. 2-3: LayerNorm -> multi-head self-attention -> residual,
LayerNorm -> 2-layer GELU MLP -> residual) runs over the tokens; a final LayerNorm and a linear
head read the class token (Eq. 4). Table 1 gives the variants:

=======  ======  ======  ======  =====
model    layers  hidden  MLP     heads
=======  ======  ======  ======  =====
B        12      768     3072    12
L        24      1024    4096    16
H        32      1280    5120    16
=======  ======  ======  ======  =====

**Any input size.** torchvision's model runs only at the ``image_size`` it was built with.
Here the position embedding is stored for ``image_size`` (what checkpoints hold) and, for any
other input whose height and width are multiples of the patch size, resampled to the input's
patch grid as torchvision's ``interpolate_embeddings`` does (bicubic, ``align_corners=True``,
the class token's embedding kept): for a square size S the output equals torchvision's
``vit_b_16(image_size=S)`` loaded with ``interpolate_embeddings(S, 16, state_dict)``; a
non-square grid resamples each axis to its own length. Gradients reach the stored embedding.

State-dict names are torchvision's: ``class_token [1, 1, D]``, ``conv_proj``,
``encoder.pos_embedding [1, 1 + (S/P)^2, D]``, ``encoder.layers.encoder_layer_{i}.{ln_1,
self_attention.{in_proj_weight [3D, D], in_proj_bias, out_proj}, ln_2, mlp.{0, 3}}``,
``encoder.ln``, ``heads.head`` (and ``heads.pre_logits`` with a ``representation_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from vafunc.core.init import Initializer
from vafunc.core.kit import Scope, family
from vafunc.core.registry import Reference, check_config, register
from vafunc.models._tokens import intermediates_of, resample_position_embedding

PAPER = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words, arXiv:2010.11929"


@dataclass(frozen=True)
class ViTConfig:
    """torchvision ``VisionTransformer`` keywords (``norm_layer`` and ``conv_stem_configs``
    aside; LayerNorm eps is 1e-6). ``image_size``: the size the position embedding is stored for
    (checkpoints fix it); inputs of other sizes divisible by ``patch_size`` are accepted."""

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0
    num_classes: int = 1000
    representation_size: int | None = None
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_config(
            self,
            positive_ints=(
                "image_size",
                "patch_size",
                "num_layers",
                "num_heads",
                "hidden_dim",
                "mlp_dim",
                "num_classes",
                "in_channels",
            ),
            rates=("dropout", "attention_dropout"),
        )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        r = self.representation_size
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"representation_size must be a positive int or None, got {r!r}")
        for f in ("dropout", "attention_dropout"):
            object.__setattr__(self, f, float(getattr(self, f)))


# --------------------------------------------------------------------------- init schemes


def _xavier_uniform(fin: int, fout: int) -> tuple:
    bound = math.sqrt(6.0 / (fin + fout))
    return ("uniform", -bound, bound)


def _mlp_linear(ini: Initializer, fin: int, fout: int, bias: bool = True) -> dict:
    """torchvision's ``MLPBlock`` init: Xavier-uniform weight, normal(std 1e-6) bias."""
    p = {"weight": ini.draw(_xavier_uniform(fin, fout), (fout, fin))}
    if bias:
        p["bias"] = ini.normal((fout,), 1e-6)
    return p


def _proj_init(
    ini: Initializer, cin: int, cout: int, kernel: int | tuple[int, int], groups: int = 1, bias: bool = True
) -> dict:
    """The patch embedding: truncated normal with std ``sqrt(1 / fan_in)``, zero bias."""
    k = kernel if isinstance(kernel, int) else kernel[0]
    return ini.conv(
        cin, cout, kernel, groups=groups, bias=bias, scheme="trunc_normal", std=math.sqrt(1.0 / (cin * k * k))
    )


def _zeros(ini: Initializer, fin: int, fout: int, bias: bool = True) -> dict:
    """The classifier head without a representation layer: all zeros."""
    return {"weight": ini.zeros((fout, fin)), **({"bias": ini.zeros((fout,))} if bias else {})}


# --------------------------------------------------------------------------- the network


def position_embedding(pos: torch.Tensor, grid: tuple[int, ...], stored: int) -> torch.Tensor:
    """The stored ``[1, 1 + stored^2, D]`` embedding for a ``grid = (gh, gw)`` patch grid:
    unchanged when the grid is the stored one, else the patch part resampled bicubically
    (``align_corners=True``) to ``gh x gw``, the class token's part kept."""
    return resample_position_embedding(pos, grid, (stored, stored), 1, align_corners=True)


torch.fx.wrap("position_embedding")  # one node under FX: the grid is read off the input's shape


def self_attention(m: Scope, x: Tensor, heads: int, rate: float, d: int) -> Tensor:
    """Multi-head self-attention in ``nn.MultiheadAttention``'s layout (one fused ``[3D, D]``
    input projection, ``out_proj``): ``[N, L, D] -> [N, L, D]``; the heads attend through the
    kit's attention (fused SDPA or the math path), attention dropout at ``rate`` keyed by the
    scope's key. torch_compat's tree holds torch's ``nn.MultiheadAttention`` here."""
    w = m.param("in_proj_weight", (3 * d, d), _xavier_uniform(d, 3 * d))
    b = m.param("in_proj_bias", (3 * d,))
    qkv = m.linear_with(x.to(w.dtype), w, b)
    q, k, v = einops.rearrange(qkv, "n l (three h e) -> three n h l e", three=3, h=heads).unbind(0)
    y = m.attention(q, k, v, rate=rate, rng=m.rng)
    y = einops.rearrange(y, "n h l e -> n l (h e)")
    return m.linear("out_proj", y, d, init="torch_default_zero_bias")


def mlp(m: Scope, x: Tensor, cfg: ViTConfig) -> Tensor:
    """torchvision's ``MLPBlock``: ``0`` Linear, ``1`` GELU, ``2`` Dropout (key slot 2 of the
    scope's key), ``3`` Linear, ``4`` Dropout (slot 3)."""
    y = m.op("1", F.gelu, m.linear("0", x, cfg.mlp_dim, init=_mlp_linear), tap=False)
    y = m.linear("3", m.dropout(y, cfg.dropout, m.key(2), name="2"), cfg.hidden_dim, init=_mlp_linear)
    return m.dropout(y, cfg.dropout, m.key(3), name="4")


def encoder_block(m: Scope, x: Tensor, cfg: ViTConfig) -> Tensor:
    """torchvision's ``EncoderBlock`` (Eq. 2-3): ``x + drop(attn(ln_1 x))``, then
    ``+ mlp(ln_2 .)``; dropout keys: slot 0 attention probabilities, 1 after attention, 2 and 3
    the MLP's two dropouts."""
    d, heads, rate = cfg.hidden_dim, cfg.num_heads, cfg.attention_dropout
    y = m.layer_norm("ln_1", x, eps=1e-6)
    y = m.block(
        "self_attention",
        self_attention,
        y,
        heads,
        rate,
        d,
        tap=False,
        rng=m.key(0),
        module=(
            "MultiheadAttention",
            (("embed_dim", d), ("num_heads", heads), ("dropout", rate), ("batch_first", True)),
        ),
    )
    x = m.dropout(y, cfg.dropout, m.key(1), name="dropout") + x
    y = m.layer_norm("ln_2", x, eps=1e-6)
    return x + m.block("mlp", mlp, y, cfg, tap=False, rng=m.rng)


def encoder(m: Scope, tokens: Tensor, cfg: ViTConfig, grid: tuple[int, ...]) -> Tensor:
    """torchvision's ``Encoder``: the position embedding (resampled to the patch ``grid``),
    dropout (key slot 0), the blocks ``layers.encoder_layer_{i}`` (keys ``fold_in(rng, 1 + i)``)
    and the final LayerNorm ``ln``."""
    p, d = cfg.patch_size, cfg.hidden_dim
    pos = m.param("pos_embedding", (1, 1 + (cfg.image_size // p) ** 2, d), ("normal", 0.02), batched=True)
    t = m.dropout(tokens + position_embedding(pos, grid, cfg.image_size // p), cfg.dropout, m.key(0), name="dropout")
    t = m.block("layers", encoder_layers, t, cfg, tap=False, rng=m.rng, sequential=True)
    return m.layer_norm("ln", t, eps=1e-6)


def encoder_layers(m: Scope, t: Tensor, cfg: ViTConfig) -> Tensor:
    for i in range(cfg.num_layers):
        t = m.block(f"encoder_layer_{i}", encoder_block, t, cfg, rng=m.key(1 + i))
    return t


def heads(m: Scope, y: Tensor, cfg: ViTConfig) -> Tensor:
    """torchvision's ``heads``: ``pre_logits`` Linear and ``act`` Tanh (with a
    ``representation_size``), then ``head``."""
    if cfg.representation_size is not None:
        y = m.op(
            "act", torch.tanh, m.linear("pre_logits", y, cfg.representation_size, init=_pre_logits_init), tap=False
        )
    return m.linear("head", y, cfg.num_classes, init=_zeros)


def forward(m: Scope, cfg: ViTConfig, x: Tensor) -> Tensor:
    """``x [N, C, H, W] -> logits [N, num_classes]``, H and W multiples of ``patch_size``.

    Feature names (torchvision's module paths): ``conv_proj`` (the patch embedding, ``[N, D,
    H/P, W/P]``), every block ``encoder.layers.encoder_layer_{i}`` and ``encoder`` (after the
    final LayerNorm): tokens ``[N, 1 + HW/P^2, D]``, the class token first. Dropout keys:
    ``fold_in(rng, 0)`` after the position embedding, block ``i`` uses ``fold_in(rng, 1 + i)``
    (slots in :func:`encoder_block`).
    """
    p = cfg.patch_size
    m.require_multiple(p)
    d = cfg.hidden_dim
    cls = m.param("class_token", (1, 1, d), batched=True)
    y = m.tap("conv_proj", m.conv("conv_proj", x, d, p, stride=p, padding=0, bias=True, init=_proj_init))
    grid = y.shape[-2:]
    tokens = einops.rearrange(y, "n d h w -> n (h w) d")
    tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], 1)
    t = m.block("encoder", encoder, tokens, cfg, grid, rng=m.rng)
    return m.block("heads", heads, t[:, 0], cfg, tap=False, sequential=True)


def _pre_logits_init(ini: Initializer, fin: int, fout: int, bias: bool = True) -> dict:
    """torchvision's ``heads.pre_logits``: truncated normal with std ``sqrt(1 / fan_in)``, zero bias."""
    return {
        "weight": ini.trunc_normal((fout, fin), math.sqrt(1.0 / fin)),
        **({"bias": ini.zeros((fout,))} if bias else {}),
    }


def intermediates(model, params: dict, state: dict, x: Tensor, indices=None, **kw) -> list:
    """timm's ``forward_intermediates(..., intermediates_only=True)`` over the encoder blocks
    ``encoder.layers.encoder_layer_{i}`` (``norm=True``: the final ``encoder.ln``), the class token
    split off (:meth:`vafunc.core.registry.ModelDef.intermediates`)."""
    cfg = model.config
    return intermediates_of(
        model,
        params,
        state,
        x,
        indices,
        depth=cfg.num_layers,
        patch=cfg.patch_size,
        prefix=1,
        norm_layer=("encoder.ln", 1e-6),
        names="encoder.layers.encoder_layer_{}",
        **kw,
    )


FAMILY = family(
    "vit", ViTConfig, forward, paper=PAPER, init_size=lambda cfg: cfg.image_size, intermediates=intermediates
)

#: Table 1 of the paper, with torchvision's parameter counts (1000 classes, 224 x 224).
VARIANTS = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, params=86567656),
    "vit_b_32": dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, params=88224232),
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096, params=304326632),
    "vit_l_32": dict(patch_size=32, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096, params=306535400),
    "vit_h_14": dict(patch_size=14, num_layers=32, num_heads=16, hidden_dim=1280, mlp_dim=5120, params=632045800),
}

for _name, _v in VARIANTS.items():
    _v = dict(_v)
    _n = _v.pop("params")
    register(_name, FAMILY, params=_n, reference=Reference("torchvision", _name), **_v)
