"""Relax-level lowering for CPU targets: replace constant-weight matmuls/convolutions (and activation matmuls) with
spc's kernels and fuse their bias and ReLU into them.

``rewrite(mod, lowering)`` returns the rewritten module; ``lowering.records`` holds one ``LayerRecord`` per weight
layer (the manifest's per-layer decisions, layer_records.py). ``glue_schedule.cpu_pipeline(spec)`` is the Relax
pipeline that compiles the module afterwards; fusion.py finds the bias and ReLU to fuse.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import tvm
import tvm.sym
from tvm import relax, tirx

from . import cost, kernels
from .fusion import _Plan
from .kernels.source import source_key
from .layer_records import LayerRecord, weight_key
from .registry import TargetSpec
from .relax_util import (OP_LAYER_NORM, OP_MATMUL, OP_MAX_POOL, OP_SOFTMAX, OPAQUE, _const_array, _cost_dim, _dtype,
                         _expr_str, _is_weight_call, _padding, _prod, _shape, _static, conv_geometry)

@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, lowering: "Lowering", plan: _Plan):
        super().__init__(mod)
        self.lowering = lowering
        self.plan = plan

    def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
        if call in self.plan.absorbed:
            return super().visit_call_(call)
        chain = self.plan.chains.get(call)
        try:
            pair = self.plan.pairs.get(call)
            if pair is not None:
                return self.lowering.lower_expand_depthwise(self, *pair)
            if chain is not None:
                out = self.lowering.lower_weight_call(self, chain.base, chain.bias, chain.act, chain.fused)
                if out is not None:
                    return out
            if _is_weight_call(call):
                out = self.lowering.lower_weight_call(self, call, None, None, [])
                if out is not None:
                    return out
            if call.op.same_as(OP_MATMUL):
                out = self.lowering.lower_batch_matmul(self, call)
                if out is not None:
                    return out
            if call.op.same_as(OP_LAYER_NORM) or call.op.same_as(OP_SOFTMAX):
                out = self.lowering.lower_row_norm(self, call)
                if out is not None:
                    return out
            if call.op.same_as(OP_MAX_POOL):
                out = self.lowering.lower_max_pool(self, call)
                if out is not None:
                    return out
        except _Skip:
            pass
        return super().visit_call_(call)


DEPTHWISE_MAX_ELEMENTS = 1 << 26  # C x H x W: larger depthwise inputs stay with TVM (the kernel copies an image)
# a 1x1 conv and the depthwise conv after it run as one kernel when the map between them is at least this large
# per image (C x H x W): smaller ones stay in cache between two kernels, which then run faster than the fused one
# (MobileNetV2: 1.2-2.2x faster fused from 144 x 56 x 56 up, 0.3-0.9x from 192 x 28 x 28 down; bench_kernel_ab.py)
EXPAND_DEPTHWISE_MIN_ELEMENTS = 1 << 18


def _small_map_1x1(g: kernels.ConvGeom) -> bool:
    """A 1x1 convolution whose map fills pixel vectors badly (it is not a whole number of tiles) runs vectorised
    over output channels instead (``dense_matmul(channels_first=)``): on maps of at most 64 pixels, or where it
    contracts (c_in >= 2 c_out; each output costs enough to pay its strided store). One thread: EfficientNet-Lite0's
    and MobileNetV2's 7x7 layers 1.1-1.35x, their 14x14 projections 1.1-1.4x; 14x14 expansions 0.77-0.88x (kept)."""
    if not g.direct:
        return False
    return g.pixels <= 64 or g.c_in >= 2 * g.c_out


class _Skip(Exception):
    pass


