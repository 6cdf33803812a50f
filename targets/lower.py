"""Relax-level lowering for CPU targets: replace constant-weight matmuls/convolutions (and activation matmuls) with
spc's kernels, fuse their bias and ReLU, and schedule the remaining (legalized) glue operators.

``rewrite(mod, spec, ...)`` returns the rewritten module and one ``LayerRecord`` per weight layer (the manifest's
per-layer decisions). ``cpu_pipeline(spec)`` is the Relax pipeline passed to ``tvm.compile`` afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
import tvm.sym
from tvm import relax, tirx

from . import cost, kernels
from .registry import TargetSpec

_OP = tvm.ir.Op.get
OP_MATMUL = _OP("relax.matmul")
OP_CONV2D = _OP("relax.nn.conv2d")
OP_ADD = _OP("relax.add")
OP_RELU = _OP("relax.nn.relu")
OP_LAYER_NORM = _OP("relax.nn.layer_norm")
OP_SOFTMAX = _OP("relax.nn.softmax")

OPAQUE = 8  # relay/relax OpPatternKind.kOpaque: FuseOps leaves spc's kernels alone


@dataclass
class LayerRecord:
    """One weight layer: what spc compiled it to."""

    index: int
    op: str  # "MatMul" (MatMul/Gemm) or "Conv"
    node: str | None  # ONNX node name, when the weight could be traced back to it
    weight: str | None  # ONNX initializer name, likewise
    shape: list[int]  # the weight as [outputs, inputs] (Conv: [Co, Ci*kh*kw])
    rows: int | str  # m: tokens (MatMul) or output pixels per image (Conv); a string when symbolic
    kernel: str  # "dense", "bsr", or "tvm" (left to TVM: unsupported layout/dtype/groups)
    block: list[int] | None = None
    density: float = 1.0  # fraction of non-zero blocks at `block` (1.0: fully dense)
    expected_speedup: float = 1.0  # predicted time(dense) / time(chosen kernel)
    fused: list[str] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def weight_key(w_out_in: np.ndarray) -> str:
    arr = np.ascontiguousarray(w_out_in, dtype=np.float32)
    return f"{arr.shape}:{hashlib.sha1(arr.tobytes()).hexdigest()}"


def index_onnx_weights(model) -> dict[str, tuple[str, str, str]]:
    """weight_key of each MatMul/Gemm/Conv initializer (as [out, in]) -> (node name, op type, initializer name)."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    index: dict[str, tuple[str, str, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        try:
            w = numpy_helper.to_array(inits[node.input[1]])
        except Exception:  # pragma: no cover - exotic storage
            continue
        if w.dtype != np.float32:
            continue
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            view = w.T
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            view = w if trans_b else w.T
        else:
            view = w.reshape(w.shape[0], -1)
        index[weight_key(view)] = (node.name, node.op_type, node.input[1])
    return index


def _static(dim) -> int | None:
    return int(dim.value) if isinstance(dim, tirx.IntImm) else None


