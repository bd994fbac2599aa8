"""Member-batched lowerings: all members of a stacked ensemble in one forward pass.

``ensemble_apply(method="batched")`` runs the family's forward once with the kit in *members
mode* (``Ctx.members = N``): activations carry the members in the batch axis, ``[N * B, C, H,
W]`` (member ``i`` owns rows ``i*B .. i*B + B - 1``), so every parameter-free op (activations,
pools, residual sums, concatenations, channel shuffles) runs once for all members with no change
to the family's code. Only the kit's parameterised layers see the member axis of their stacked
weights ``[N, ...]``, and each picks a lowering by the layer's shape (chosen by measurement; see
benchmarks/README.md for the
figures):

* conv on a 1x1 map whose padding leaves only the kernel's centre tap: a batched matrix product
  over members of the centre tap (one ninth of a 3x3 conv's work);
* conv with an output of at most 2x2 positions (``groups=1``): unfold + batched matrix product;
* 1x1 conv at stride 1 (any map): a batched matrix product;
* other convs: one grouped convolution with ``N * groups`` groups (members moved into the
  channels and back);
* the first conv of the network when every member sees the same input: one convolution with the
  members' ``N * Cout`` filters stacked (torch's own conv, the input read once);
* linear: batched matrix product; BatchNorm: per-member statistics over each member's rows (eval:
  one fused scale-and-shift; train: the single-model BatchNorm with the members as ``N * C``
  channels, so each member's statistics and running-statistic update are torch's kernel's);
  LayerNorm / GroupNorm: torch's kernel without affine, then the members' affine parameters;
* dropout and stochastic depth: each member's mask drawn from its own key with the member's own
  batch shape, so the masks are the loop's.

Bare parameters that broadcast over the batch (``m.param(..., batched=)``: class, register and
distillation tokens, position embeddings, a ViT's biases) and layer scales become per-row tensors
``[N*B, ...]`` (:func:`per_row`), so ViTs run in members mode with the family's code unchanged.
Families that use other bare parameters directly (relative position tables, a weight the family
slices) are not covered: :func:`covers` says so, and ``ensemble_apply`` takes the loop for them.
Results equal the loop's up to float rounding (different kernels sum in other orders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vafunc.core import layers as L
from vafunc.core import random as vrandom
from vafunc.core._pairs import pair
from vafunc.core.backends import Plain

_EMPTY: dict = {}

__all__ = [
    "Members",
    "NotCovered",
    "conv",
    "linear",
    "batch_norm",
    "affine",
    "dropout",
    "drop_path",
    "covers",
    "prefer",
    "per_row",
]

#: ``method="auto"``: members mode where each member's batch holds at most this many pixels
#: (``B * H * W``: where per-op cost, not arithmetic, dominates a member's pass), the loop above
#: it: above it large stacked activations leave the cache, where each member's own pass keeps
#: its activations. Compiled with frozen weights (:data:`COMPILED_MAX_PIXELS`) members mode pays
#: off up to larger batches, and loses at 224. The measurements behind both thresholds: see benchmarks/README.md.
EAGER_MAX_PIXELS = 2**14
COMPILED_MAX_PIXELS = 2**15


class NotCovered(Exception):
    """A layer the members mode has no lowering for (the caller falls back to the loop)."""


def enter(x, n: int, taps, shared_input: bool):
    """The members-mode input and the ``shared`` pair of :class:`vafunc.core.kit.Ctx`: a ``[B]`` batch
    every member shares (``shared_input``) becomes the ``[N*B]`` one; else ``x`` is ``[N*B]``."""
    if taps is not None:
        raise ValueError("features are not available in members mode (use the loop)")
    if not shared_input:
        if x.shape[0] % n:
            raise ValueError(f"members mode needs N*B rows, got {x.shape[0]} for {n} members")
        return x, None
    big = x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])
    return big, (big, x)


#: above this many output positions a conv runs member by member (grouped convolutions win on
#: small maps, where one call amortises the per-call cost; on large maps the members' convs cost
#: what the loop's do and the grouped layout's two transposes are pure overhead)
_GROUPED_MAX_POSITIONS = 64


def _members_first(y: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, N * C, ...]`` -> ``[N * B, C, ...]``."""
    b = y.shape[0]
    return y.view(b, n, -1, *y.shape[2:]).transpose(0, 1).reshape(n * b, -1, *y.shape[2:])


