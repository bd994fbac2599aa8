"""Compiled inference for fixed weights: ``vafunc.compile(model, params, state) -> f(x) -> logits``.

What makes inductor fast on CPU (and GPU) for inference, without an ``nn.Module``:

* **Frozen weights.** The weights are private copies marked as static addresses, so with
  ``torch._inductor.config.freezing`` dynamo installs them as graph constants (not inputs) and
  inductor folds BatchNorm into the convolutions and pre-packs the convolution weights (oneDNN).
  Plain closure tensors are lifted as graph inputs instead and nothing is folded.
* **The GEMM library, by measurement.** Inductor packs frozen float32 linear weights for MKL on
  x86; on some CPUs (AMD Zen 4) oneDNN's packed linear is faster. Each linear shape is timed
  once in both and goes to the faster one (see benchmarks/README.md for the figures).
* **channels_last** weights and activations (oneDNN's native layout on CPU, tensor cores' on GPU).
* **Low precision** (``dtype=torch.bfloat16`` or ``torch.float16``): the precision policy
  ``Policy(param=<the weights' dtype>, compute=dtype)`` (:mod:`vafunc.core.precision`): the weights
  are kept in their dtype and cast inside the graph, which freezing folds into low-precision
  constants once; the logits come back in the input's dtype. Inductor's binary folding (BatchNorm's
  scale and shift multiplied into the convolution weights and bias) is switched off for these
  graphs: on the trained EfficientNet-Lite0 it cost 5.7 points of bf16 top-1 agreement with fp32
  (91.4% with it, 97.1% without, as in eager; ``benchmarks/lite_bf16.py``). BatchNorm then runs
  as a fused pointwise epilogue in float32.
* **Batch size.** The first call is specialised to its shape (weights pre-packed for it); a second
  batch size compiles once more with a symbolic batch axis. torch's choice of convolution backend
  depends on the batch size for depthwise convolutions, so batch 1 and batches of 16 and up get a
  graph each too: at most four compilations per image size, then none (tested).
  ``dynamic=True`` starts symbolic, ``dynamic=False`` specialises every shape.

The result is eval-mode only, runs under ``torch.no_grad`` and does not see later changes to
``params`` (they are copied). For gradients, compile ``model.apply`` yourself.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import types
from collections.abc import Mapping

import torch

from vafunc.core import tree as vtree
from vafunc.core.registry import ModelDef
from vafunc.io.state_dict import from_state_dict

__all__ = ["compile", "CompiledModel"]

_INSTANCES = itertools.count()


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _private_copy(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.preserve_format
    t = t.detach().to(memory_format=fmt, copy=True)
    # a static address makes dynamo install the tensor as a graph constant under freezing
    torch._dynamo.mark_static_address(t, guard=True)
    return t


@contextlib.contextmanager
def _no_binary_folding():
    """Inductor's freezing without its binary-folding pass (BatchNorm into conv weights), for
    low-precision graphs (see the module notes). A private torch hook: if torch renames it, the
    pass simply stays on."""
    try:
        from torch._inductor.fx_passes import freezing_patterns as fp

        pm = fp.binary_folding_pass
    except (ImportError, AttributeError):  # pragma: no cover - a torch without the pass
        yield
        return
    own = "apply" in vars(pm)
    apply = pm.apply
    pm.apply = lambda graph: 0
    try:
        yield
    finally:
        if own:
            pm.apply = apply
        else:
            del pm.apply


_GEMM_CHOICE: dict = {}


def _onednn_is_faster(m: int, k: int, n: int) -> bool:
    """Whether oneDNN's packed float32 linear beats MKL's (inductor's pick) by 5% on
    ``[m, k] x [k, n]`` on this machine: medians of 5 runs each, once per shape and thread count."""
    key = (m, k, n, torch.get_num_threads())
    if key not in _GEMM_CHOICE:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # inductor's passes run under a fake-tensor mode: time real tensors
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            dnn = torch.ops.mkldnn._reorder_linear_weight(w, m)
            t_mkl = _median_time(lambda: torch.ops.mkl._mkl_linear(x, mkl, w, b, m))
            t_dnn = _median_time(lambda: torch.ops.mkldnn._linear_pointwise(x, dnn, b, "none", [], ""))
        _GEMM_CHOICE[key] = t_dnn < 0.95 * t_mkl
    return _GEMM_CHOICE[key]


def _median_time(f, reps: int = 5) -> float:
    import time

    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2]


@contextlib.contextmanager
def _measured_gemm_library():
    """Inductor packs frozen float32 linear weights for MKL on x86; oneDNN's packed linear is
    faster on some CPUs (AMD EPYC Zen 4, where MKL takes a generic path; see benchmarks/README.md for the
    figures). Under this context each float32 linear goes to the library that measured faster
    for its shape (:func:`_onednn_is_faster`). A private torch hook: if torch renames it, inductor's
    own choice stays."""
    try:
        from torch._inductor.fx_passes import mkldnn_fusion as mf

        cls = mf.CpuMkldnnDeviceOp
        pack_w, pack = cls.pack_linear_weight, cls.pack_linear
        torch.ops.mkl._mkl_linear, torch.ops.mkldnn._linear_pointwise  # noqa: B018 - both present
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        yield
        return

    def onednn(batch_size, transposed) -> bool:
        weight = transposed.args[0] if getattr(transposed, "args", None) else None  # the mm operand [k, n]
        val = getattr(weight, "meta", {}).get("val")
        if not isinstance(batch_size, int) or val is None or val.dtype != torch.float32 or val.dim() != 2:
            return False
        return _onednn_is_faster(batch_size, val.shape[0], val.shape[1])

    def pack_linear_weight(self, graph, is_lp_weight, transposed, batch_size):
        return pack_w(self, graph, is_lp_weight or onednn(batch_size, transposed), transposed, batch_size)

    def pack_linear(self, graph, is_lp_weight, batch_size, x, packed, bias):
        return pack(self, graph, is_lp_weight or onednn(batch_size, packed.args[0]), batch_size, x, packed, bias)

    cls.pack_linear_weight, cls.pack_linear = pack_linear_weight, pack_linear
    try:
        yield
    finally:
        cls.pack_linear_weight, cls.pack_linear = pack_w, pack


class CompiledModel:
    """A compiled, frozen inference function for one model and one set of weights.

    Call it like a function: ``logits = f(x)``. ``f.model``, ``f.dtype`` and ``f.channels_last``
    say what it was built with; ``f.eager(x)`` runs the same weights and casts without compiling
    (what the compiled function is tested against).
    """

    def __init__(
        self,
        model: ModelDef,
        params: Mapping,
        state: Mapping,
        *,
        channels_last: bool,
        dtype,
        dynamic,
        freeze: bool,
        mode,
        fullgraph: bool,
        apply_kw: dict,
        fold_norm: bool = False,
    ):
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self.freeze = freeze
        self._apply_kw = dict(apply_kw)
        self._params = vtree.tree_map(lambda t: _private_copy(t, channels_last), params)
        self._state = vtree.tree_map(lambda t: _private_copy(t, channels_last), state)
        # where the weights live, found once: flattening the tree on every call is a measurable
        # share of a small compiled model's call
        self._device = next(iter(vtree.flatten(self._params).values())).device
        self.policy = None
        if dtype is not None:
            from vafunc.core.precision import Policy

            stored = next((t.dtype for t in vtree.flatten(self._params).values() if t.is_floating_point()), dtype)
            self.policy = Policy(param=stored, compute=dtype, output=dtype, fold_norm=fold_norm)
            self._apply_kw["policy"] = self.policy
        # dynamo keeps its compiled graphs on the code object, and at most 8 per code object
        # (torch._dynamo.config.recompile_limit) before it silently falls back to eager: a private
        # copy of the code gives every CompiledModel its own cache. Its name is unique too: dynamo's
        # automatic-dynamic memory (torch._dynamo.pgo) is keyed by file, line and code name, so two
        # CompiledModels of one model would share it, and the second would start with a symbolic
        # batch because the first saw two batch sizes (members-mode graphs then take many minutes)
        code = CompiledModel._forward.__code__
        name = f"_forward_{_safe(model.name)}_{next(_INSTANCES)}"
        own = types.FunctionType(code.replace(co_name=name), globals(), "_forward")
        self._compiled = torch.compile(types.MethodType(own, self), dynamic=dynamic, mode=mode, fullgraph=fullgraph)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out, _ = self.model.apply(self._params, self._state, x, train=False, **self._apply_kw)
        if isinstance(out, dict):  # a segmentation model's {"out", "aux"}
            return {k: v.to(out_dtype) for k, v in out.items()}
        return out.to(out_dtype)

    def _check(self, x) -> None:
        self.model.check_input(x)
        if x.device != self._device:
            raise ValueError(f"{self.model.name} was compiled for {self._device}, got an input on {x.device}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        fold = self.freeze and self.policy is not None and self.policy.compute in (torch.bfloat16, torch.float16)
        with (
            torch.no_grad(),
            torch._inductor.config.patch(freezing=self.freeze),
            _no_binary_folding() if fold else contextlib.nullcontext(),
            _measured_gemm_library() if self.freeze and x.device.type == "cpu" else contextlib.nullcontext(),
        ):
            return self._compiled(x)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation (weights, dtype, layout) without ``torch.compile``."""
        self._check(x)
        with torch.no_grad():
            return self._forward(x)

    def __repr__(self) -> str:
        dt = str(self.dtype).replace("torch.", "") if self.dtype is not None else "as given"
        return f"CompiledModel({self.model.name}, dtype={dt}, channels_last={self.channels_last}, freeze={self.freeze})"


def compile(
    model: ModelDef,
    params: Mapping,
    state: Mapping,
    *,
    example: torch.Tensor | None = None,
    channels_last: bool = True,
    dtype: torch.dtype | None = None,
    dynamic: bool | None = None,
    freeze: bool = True,
    mode: str | None = None,
    fullgraph: bool = True,
    fold_norm: bool = False,
    **apply_kw,
) -> CompiledModel:
    """Compile ``model`` with fixed ``params``/``state`` for eval-mode inference.

    ``example``: if given, the function is compiled now (on that batch) instead of on the first call.
    ``channels_last``: run weights and activations in NHWC (the fast layout for oneDNN and cuDNN).
    ``dtype``: ``None`` keeps the weights' dtype; ``torch.bfloat16`` / ``torch.float16`` cast weights
    and inputs and return logits in the input's dtype (benchmarks/README.md has the agreement).
    ``dynamic``: as in ``torch.compile``; the default specialises the first shape and makes the batch
    axis symbolic on the second (at most four compilations per image size; see the module notes).
    ``freeze``: fold weights in as constants (BatchNorm into convolutions, pre-packed weights).
    ``fold_norm``: with ``dtype``, fold each eval-mode BatchNorm that follows a convolution into its
    weights in float32 before the cast (:class:`vafunc.core.precision.Policy`): faster low-precision
    graphs on small depthwise/grouped networks, but a larger logit error than keeping BatchNorm in
    float32 on the trained EfficientNet-Lite0 (docs/weights.md, "classify a photo", has figures).
    ``mode``: ``torch.compile``'s mode (e.g. ``"max-autotune"``). Extra keywords go to ``model.apply``
    (``aux=...`` is not allowed: the result returns logits only).
    """
    if not isinstance(model, ModelDef):
        raise TypeError(f"compile expects a vafunc ModelDef (from vafunc.get_model), got {type(model).__name__}")
    for name, tree in (("params", params), ("state", state)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"compile expects {name} as a nested dict of tensors, got {type(tree).__name__}")
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if not all(isinstance(v, bool) for v in (channels_last, freeze, fold_norm)):
        raise TypeError(
            f"channels_last, freeze and fold_norm must be bools, got {channels_last!r}, {freeze!r}, {fold_norm!r}"
        )
    if fold_norm and dtype is None:
        raise ValueError(
            "fold_norm folds BatchNorm before casting to a lower precision: give dtype= too "
            "(in float32, freeze=True already folds BatchNorm into the convolutions)"
        )
    if "train" in apply_kw or "rng" in apply_kw:
        raise ValueError(
            "compile builds eval-mode inference; train/rng are not accepted (compile model.apply yourself for training)"
        )
    if apply_kw.get("aux"):
        raise ValueError("compile returns logits only; aux=True is not supported")
    # the same strict check as loading a checkpoint: every missing, unexpected or mis-shaped entry
    from_state_dict(model, vtree.to_state_dict(params, state))
    fn = CompiledModel(
        model,
        params,
        state,
        channels_last=channels_last,
        dtype=dtype,
        dynamic=dynamic,
        freeze=freeze,
        mode=mode,
        fullgraph=fullgraph,
        apply_kw=apply_kw,
        fold_norm=fold_norm,
    )
    if example is not None:
        fn(example)
    return fn