class Lowering:
    """Creates spc kernels for one target and records the per-layer decisions."""

    def __init__(
        self,
        spec: TargetSpec,
        *,
        block: tuple[int, int],
        weight_index: dict | None = None,
        sparse: bool = True,
        force: str | None = None,
        force_layers: dict[str, str] | None = None,
        winograd: bool = True,
    ):
        self.spec = spec
        self.winograd = winograd  # dense 3x3 convolutions (stride 1 or 2) by Winograd where it pays (kernels.conv2d)
        self.params = spec.cpu_kernels
        self.block = tuple(block)
        self.weight_index = weight_index or {}
        self.sparse = sparse and spec.sparse_kernels
        self.force = force  # "dense" or "bsr": skip the cost model (benchmarks, tests)
        self.force_layers = force_layers or {}  # ONNX weight name -> "dense"/"bsr" (--speedup's measured choice)
        self.records: list[LayerRecord] = []
        self._count = 0
        self._kernels: dict[str, relax.GlobalVar] = {}
        self._consts: dict[tuple, relax.Constant] = {}

    # -- helpers ---------------------------------------------------------------------------------------------

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"spc_{kind}_{self._count}"

    def _add_func(self, mutator, kernel: kernels.Kernel):
        """The kernel's GlobalVar, compiled once per distinct source: a prefix run per image (depth_first.py)
        calls the same kernel on every image."""
        key = source_key(kernel.source, kernel.name)
        gv = self._kernels.get(key)
        if gv is None:
            gv = self._kernels[key] = mutator.builder_.add_func(kernel.func.with_attr("op_pattern", OPAQUE),
                                                                 kernel.name)
        return gv

    def _const(self, array: np.ndarray) -> relax.Constant:
        """One constant per distinct array (the per-image copies of a layer share their packed weights)."""
        key = (array.shape, str(array.dtype), hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
        if key not in self._consts:
            self._consts[key] = relax.const(array)
        return self._consts[key]

    def _call(self, mutator, kernel: kernels.Kernel, x, out_shape) -> relax.Expr:
        gv = self._add_func(mutator, kernel)
        args = [x] + [self._const(c) for c in kernel.consts]
        return relax.call_tir(gv, args, relax.TensorType(out_shape, "float32"))

    def _record(self, **kw) -> LayerRecord:
        rec = LayerRecord(index=len(self.records), **kw)
        self.records.append(rec)
        return rec

    def _identify(self, w_out_in: np.ndarray) -> tuple[str | None, str | None]:
        hit = self.weight_index.get(weight_key(w_out_in))
        return (hit[0], hit[2]) if hit else (None, None)

    def _choose(self, m_cost: int, k: int, n: int, w_out_in: np.ndarray, conv: bool, dense_speedup: float = 1.0,
                copy_elements: int = 0):
        """(kernel, bsr or None, density, expected speedup); ``dense_speedup`` and ``copy_elements`` as in
        ``cost.estimate``."""
        bsr = kernels.to_bsr(w_out_in, self.block) if self.sparse else None
        density = bsr.density if bsr is not None else 1.0
        force = self.force_layers.get(self._identify(w_out_in)[1], self.force) if self.force_layers else self.force
        if bsr is None or force == "dense":
            return "dense", None, density, 1.0
        est = cost.estimate(m_cost, k, n, density, self.block, self.params, self.spec.bsr_efficiency, conv,
                            dense_speedup, copy_elements)
        if force == "bsr" or est.speedup >= cost.MIN_SPEEDUP:
            return "bsr", bsr, density, round(est.speedup, 2)
        return "dense", None, density, 1.0

    # -- constant-weight matmul / conv -------------------------------------------------------------------------

    def lower_weight_call(self, mutator, call, bias, act, fused):
        if call.op.same_as(OP_MATMUL):
            return self._lower_matmul(mutator, call, bias, act, fused)
        return self._lower_conv(mutator, call, bias, act, fused)

    def _lower_matmul(self, mutator, call, bias, act, fused):
        x_orig, w_expr = call.args
        w = _const_array(w_expr)
        x_shape = _shape(x_orig)
        if w is None or x_shape is None or len(x_shape) < 1:
            return None
        if w.dtype != np.float32 or _dtype(x_orig) != "float32" or _dtype(call) != "float32":
            self._record_tvm("MatMul", w.T if w.ndim == 2 else w, "dtype is not float32")
            return None
        k, n = (int(d) for d in w.shape)
        if _static(x_shape[-1]) != k:
            self._record_tvm("MatMul", w.T, "the activation's reduction dim is symbolic")
            return None
        lead = x_shape[:-1]  # rows of the matmul: the product of the leading dims (tokens)
        m_expr = _prod(lead) if lead else tirx.IntImm("int64", 1)
        static_lead = [_static(d) for d in lead]
        m_static = int(np.prod(static_lead)) if all(d is not None for d in static_lead) else None
        m_cost = m_static if m_static is not None else _cost_dim(lead)
        w_out_in = np.ascontiguousarray(w.T)
        kind, bsr, density, speedup = self._choose(m_cost, k, n, w_out_in, conv=False)
        x = mutator.visit_expr(x_orig)
        m_dim = m_static if m_static is not None else m_expr
        x2 = mutator.builder_.emit(relax.op.reshape(x, [m_dim, k]))
        if kind == "bsr":
            kern = kernels.bsr_matmul(self._name("bsr"), bsr, bias, act, self.params, m_static=m_static)
        else:
            kern = kernels.dense_matmul(self._name("dense"), w, bias, act, self.params, m_static=m_static)
        y2 = mutator.builder_.emit(self._call(mutator, kern, x2, [m_dim, n]))
        node, weight = self._identify(w_out_in)
        self._record(
            op="MatMul",
            node=node,
            weight=weight,
            shape=[n, k],
            rows=m_static if m_static is not None else _expr_str(m_expr),
            kernel=kind,
            block=list(self.block) if self.sparse else None,
            density=round(density, 4),
            expected_speedup=speedup,
            fused=fused,
        )
        return relax.op.reshape(y2, list(lead) + [n]) if len(lead) != 1 else y2

    def _lower_conv(self, mutator, call, bias, act, fused):
        x_orig, w_expr = call.args
        w = _const_array(w_expr)
        attrs = call.attrs
        x_shape = _shape(x_orig)
        if w is None or x_shape is None or len(x_shape) != 4 or w.ndim != 4:
            return None
        w_out_in = np.ascontiguousarray(w.reshape(w.shape[0], -1))
        reason = None
        depthwise = int(attrs.groups) == w.shape[0] and w.shape[1] == 1  # one input channel per output channel
        if w.dtype != np.float32 or _dtype(x_orig) != "float32" or _dtype(call) != "float32":
            reason = "dtype is not float32"
        elif (attrs.data_layout, attrs.kernel_layout, attrs.out_layout or "NCHW") != ("NCHW", "OIHW", "NCHW"):
            reason = "layout is not NCHW/OIHW"
        elif any(_static(d) is None for d in x_shape[1:]):
            reason = "symbolic channel or spatial size"
        elif depthwise and int(attrs.groups) == _static(x_shape[1]):
            elements = int(np.prod([_static(d) for d in x_shape[1:]], dtype=np.int64))
            if elements < DEPTHWISE_MAX_ELEMENTS:
                return self._lower_depthwise(mutator, call, w, bias, act, fused)
            reason = f"depthwise input of {elements} elements per image (spc's kernel takes < {DEPTHWISE_MAX_ELEMENTS})"
        elif int(attrs.groups) != 1:
            grouped = self._lower_grouped(mutator, call, w, bias, act, fused)
            if grouped is not None:
                return grouped
            reason = f"groups={int(attrs.groups)} with a shape spc's grouped form does not take"
        if reason:
            self._record_tvm("Conv", w_out_in, reason)
            return None
        n_static = _static(x_shape[0])
        c_in, h, wd = (_static(d) for d in x_shape[1:])
        geom = conv_geometry(call)
        if w.shape[1] != c_in or geom.oh <= 0 or geom.ow <= 0:
            return None
        algorithm, winograd_speedup = (kernels.conv_winograd.choose_algorithm(geom, self.params) if self.winograd
                                       else (None, 1.0))
        kind, bsr, density, speedup = self._choose(geom.pixels, geom.k, geom.c_out, w_out_in, conv=True,
                                                   dense_speedup=winograd_speedup,
                                                   copy_elements=kernels.bsr_extra_copy(geom, self.params, self.block)
                                                   if self.sparse else 0)
        x = mutator.visit_expr(x_orig)
        flat = kernels.conv2d_takes_flat_input(geom, self.params, self.block if kind == "bsr" else None)
        by_channels = kind == "dense" and not flat and _small_map_1x1(geom)
        n_dim = x_shape[0]
        if flat or by_channels:
            x = mutator.builder_.emit(relax.op.reshape(x, [n_dim, c_in, h * wd]))
        if by_channels:
            kern = kernels.dense_matmul(self._name("conv"), np.ascontiguousarray(w_out_in.T), bias, act, self.params,
                                        None if n_static is None else n_static * geom.pixels, geom.pixels)
        else:
            kern = kernels.conv2d(
                self._name("conv"), geom, w_out_in, bias, act, self.params, bsr=bsr, n_static=n_static,
                winograd=self.winograd,
            )
        y = mutator.builder_.emit(self._call(mutator, kern, x, [n_dim, geom.c_out, geom.pixels]))
        node, weight = self._identify(w_out_in)
        self._record(
            op="Conv",
            node=node,
            weight=weight,
            shape=[geom.c_out, geom.k],
            rows=geom.pixels,
            kernel=kind,
            block=list(self.block) if self.sparse else None,
            density=round(density, 4),
            expected_speedup=speedup,
            fused=fused,
            winograd=algorithm.m if algorithm is not None and kind == "dense" else None,
        )
        return relax.op.reshape(y, [n_dim, geom.c_out, geom.oh, geom.ow])

    def _lower_grouped(self, mutator, call, w, bias, act, fused):
        """A grouped convolution (not depthwise) as one spc convolution kernel per group on its slice of the input
        channels, the outputs concatenated: TVM's own grouped convolution is a scalar loop nest (RegNet's 3x3
        convolutions of 2-16 groups of 8 channels took 60% of its time, 4x ONNX Runtime's whole model)."""
        groups = int(call.attrs.groups)
        geom = conv_geometry(call)
        x_shape = _shape(call.args[0])
        if geom is None or geom.c_in % groups or w.shape[0] % groups or w.shape[1] * groups != geom.c_in \
                or geom.oh <= 0 or geom.ow <= 0:
            return None
        c_in, c_out = geom.c_in // groups, geom.c_out // groups
        part = dataclasses.replace(geom, c_in=c_in, c_out=c_out)
        n_dim, n_static = x_shape[0], _static(x_shape[0])
        x = mutator.visit_expr(call.args[0])
        slices = mutator.builder_.emit(relax.op.split(x, groups, axis=1))
        flat = kernels.conv2d_takes_flat_input(part, self.params, None)
        outputs = []
        for g in range(groups):
            x_g = mutator.builder_.emit(relax.TupleGetItem(slices, g))
            if flat:
                x_g = mutator.builder_.emit(relax.op.reshape(x_g, [n_dim, c_in, geom.h * geom.w]))
            w_g = np.ascontiguousarray(w[g * c_out:(g + 1) * c_out].reshape(c_out, -1))
            b_g = None if bias is None else bias[g * c_out:(g + 1) * c_out]
            kern = kernels.conv2d(self._name("conv"), part, w_g, b_g, act, self.params, n_static=n_static,
                                  winograd=self.winograd)
            outputs.append(mutator.builder_.emit(self._call(mutator, kern, x_g, [n_dim, c_out, geom.pixels])))
        y = mutator.builder_.emit(relax.op.concat(outputs, axis=1))
        node, weight = self._identify(np.ascontiguousarray(w.reshape(w.shape[0], -1)))
        self._record(op="Conv", node=node, weight=weight, shape=[geom.c_out, c_in * geom.kh * geom.kw],
                     rows=geom.pixels, kernel="dense", block=None, density=1.0, expected_speedup=1.0, fused=fused,
                     groups=groups)
        return relax.op.reshape(y, [n_dim, geom.c_out, geom.oh, geom.ow])

    def can_pair(self, expand, depthwise) -> bool:
        """Whether a 1x1 conv (chain) and the depthwise conv that alone reads it run as one kernel: float32 NCHW with
        static sizes, the 1x1 unstrided and unpadded, the depthwise at column stride 1 or 2, a map between them of
        at least ``EXPAND_DEPTHWISE_MIN_ELEMENTS`` and rows of at least two vectors."""
        if EXPAND_DEPTHWISE_MIN_ELEMENTS <= 0:
            return False
        calls = (expand.base, depthwise.base)
        weights = [_const_array(call.args[1]) for call in calls]
        shapes = [_shape(call.args[0]) for call in calls]
        if any(w is None or w.ndim != 4 or w.dtype != np.float32 for w in weights):
            return False
        if any(s is None or len(s) != 4 or any(_static(d) is None for d in s[1:]) for s in shapes):
            return False
        for call in calls:
            a = call.attrs
            if (a.data_layout, a.kernel_layout, a.out_layout or "NCHW") != ("NCHW", "OIHW", "NCHW"):
                return False
            if _dtype(call) != "float32" or _dtype(call.args[0]) != "float32":
                return False
        we, wd = weights
        ea, da = expand.base.attrs, depthwise.base.attrs
        if we.shape[2:] != (1, 1) or int(ea.groups) != 1 or any(int(v) != 1 for v in ea.strides):
            return False
        if any(int(v) != 0 for v in ea.padding) or we.shape[1] != _static(shapes[0][1]):
            return False
        c, h, w = (_static(d) for d in shapes[1][1:])
        if not (int(da.groups) == wd.shape[0] == c == we.shape[0] and wd.shape[1] == 1):
            return False
        elements = c * h * w
        return (int(da.strides[1]) in (1, 2) and EXPAND_DEPTHWISE_MIN_ELEMENTS <= elements < DEPTHWISE_MAX_ELEMENTS
                and w >= 2 * self.params.lanes and kernels.expand_group_size(c, self.params) >= 4)

    def lower_expand_depthwise(self, mutator, expand, depthwise):
        """One kernel for the pair (``can_pair`` accepted it) unless the 1x1 conv is to be block-sparse: then each
        is lowered alone."""
        e_call, d_call = expand.base, depthwise.base
        we = _const_array(e_call.args[1])
        wd = _const_array(d_call.args[1])
        x_shape = _shape(e_call.args[0])
        c_in, h, wd_ = (_static(d) for d in x_shape[1:])
        c = int(we.shape[0])
        we2 = np.ascontiguousarray(we.reshape(c, c_in))
        kind = self._choose(h * wd_, c_in, c, we2, conv=True)[0]
        if kind != "dense":
            y = mutator.builder_.emit(self.lower_weight_call(mutator, e_call, expand.bias, expand.act, expand.fused))
            return self._lower_depthwise(mutator, d_call, wd, depthwise.bias, depthwise.act, depthwise.fused, x=y)
        attrs = d_call.attrs
        kern = kernels.expand_depthwise(
            self._name("expand_dwconv"), c_in, c, h, wd_, we2, expand.bias, expand.act, wd,
            tuple(int(s) for s in attrs.strides), _padding(attrs), tuple(int(d) for d in attrs.dilation),
            depthwise.bias, depthwise.act, self.params, _static(x_shape[0]))
        self._record_conv(we2, h * wd_, expand.fused + ["depthwise conv (one kernel)"])
        out_shape = _shape(d_call)
        self._record_conv(np.ascontiguousarray(wd.reshape(c, -1)), int(np.prod([_static(d) for d in out_shape[2:]])),
                          ["1x1 conv (one kernel)"] + depthwise.fused)
        return self._call(mutator, kern, mutator.visit_expr(e_call.args[0]), out_shape)

    def _record_conv(self, w_out_in: np.ndarray, rows: int, fused: list[str]) -> None:
        node, weight = self._identify(w_out_in)
        self._record(op="Conv", node=node, weight=weight, shape=[int(d) for d in w_out_in.shape], rows=rows,
                     kernel="dense", block=None, density=1.0, expected_speedup=1.0, fused=fused)

    def _lower_depthwise(self, mutator, call, w, bias, act, fused, x=None):
        """NCHW, static channels and image size (``_lower_conv`` checked them); ``x``: the input, already lowered."""
        x_orig, attrs = call.args[0], call.attrs
        x_shape = _shape(x_orig)
        c, h, wd = (_static(d) for d in x_shape[1:])
        kern = kernels.depthwise_conv2d(
            self._name("dwconv"), c, h, wd, w, tuple(int(s) for s in attrs.strides), _padding(attrs),
            tuple(int(d) for d in attrs.dilation), bias, act, self.params, _static(x_shape[0]))
        out_shape = _shape(call)
        self._record_conv(np.ascontiguousarray(w.reshape(w.shape[0], -1)),
                          int(np.prod([_static(d) for d in out_shape[2:]])), fused)
        return self._call(mutator, kern, mutator.visit_expr(x_orig) if x is None else x, out_shape)

    def _record_tvm(self, op: str, w_out_in: np.ndarray, reason: str) -> None:
        node, weight = self._identify(w_out_in) if w_out_in.ndim == 2 else (None, None)
        self._record(
            op=op,
            node=node,
            weight=weight,
            shape=[int(d) for d in w_out_in.shape[:2]],
            rows="",
            kernel="tvm",
            reason=reason,
        )

    # -- layer norm / softmax over the last axis ---------------------------------------------------------------

    def lower_row_norm(self, mutator, call):
        x_orig = call.args[0]
        shape = _shape(x_orig)
        if shape is None or not shape or _dtype(x_orig) != "float32" or _dtype(call) != "float32":
            return None
        ndim = len(shape)
        d = _static(shape[-1])
        if d is None:
            return None
        if call.op.same_as(OP_SOFTMAX):
            if int(call.attrs.axis) not in (-1, ndim - 1):
                return None
        else:
            axes = [int(ax) % ndim for ax in call.attrs.axes]
            if axes != [ndim - 1]:
                return None
            gamma = _const_array(call.args[1]) if call.attrs.scale else None
            beta = _const_array(call.args[2]) if call.attrs.center else None
            if (call.attrs.scale and gamma is None) or (call.attrs.center and beta is None):
                return None
            if any(c is not None and c.size != d for c in (gamma, beta)):
                return None
        lead = shape[:-1]
        rows = _prod(lead) if lead else tirx.IntImm("int64", 1)
        rows_static = int(np.prod([_static(v) for v in lead])) if all(_static(v) is not None for v in lead) else None
        if call.op.same_as(OP_SOFTMAX):
            kern = kernels.softmax(self._name("softmax"), d, self.params, rows_static)
        else:
            kern = kernels.layer_norm(self._name("layernorm"), d, float(call.attrs.epsilon), gamma, beta, self.params, rows_static)
        rows_dim = rows_static if rows_static is not None else rows
        x = mutator.builder_.emit(relax.op.reshape(mutator.visit_expr(x_orig), [rows_dim, d]))
        y = mutator.builder_.emit(self._call(mutator, kern, x, [rows_dim, d]))
        return relax.op.reshape(y, shape)

    def lower_max_pool(self, mutator, call):
        """NCHW max pooling with a static image size, no dilation, floor mode and pads smaller than the window."""
        x_orig, attrs = call.args[0], call.attrs
        shape = _shape(x_orig)
        if shape is None or len(shape) != 4 or _dtype(x_orig) != "float32":
            return None
        c, h, w = (_static(d) for d in shape[1:])
        kernel, stride = tuple(int(v) for v in attrs.pool_size), tuple(int(v) for v in attrs.strides)
        pads = tuple(int(v) for v in attrs.padding)
        if (None in (c, h, w) or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW" or attrs.ceil_mode
                or tuple(int(v) for v in attrs.dilation) != (1, 1) or len(pads) != 4
                or max(pads[0], pads[2]) >= kernel[0] or max(pads[1], pads[3]) >= kernel[1]):
            return None
        kern = kernels.max_pool2d(self._name("maxpool"), c, h, w, kernel, stride, pads, _static(shape[0]))
        out_shape = _shape(call)
        return self._call(mutator, kern, mutator.visit_expr(x_orig), out_shape)

    # -- activation x activation matmul ------------------------------------------------------------------------

    def lower_batch_matmul(self, mutator, call):
        a_orig, b_orig = call.args
        sa, sb = _shape(a_orig), _shape(b_orig)
        if sa is None or sb is None or len(sa) < 2 or len(sa) != len(sb):
            return None
        if not (_dtype(a_orig) == _dtype(b_orig) == _dtype(call) == "float32"):
            return None
        batch_a, batch_b = sa[:-2], sb[:-2]
        analyzer = tvm.sym.Analyzer()
        if any(not analyzer.can_prove_equal(x, y) for x, y in zip(batch_a, batch_b)):
            return None  # broadcasting batch dims: TVM's schedule
        if not analyzer.can_prove_equal(sa[-1], sb[-2]):
            return None
        m, k, n = sa[-2], sa[-1], sb[-1]
        bdim = _prod(batch_a) if batch_a else tirx.IntImm("int64", 1)
        bdim = analyzer.simplify(bdim)
        kern = kernels.batch_matmul(
            self._name("bmm"),
            self.params,
            _static(bdim),
            _static(m),
            _static(k),
            _static(n),
        )
        a = mutator.builder_.emit(relax.op.reshape(mutator.visit_expr(a_orig), [bdim, m, k]))
        b = mutator.builder_.emit(relax.op.reshape(mutator.visit_expr(b_orig), [bdim, k, n]))
        gv = self._add_func(mutator, kern)
        c = mutator.builder_.emit(relax.call_tir(gv, [a, b], relax.TensorType([bdim, m, n], "float32")))
        return relax.op.reshape(c, list(batch_a) + [m, n])


def rewrite(mod: tvm.IRModule, lowering: Lowering, func_name: str = "main") -> tvm.IRModule:
    func = mod[func_name]
    plan = _Plan(func, lowering.can_pair)
    rewriter = _Rewriter(mod, lowering, plan)
    new_func = rewriter.visit_expr(func)
    out = rewriter.builder_.get()
    out[func_name] = new_func
    out = relax.transform.DeadCodeElimination([func_name])(out)
    return out