def _shape(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _dtype(expr) -> str | None:
    ty = expr.ty
    return ty.dtype if isinstance(ty, relax.TensorType) else None


def _const_array(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value
        return value.numpy() if hasattr(value, "numpy") else None
    return None


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


@dataclass
class _Chain:
    base: relax.Call  # matmul or conv2d with a constant weight
    bias: np.ndarray | None
    act: str | None
    fused: list[str]


class _Plan:
    """Bindings of the main function, use counts and the bias/ReLU chains to fuse into weight kernels."""

    def __init__(self, func: relax.Function):
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
        # calls computed inside a fused chain: left as they are (dead after the rewrite, removed by DCE)
        self.absorbed = {self.value[var] for var in absorbed if var in self.value}

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
        if call.op.same_as(OP_RELU):
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
        fused = (["bias"] if bias is not None else []) + (["relu"] if act else [])
        return _Chain(call, bias, act, fused), inner


def _is_weight_call(call) -> bool:
    if not isinstance(call, relax.Call):
        return False
    if call.op.same_as(OP_MATMUL):
        w = call.args[1]
        return isinstance(w, tvm.ir.GenericConst) and len(_shape(w) or []) == 2
    if call.op.same_as(OP_CONV2D):
        return isinstance(call.args[1], tvm.ir.GenericConst)
    return False


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
        except _Skip:
            pass
        return super().visit_call_(call)


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
    ):
        self.spec = spec
        self.params = spec.cpu_kernels
        self.block = tuple(block)
        self.weight_index = weight_index or {}
        self.sparse = sparse and spec.sparse_kernels
        self.force = force  # "dense" or "bsr": skip the cost model (benchmarks, tests)
        self.force_layers = force_layers or {}  # ONNX weight name -> "dense"/"bsr" (--speedup's measured choice)
        self.records: list[LayerRecord] = []
        self._count = 0

    # -- helpers ---------------------------------------------------------------------------------------------

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"spc_{kind}_{self._count}"

    def _call(self, mutator, kernel: kernels.Kernel, x, out_shape) -> relax.Expr:
        func = kernel.func.with_attr("op_pattern", OPAQUE)
        gv = mutator.builder_.add_func(func, kernel.name)
        args = [x] + [relax.const(c) for c in kernel.consts]
        return relax.call_tir(gv, args, relax.TensorType(out_shape, "float32"))

    def _record(self, **kw) -> LayerRecord:
        rec = LayerRecord(index=len(self.records), **kw)
        self.records.append(rec)
        return rec

    def _identify(self, w_out_in: np.ndarray) -> tuple[str | None, str | None]:
        hit = self.weight_index.get(weight_key(w_out_in))
        return (hit[0], hit[2]) if hit else (None, None)

    def _choose(self, m_cost: int, k: int, n: int, w_out_in: np.ndarray, conv: bool):
        """(kernel, bsr or None, density, expected speedup)."""
        bsr = kernels.to_bsr(w_out_in, self.block) if self.sparse else None
        density = bsr.density if bsr is not None else 1.0
        force = self.force_layers.get(self._identify(w_out_in)[1], self.force) if self.force_layers else self.force
        if bsr is None or force == "dense":
            return "dense", None, density, 1.0
        est = cost.estimate(m_cost, k, n, density, self.block, self.params, self.spec.bsr_efficiency, conv)
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
        if w.dtype != np.float32 or _dtype(x_orig) != "float32" or _dtype(call) != "float32":
            reason = "dtype is not float32"
        elif int(attrs.groups) != 1:
            reason = f"groups={int(attrs.groups)} (grouped/depthwise convolutions use TVM's schedule)"
        elif (attrs.data_layout, attrs.kernel_layout, attrs.out_layout or "NCHW") != ("NCHW", "OIHW", "NCHW"):
            reason = "layout is not NCHW/OIHW"
        elif any(_static(d) is None for d in x_shape[1:]):
            reason = "symbolic channel or spatial size"
        if reason:
            self._record_tvm("Conv", w_out_in, reason)
            return None
        n_static = _static(x_shape[0])
        c_in, h, wd = (_static(d) for d in x_shape[1:])
        pad = [int(p) for p in attrs.padding]
        if len(pad) == 2:
            pad = pad * 2
        geom = kernels.ConvGeom(
            c_in=c_in,
            h=h,
            w=wd,
            c_out=int(w.shape[0]),
            kh=int(w.shape[2]),
            kw=int(w.shape[3]),
            stride=tuple(int(s) for s in attrs.strides),
            pad=tuple(pad),
            dilation=tuple(int(d) for d in attrs.dilation),
        )
        if w.shape[1] != c_in or geom.oh <= 0 or geom.ow <= 0:
            return None
        kind, bsr, density, speedup = self._choose(geom.pixels, geom.k, geom.c_out, w_out_in, conv=True)
        x = mutator.visit_expr(x_orig)
        flat = kernels.conv2d_takes_flat_input(geom, self.params, self.block if kind == "bsr" else None)
        n_dim = x_shape[0]
        if flat:
            x = mutator.builder_.emit(relax.op.reshape(x, [n_dim, c_in, h * wd]))
        kern = kernels.conv2d(
            self._name("conv"), geom, w_out_in, bias, act, self.params, bsr=bsr, n_static=n_static
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
        )
        return relax.op.reshape(y, [n_dim, geom.c_out, geom.oh, geom.ow])

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
        func = kern.func.with_attr("op_pattern", OPAQUE)
        gv = mutator.builder_.add_func(func, kern.name)
        c = mutator.builder_.emit(relax.call_tir(gv, [a, b], relax.TensorType([bdim, m, n], "float32")))
        return relax.op.reshape(c, list(batch_a) + [m, n])


def _expr_str(expr) -> str:
    import re

    return re.sub(r"T\.int64\((-?\d+)\)", r"\1", str(expr))


def _cost_dim(dims) -> int:
    """Rows for the cost model when some dims are symbolic: symbolic dims count as 1 (latency, batch 1)."""
    out = 1
    for d in dims:
        s = _static(d)
        out *= s if s is not None else 1
    return out


def _weight_layers(mod: tvm.IRModule, func_name: str = "main"):
    """(call, [out, in] weight view, is_conv, rows for the manifest, rows for the cost model, why no spc kernel)."""
    for block in mod[func_name].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not _is_weight_call(call):
                continue
            w = _const_array(call.args[1])
            if w is None:
                continue
            conv = call.op.same_as(OP_CONV2D)
            view = w.reshape(w.shape[0], -1) if conv else w.T
            out_shape = _shape(call) or []
            why = ""
            if w.dtype != np.float32 or _dtype(call) != "float32":
                why = "dtype is not float32"
            if conv:
                rows = int(np.prod([_static(d) or 1 for d in out_shape[2:]]))
                cost_rows = rows
                if int(call.attrs.groups) != 1:
                    why = f"groups={int(call.attrs.groups)}"
            else:
                lead = out_shape[:-1]
                if any(_static(d) is None for d in lead):
                    rows = _expr_str(tvm.sym.Analyzer().simplify(_prod(lead)))
                else:
                    rows = int(np.prod([_static(d) for d in lead]))
                cost_rows = _cost_dim(lead)
            yield call, view, conv, rows, cost_rows, why


def describe(mod: tvm.IRModule, weight_index: dict, reason: str, func_name: str = "main") -> list[LayerRecord]:
    """Per-layer records for targets compiled by TVM's own schedules (no rewriting)."""
    records: list[LayerRecord] = []
    for _call, view, conv, rows, _cost_rows, _why in _weight_layers(mod, func_name):
        hit = weight_index.get(weight_key(view))
        records.append(
            LayerRecord(
                index=len(records),
                op="Conv" if conv else "MatMul",
                node=hit[0] if hit else None,
                weight=hit[2] if hit else None,
                shape=[int(d) for d in view.shape],
                rows=rows,
                kernel="dense",
                reason=reason,
            )
        )
    return records


def sparsity_plan(
    mod: tvm.IRModule, weight_index: dict, spec: TargetSpec, block: tuple[int, int], density: float
) -> dict[str, tuple[float, str]]:
    """ONNX weight name -> (predicted BSR speed-up at ``density``, reason it does not pay or ""): which layers are
    worth sparsifying (a layer that would run dense anyway keeps its weights)."""
    plan: dict[str, tuple[float, str]] = {}
    for _call, view, conv, _rows, cost_rows, why in _weight_layers(mod):
        hit = weight_index.get(weight_key(view))
        if hit is None:
            continue
        out, inp = (int(d) for d in view.shape)
        if why:
            plan[hit[2]] = (1.0, f"no spc kernel: {why}")
            continue
        est = cost.estimate(cost_rows, inp, out, density, block, spec.cpu_kernels, spec.bsr_efficiency, conv)
        speedup = round(est.speedup, 2)
        plan[hit[2]] = (speedup, "" if speedup >= cost.MIN_SPEEDUP else f"BSR predicted x{speedup} at {cost_rows} rows")
    return plan


def rewrite(mod: tvm.IRModule, lowering: Lowering, func_name: str = "main") -> tvm.IRModule:
    func = mod[func_name]
    plan = _Plan(func)
    rewriter = _Rewriter(mod, lowering, plan)
    new_func = rewriter.visit_expr(func)
    out = rewriter.builder_.get()
    out[func_name] = new_func
    out = relax.transform.DeadCodeElimination([func_name])(out)
    return out


# ---- scheduling of the legalized glue ----------------------------------------------------------------------------


def _glue_rules(lanes: int):
    from tvm import s_tir
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

    class Safe(dl.ScheduleRule):
        """Run a rule; a rule that fails on an unusual function leaves it to the next rule."""

        def __init__(self, rule):
            self.rule = rule

        def apply(self, func, target, tunable):
            try:
                return self.rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - fall through to the next rule
                return None

    class Glue(dl.ScheduleRule):
        """Injective and reduction glue: inline spatial producers, parallelise the outer spatial loops, vectorise
        the innermost spatial loop when its extent is static."""

        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            infos = try_inline_contiguous_spatial(sch, infos)
            changed = False
            for info in infos:
                changed |= self._block(sch, info)
            return sch if changed else None

        def _block(self, sch, info) -> bool:
            kinds = info.dom_kind()
            n_spatial = len(kinds) - len(kinds.lstrip("S"))
            if n_spatial == 0:
                return False
            loops = sch.get_loops(info.block_rv)
            if len(loops) != len(kinds):
                return False
            spatial = list(loops[:n_spatial])
            extents = [_static_extent(sch, lp) for lp in spatial]
            total = None if any(e is None for e in extents) else int(np.prod(extents))
            if info.is_injective() and extents[-1] is not None and extents[-1] % lanes == 0 and len(spatial) >= 1:
                outer, inner = sch.split(spatial[-1], factors=[None, lanes])
                sch.vectorize(inner)
                spatial[-1] = outer
            if total is not None and total * max(1, _reduce_extent(sch, loops[n_spatial:])) < 16384:
                return True  # too small to pay for a parallel launch
            fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            sch.parallel(fused)
            return True

    def _static_extent(sch, loop):
        ext = sch.get(loop).extent
        return int(ext.value) if isinstance(ext, tirx.IntImm) else None

    def _reduce_extent(sch, loops):
        out = 1
        for lp in loops:
            e = _static_extent(sch, lp)
            out *= e if e is not None else 64
        return out

    return [Safe(dl.cpu.Reduction()), Safe(Glue())]


def cpu_pipeline(spec: TargetSpec):
    """The Relax pipeline for CPU targets (after ``rewrite``): legalize, fuse, schedule the glue, lower."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    target = spec.tvm()
    lanes = spec.vector_lanes

    @tvm.transform.module_pass(opt_level=0, name="SpcCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                [
                    relax.transform.DecomposeOpsForInference(),
                    relax.transform.CanonicalizeBindings(),
                    # exp/erf/tanh/softmax as vectorisable polynomials (max rel. error 3e-7) instead of libm calls
                    relax.transform.FastMathTransform(),
                    *cpu_generic.library_dispatch_passes(target),
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    dl.ApplyDefaultSchedule(*_glue_rules(lanes)),
                    *cpu_generic.dataflow_lower_passes(target),
                    *cpu_generic.finalize_passes(target),
                ]
            )
            return seq(mod)

    return _pipeline
