"""Which bias adds and ReLUs (or clips: ReLU6) follow a constant-weight matmul or convolution closely enough to be
fused into its kernel's epilogue (``_Plan``), and the bias as one value per output channel; and which depthwise
convolutions read a 1x1 convolution's output alone, so that both can run as one kernel (``_Plan.pairs``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import relax

from .kernels.source import Clip
from .relax_util import (
    OP_ADD,
    OP_CALL_TIR,
    OP_CONV2D,
    OP_MATMUL,
    OP_RELU,
    OP_WHERE,
    _const_array,
    _is_weight_call,
    _shape,
    _static,
)


@dataclass
class _Chain:
    base: relax.Call  # matmul or conv2d with a constant weight
    bias: np.ndarray | None
    act: str | Clip | None
    fused: list[str]


class _Plan:
    """Bindings of the main function, use counts and the bias/ReLU chains to fuse into weight kernels.

    ``pairs`` maps a depthwise convolution's call (its chain's root) to (the 1x1 conv chain whose output only it
    reads, its own chain) where ``can_pair`` accepts them; the 1x1 conv's calls are then left to the pair."""

    def __init__(self, func: relax.Function, can_pair: Callable[[_Chain, _Chain], bool] | None = None):
        self.value: dict = {}
        self.uses: dict = {}
        bindings = []
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.value[binding.var] = binding.value
                    bindings.append(binding)
                for var in relax.analysis.free_vars(binding.value):
                    self.uses[var] = self.uses.get(var, 0) + 1
        for var in relax.analysis.free_vars(func.body.body):
            self.uses[var] = self.uses.get(var, 0) + 1
        self.chains: dict = {}  # root call -> _Chain
        absorbed: set = set()
        for binding in reversed(bindings):
            if binding.var in absorbed:
                continue
            chain, inner = self._match(binding.value)
            if chain is not None:
                self.chains[binding.value] = chain
                absorbed.update(inner)
        self.pairs: dict = {}
        if can_pair is not None:
            for binding in bindings:
                pair = self._pair(binding.value, can_pair)
                if pair is not None:
                    self.pairs[binding.value] = pair
                    absorbed.add(pair[1].base.args[0])
        # calls computed inside a fused chain: left as they are (dead after the rewrite, removed by DCE)
        self.absorbed = {self.value[var] for var in absorbed if var in self.value}

    def _as_chain(self, call) -> _Chain | None:
        """The fusion chain rooted at ``call``, or a bare weight call as a chain of its own."""
        chain = self.chains.get(call)
        if chain is None and _is_weight_call(call):
            chain = _Chain(call, None, None, [])
        return chain

    def _pair(self, call, can_pair):
        depthwise = self._as_chain(call)
        if depthwise is None or not depthwise.base.op.same_as(OP_CONV2D):
            return None
        expand = self._as_chain(self._single(depthwise.base.args[0]))
        if expand is None or not expand.base.op.same_as(OP_CONV2D) or not can_pair(expand, depthwise):
            return None
        return expand, depthwise

    def _single(self, var) -> relax.Call | None:
        if isinstance(var, relax.Var) and self.uses.get(var, 0) == 1:
            value = self.value.get(var)
            if isinstance(value, relax.Call):
                return value
        return None

    def _match(self, call):
        if not isinstance(call, relax.Call):
            return None, ()
        inner = []
        act = None
        clip = self._clip(call)
        if clip is not None:
            act, call, absorbed = clip
            inner.extend(absorbed)
        elif call.op.same_as(OP_RELU):
            producer = self._single(call.args[0])
            if producer is None:
                return None, ()
            inner.append(call.args[0])
            act = "relu"
            call = producer
        bias = None
        if call.op.same_as(OP_ADD):
            for base_arg, bias_arg in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                producer = self._single(base_arg)
                b = _const_array(bias_arg)
                if producer is not None and b is not None and _is_weight_call(producer):
                    vec = _bias_vector(producer, b)
                    if vec is not None:
                        inner.append(base_arg)
                        bias = vec
                        call = producer
                        break
            else:
                return None, ()
        if not _is_weight_call(call) or (bias is None and act is None):
            return None, ()
        fused = (["bias"] if bias is not None else []) + ([str(act)] if act else [])
        return _Chain(call, bias, act, fused), inner

    def _clip(self, call):
        """``minimum(maximum(x, lo), hi)``, as TVM's ONNX importer writes a Clip with constant bounds (calls of its
        ``maximum``/``minimum`` PrimFuncs): (Clip(lo, hi), x's producer, the vars it absorbs), or None."""
        upper = _scalar_call_tir(call, "minimum", self.value)
        lower_call = self._single(upper[1]) if upper else None
        lower = _scalar_call_tir(lower_call, "maximum", self.value) if lower_call is not None else None
        producer = self._single(lower[1]) if lower else None
        if producer is None:
            return None
        return Clip(lower[0], upper[0]), producer, [upper[1], lower[1]]


def _scalar_call_tir(call, name: str, value: dict):
    """(c, x) for ``call_tir(<name>N, (x, c))`` with c a finite float32 scalar: a constant, or the
    ``where(isnan(c), +-inf, c)`` the ONNX importer binds it to; else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(OP_CALL_TIR) or len(call.args) < 2:
        return None
    func, args = call.args[0], call.args[1]
    if not isinstance(func, relax.GlobalVar) or func.name_hint.rstrip("0123456789") != name:
        return None
    if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    x, bound = args.fields
    bound = value.get(bound, bound)
    if isinstance(bound, relax.Call) and bound.op.same_as(OP_WHERE):
        bound = bound.args[2]
    c = _const_array(bound)
    if c is None or c.size != 1 or c.dtype != np.float32 or not np.isfinite(c).all():
        return None
    return float(c.reshape(())), x


def _bias_vector(base: relax.Call, b: np.ndarray) -> np.ndarray | None:
    """The per-output bias vector if ``b`` broadcasts along the output channel only."""
    if b.dtype != np.float32:
        return None
    out_shape = _shape(base)
    if out_shape is None or b.ndim > len(out_shape):
        return None
    if base.op.same_as(OP_MATMUL):
        n = _static(out_shape[-1])
        if n is None or (b.shape and b.shape[-1] != n) or any(d != 1 for d in b.shape[:-1]):
            return None
        return np.broadcast_to(b.reshape(-1) if b.size == n else b.reshape(-1)[:1], (n,)).astype(np.float32)
    # conv2d NCHW: [Co, 1, 1] or [1, Co, 1, 1]
    co = _static(out_shape[1])
    full = (1,) * (4 - b.ndim) + tuple(b.shape)
    if co is None or full[0] != 1 or full[2] != 1 or full[3] != 1 or full[1] not in (1, co):
        return None
    return np.broadcast_to(b.reshape(-1), (co,)).astype(np.float32).copy()
