"""The Relax pipeline for CPU targets after ``lower.rewrite``: legalize, fuse, and schedule the glue operators
(element-wise, reductions, layout) that spc's kernels leave to TVM."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from .registry import TargetSpec

VECTORISE_FUSED = True  # False: vectorise an element-wise loop nest only where its innermost extent is whole vectors


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
            inner_loops = _vector_suffix(extents, lanes) if info.is_injective() else 0
            if inner_loops:
                tail = spatial[-inner_loops:]
                outer, inner = sch.split(sch.fuse(*tail) if len(tail) > 1 else tail[0], factors=[None, lanes])
                sch.vectorize(inner)
                spatial = spatial[:-inner_loops] + [outer]
            if total is not None and total * max(1, _reduce_extent(sch, loops[n_spatial:])) < 16384:
                return True  # too small to pay for a parallel launch
            fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            sch.parallel(fused)
            return True

    def _vector_suffix(extents: list, lanes: int) -> int:
        """How many innermost loops to fuse into one whose extent is whole vectors (0: none): a residual add on a
        56x56 map has rows of 56 floats, not whole 16-lane vectors, but its 56 x 56 = 3136 pixels are (it ran
        as a scalar loop; 7x7 maps need the channels too)."""
        if not VECTORISE_FUSED:
            return int(extents[-1] is not None and extents[-1] % lanes == 0)
        product = 1
        for count, extent in enumerate(reversed(extents), 1):
            if extent is None:
                return 0
            product *= extent
            if product % lanes == 0:
                return count
        return 0

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


@relax.expr_functor.mutator
class _SigmoidAsExp(relax.PyExprMutator):
    """sigmoid(x) -> 1 / (1 + exp(-x)), so that FastMathTransform makes its exp a vectorisable polynomial: as
    ``tir.sigmoid`` LLVM called libm's expf once per element (SiLU on a 48 x 32 x 32 map: 0.15 ms against
    0.015 ms; EfficientNet-B0 spent 40% of its time there)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.sigmoid":
            x = call.args[0]
            one = relax.const(1.0, x.ty.dtype)
            return relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(x))))
        return call


@tvm.transform.module_pass(opt_level=0, name="SpcSigmoidAsExp")
def sigmoid_as_exp(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    mutator = _SigmoidAsExp()
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = mutator.visit_expr(func)
    return mod


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
                    # exp/erf/tanh/softmax (and sigmoid, through exp) as vectorisable polynomials (max rel. error
                    # 3e-7) instead of libm calls
                    sigmoid_as_exp,
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