class _Tap(torch.autograd.Function):
    """One tap of every kernel, ``w [N, Cout, Cin, kh, kw] -> [N, Cout, Cin]`` (contiguous), whose
    backward writes the full kernel gradient in one pass, the taps' gradient times a one-hot
    vector; the gradient of an indexing op is a zero-fill and a strided scatter, two passes over
    16 members' kernels (151 MB a layer for resnet18's layer4). Works under ``torch.func``
    transforms (generated vmap rule, explicit jvp) and ``torch.compile``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w, index: int):
        return w.flatten(3)[..., index].contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, index = inputs
        ctx.shape, ctx.index = w.shape, index

    @staticmethod
    def backward(ctx, g):
        onehot = torch.zeros(ctx.shape[-2] * ctx.shape[-1], dtype=g.dtype, device=g.device)
        onehot[ctx.index] = 1
        # g arrives transposed from bmm's backward: made contiguous first (a ninth of the output's
        # size) so that the gradient is, and the optimizer's fused pass can take it
        return (g.contiguous().unsqueeze(-1) * onehot).view(g.shape + ctx.shape[-2:]), None

    @staticmethod
    def jvp(ctx, w_t, _):
        return w_t.flatten(-2)[..., ctx.index].contiguous()


def conv(x, w, b, stride, padding, dilation, groups, n: int, shared: bool = False):
    """Conv of ``x [N*B, Cin, H, W]`` (or, with ``shared``, one ``[B, Cin, H, W]`` every member
    sees) with member weights ``w [N, Cout, Cin/groups, kh, kw]``, bias ``[N, Cout]``."""
    cout, k = w.shape[1], tuple(w.shape[3:])
    stride, dilation = pair(stride), pair(dilation)
    if isinstance(padding, str):
        raise NotCovered("string padding")
    padding = pair(padding)
    nb, cin, h, wd = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    if ho * wo > _GROUPED_MAX_POSITIONS:
        # large maps: each member's own conv on its rows (the loop's kernel; one copy joins them)
        bs = [None] * n if b is None else b.unbind(0)
        xs = [x] * n if shared else x.split(nb // n)
        return torch.cat(
            [F.conv2d(xi, wi, bi, stride, padding, dilation, groups) for xi, wi, bi in zip(xs, w.unbind(0), bs)]
        )
    if shared:  # one conv with every member's filters: [B, N*Cout, H', W'] -> members first
        y = F.conv2d(
            x, w.reshape(n * cout, *w.shape[2:]), None if b is None else b.reshape(-1), stride, padding, dilation
        )
        return _members_first(y, n)
    bsz = nb // n
    if groups == 1:
        if (
            h == wd == 1
            and ho == wo == 1
            and padding[0] >= k[0] // 2
            and padding[1] >= k[1] // 2
            and k[0] % 2
            and k[1] % 2
            and padding[0] - (k[0] // 2) * dilation[0] <= 0
        ):
            # a 1x1 map: only the centre tap meets data, the rest meets zero padding
            # [N, Cout, Cin], gathered once (bmm would copy a strided operand member by member)
            centre = (k[0] // 2) * k[1] + k[1] // 2
            wc = _Tap.apply(w, centre) if w.requires_grad else _Tap.forward(w, centre)
            y = torch.bmm(x.view(n, bsz, cin), wc.transpose(1, 2))
            if b is not None:
                y = y + b[:, None]
            return y.view(nb, cout, 1, 1)
        if k == (1, 1) and padding == (0, 0) and stride == (1, 1):
            xs = x.view(n, bsz, cin, h * wd)
            y = torch.matmul(w.view(n, 1, cout, cin), xs)  # [N, B, Cout, HW]
            if b is not None:
                y = y + b[:, None, :, None]
            return y.view(nb, cout, h, wd)
        if ho * wo <= 4:
            cols = F.unfold(x, k, dilation, padding, stride)  # [N*B, Cin*kk, L]
            cols = cols.view(n, bsz, -1, ho * wo).transpose(1, 2).reshape(n, cols.shape[1], bsz * ho * wo)
            y = torch.bmm(w.reshape(n, cout, -1), cols)  # [N, Cout, B*L]
            if b is not None:
                y = y + b[:, :, None]
            return y.view(n, cout, bsz, ho * wo).transpose(1, 2).reshape(nb, cout, ho, wo)
    xg = x.view(n, bsz, cin, h, wd).transpose(0, 1).reshape(bsz, n * cin, h, wd)
    y = F.conv2d(
        xg,
        w.reshape(n * cout, *w.shape[2:]),
        None if b is None else b.reshape(-1),
        stride,
        padding,
        dilation,
        n * groups,
    )
    return _members_first(y, n)


def linear(x, w, b, n: int):
    """``x [N*B, ..., Fin]`` with member weights ``w [N, Fout, Fin]``, ``b [N, Fout]``."""
    lead = x.shape[:-1]
    xs = x.reshape(n, -1, x.shape[-1])
    y = torch.bmm(xs, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None], xs, w.transpose(1, 2))
    return y.reshape(*lead, w.shape[1])


def _bcast(t, n, x):
    """Member parameter ``t [N, C]`` shaped to broadcast against ``x [N*B, C, ...]`` viewed as
    ``[N, B, C, ...]``."""
    return t.view(n, 1, t.shape[1], *([1] * (x.dim() - 2)))


def batch_norm(x, p, s, *, train: bool, momentum: float, eps: float, n: int):
    """BatchNorm with member statistics ``s`` (``[N, C]`` leaves) over ``x [N*B, C, ...]``:
    ``(y, new_state)``; each member normalises by its own rows (train) or running statistics."""
    w, b = p.get("weight"), p.get("bias")
    rm, rv = s["running_mean"], s["running_var"]
    xs = x.view(n, -1, *x.shape[1:])
    if not train:
        scale = torch.rsqrt(rv + eps)
        if w is not None:
            scale = scale * w
        shift = -rm * scale
        if b is not None:
            shift = shift + b
        return torch.addcmul(_bcast(shift, n, x), xs, _bcast(scale, n, x)).view(x.shape), s
    # the members as N*C channels of one [B, N*C, ...] batch: the single-model BatchNorm (torch's
    # fused kernel on fresh copies of the statistics) then computes each member's statistics over
    # its own rows, forward and backward in one pass each (a strided var_mean and a decomposed
    # formula took a dozen kernels)
    c, bsz = x.shape[1], x.shape[0] // n
    xt = xs.transpose(0, 1).reshape(bsz, n * c, *x.shape[2:])
    stats = ("running_mean", "running_var")  # [N, C] <-> [N*C]; num_batches_tracked [N] as it is
    y, new = L.batch_norm(
        {k: v.reshape(-1) for k, v in p.items()},
        {k: v.reshape(-1) if k in stats else v for k, v in s.items()},
        xt,
        train=True,
        momentum=momentum,
        eps=eps,
    )
    y = y.view(bsz, n, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
    return y, {k: v.view(n, c) if k in stats else v for k, v in new.items()}


def affine(xhat, w, b, n: int, axis: int):
    """Member affine parameters ``[N, C]`` on a normalised ``xhat [N*B, ...]`` at ``axis`` (1:
    channels first, -1: channels last)."""
    xs = xhat.view(n, -1, *xhat.shape[1:])
    shape = [1] * xs.dim()
    shape[0] = n
    shape[2 if axis == 1 else -1] = -1
    y = xs if w is None else xs * w.view(shape)
    y = y if b is None else y + b.view(shape)
    return y.view(xhat.shape)


def _member_mask(keys, x, n, per_row: bool):
    rows = x.shape[0] // n
    shape = (rows,) + ((1,) * (x.dim() - 1) if per_row else tuple(x.shape[1:]))
    u = vrandom.uniform(keys, shape)  # [N, rows, ...]: member i's draw is the loop's
    return u.reshape(x.shape[0], *shape[1:])


def dropout(x, rate: float, keys, *, train: bool, n: int):
    """Element-wise dropout with member ``keys [N, 2]`` (see :func:`vafunc.core.layers.dropout`)."""
    from vafunc.core.layers import dropout as one
    from vafunc.core.layers import require_rng

    if not train or rate == 0.0 or rate >= 1.0:
        return one(x, rate, keys, train=train)
    keys = require_rng(keys, f"dropout (rate {rate})")
    keep = _member_mask(keys, x, n, False) >= rate
    return x * keep.to(x.dtype) * (1.0 / (1.0 - rate))


def drop_path(x, rate: float, keys, *, train: bool, n: int):
    """Per-sample stochastic depth with member ``keys [N, 2]`` (see :func:`vafunc.core.layers.drop_path`)."""
    from vafunc.core.layers import drop_path as one
    from vafunc.core.layers import require_rng

    if not train or rate == 0.0 or rate >= 1.0:
        return one(x, rate, keys, train=train)
    keys = require_rng(keys, f"stochastic depth (rate {rate})")
    survival = 1.0 - rate
    keep = _member_mask(keys, x, n, True) < survival
    return x * (keep.to(x.dtype) / survival)


def per_row(t, ndim: int, n: int, rows: int | None):
    """Member bare parameter ``t [N, *shape]`` that broadcasts against one member's batch of
    ``ndim`` axes (a leading axis of size 1 in ``shape`` stands for the batch axis) as a tensor
    that broadcasts against the members' ``[N*B, ...]`` rows: ``[N*B, ...]``, ``ndim`` axes."""
    if rows is None:
        raise NotCovered("bare parameter outside a forward")
    shape = tuple(t.shape[1:])
    if len(shape) == ndim:
        if shape[0] != 1:
            raise ValueError(f"a batch-broadcast parameter needs a leading axis of 1, got {list(shape)}")
        shape = shape[1:]
    v = t.reshape(n, 1, *((1,) * (ndim - 1 - len(shape))), *shape)
    return v.expand(n, rows // n, *v.shape[2:]).reshape(rows, *v.shape[2:])


def prefer(model, n: int, x: torch.Tensor, *, compiled: bool = False) -> bool:
    """Whether ``method="auto"`` takes members mode for ``n`` members on ``x`` (``[B, C, H, W]``
    shared or ``[N, B, C, H, W]``): the family is covered and each member's batch is small (see
    :data:`EAGER_MAX_PIXELS`)."""
    b, h, w = x.shape[-4], x.shape[-2], x.shape[-1]
    limit = COMPILED_MAX_PIXELS if compiled else EAGER_MAX_PIXELS
    return b * h * w <= limit and covers(model)


_COVER: dict = {}


def covers(model) -> bool:
    """Whether ``model``'s forward runs in members mode (probed once on the meta device, two
    members, train mode with keys so every random layer is reached)."""
    key = (model.name, model.config)
    if key not in _COVER:
        from vafunc.core import tree as vtree

        one = model.init(0, device="meta")
        params, state = vtree.stack([one[0], one[0]]), vtree.stack([one[1], one[1]])
        mult = model.size_multiple
        size = -(-max(model.min_size, 32) // mult) * mult
        x = torch.zeros(4, model.in_channels, size, size, device="meta")  # 2 members x 2 samples
        keys = vrandom.split(vrandom.key(0), 2).to("meta")
        try:
            # outside any torch.func transform the caller may be in (the probe is not part of its graph)
            with torch._C._DisableFuncTorch(), torch.no_grad():
                for train in (False, True):
                    y, _ = model.apply(params, state, x, train=train, rng=keys if train else None, backend=Members(2))
                    y = y["out"] if isinstance(y, dict) else y  # segmentation models: {"out", "aux"}
                    if y is None or y.shape[0] != 4:
                        raise NotCovered("output")
            ok = True
        except (NotCovered, RuntimeError, ValueError, TypeError, IndexError):
            ok = False
        _COVER[key] = ok
    return _COVER[key]


class Members(Plain):
    """The kit's backend for ``n`` members stacked in the batch axis (``apply(..., backend=
    Members(n))``). ``shared_input``: the input is one ``[B]`` batch every member shares; it
    enters as the ``[N*B]`` one, and a first convolution runs on the shared batch once per
    member's weights."""

    def __init__(self, n: int, shared_input: bool = False, shared=None, rows: int | None = None):
        self.n, self.shared_input, self.shared, self.rows = n, shared_input, shared, rows

    def enter(self, x, taps):
        x, shared = enter(x, self.n, taps, self.shared_input)
        return x, Members(self.n, self.shared_input, shared, x.shape[0])

    def conv(self, x, w, b, stride, padding, dilation, groups):
        sh = self.shared
        if sh is not None and x is sh[0] and groups == 1:
            return conv(sh[1], w, b, stride, padding, dilation, groups, self.n, shared=True)
        return conv(x, w, b, stride, padding, dilation, groups, self.n)

    def linear(self, x, w, b):
        return linear(x, w, b, self.n)

    def linear_with(self, x, w, b):
        if b is None or (b.dim() == 2 and b.shape[0] == self.n):  # member biases [N, Fout]
            return linear(x, w, b, self.n)
        return linear(x, w, None, self.n) + b  # a bias built from bare parameters: already per row

    def batch_norm(self, x, p, s, *, train, momentum, eps):
        return batch_norm(x, p, s, train=train, momentum=momentum, eps=eps, n=self.n)

    def group_norm(self, x, groups, w, b, eps):
        return affine(F.group_norm(x, groups, None, None, eps), w, b, self.n, 1)

    def layer_norm(self, x, w, b, eps):
        return affine(F.layer_norm(x, (x.shape[-1],), None, None, eps), w, b, self.n, -1)

    def layer_norm2d(self, x, w, b, eps):
        return affine(L.layer_norm2d(_EMPTY, x, eps=eps), w, b, self.n, 1)

    def param(self, t, batched: bool | int):
        if not batched:  # used directly by the family's code, which expects one member's tensor
            raise NotCovered("bare parameter")
        return per_row(t, t.dim() - 1 if batched is True else int(batched), self.n, self.rows)

    def buffer(self) -> None:
        raise NotCovered("buffer")

    def attention(self, rate: float, train: bool) -> None:
        if rate and train:
            raise NotCovered("attention dropout")

    def dropout(self, x, rate, rng, train):
        return dropout(x, rate, rng, train=train, n=self.n)

    def drop_path(self, x, rate, rng, train):
        return drop_path(x, rate, rng, train=train, n=self.n)
