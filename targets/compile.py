"""compile_model: ONNX -> (block sparsification) -> TVM Relax -> a deployable bundle directory.

Bundle layout (``out_dir``):

    model.onnx      the model the library was compiled from (after sparsification, input shapes bound)
    model.so        the compiled library (Relax VM executable; weights embedded as constants)
    model.cu        cuda only: the generated CUDA source (also embedded in model.so)
    manifest.json   target, TVM target, inputs/outputs, per-layer decisions, expected speed-up
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from .conv_transpose import lower_conv_transpose
from .depth_first import split_prefix
from .errors import SpcError
from .fold import fold_batchnorm, fold_pad, fold_shape_constants
from .op_forms import rewrite_op_forms
from .recurrent import unroll_recurrent
from .registry import TargetSpec, get_target
from .widen import widen_to_float32

FORMAT = "spc-bundle/1"
LIBRARY = "model.so"
MODEL = "model.onnx"
MANIFEST = "manifest.json"
CUDA_SOURCE = "model.cu"
_OWN_FILES = (LIBRARY, MODEL, MANIFEST, CUDA_SOURCE)

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def _load_sparsify():
    try:
        from spc.passes.sparsify import sparsify
    except ImportError:  # targets/ imported from a source checkout without the spc package installed
        from passes.sparsify import sparsify
    return sparsify


def _graph_inputs(model: onnx.ModelProto):
    inits = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def input_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Each graph input's dims: sizes, dim names, '?' for an unnamed dynamic one."""
    return {vi.name: _dims(vi) for vi in _graph_inputs(model)}


def _dims(vi) -> list:
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def bind_shapes(model: onnx.ModelProto, input_shapes: dict[str, list] | None) -> dict[str, list]:
    """Set the given input shapes on the graph inputs (in place); returns what was bound. An entry that is the
    name of the input's own symbolic dim keeps that dim symbolic (bind the batch, keep the sequence length)."""
    if not input_shapes:
        return {}
    inputs = {vi.name: vi for vi in _graph_inputs(model)}
    bound = {}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise SpcError(f"input_shapes names {name!r}, which is not a model input ({', '.join(inputs)})")
        vi = inputs[name]
        old = _dims(vi)
        shape = [s if isinstance(s, str) else int(s) for s in shape]
        if len(shape) != len(old) or any(
            (o != s) if isinstance(o, int) or isinstance(s, str) else False for o, s in zip(old, shape)
        ):
            raise SpcError(f"input_shapes gives {name!r} the shape {shape}, incompatible with the model's {old}")
        dims = vi.type.tensor_type.shape.dim
        for d, s in zip(dims, shape):
            if isinstance(s, int):
                d.Clear()
                d.dim_value = s
        bound[name] = shape
    return bound


def _check_supported_ops(model: onnx.ModelProto, spec: TargetSpec) -> None:
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"Constant", "If"}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise SpcError(
                f"target {spec.name} cannot compile node {node.name or node.op_type!r}: op {node.domain}::"
                f"{node.op_type} is outside the standard ONNX domain"
            )
        if node.op_type not in known:
            raise SpcError(
                f"target {spec.name} cannot compile node {node.name or node.op_type!r}: op {node.op_type} is not "
                f"supported by TVM's ONNX importer"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # TVM errors carry a traceback; keep the most specific line
    lines = [ln.strip() for ln in text if ln.strip() and not ln.strip().startswith(("File ", "at ", "^"))]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "not" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _op_in_error(exc: BaseException) -> str | None:
    import re

    m = re.search(r"(relax\.[A-Za-z0-9_.]+)", str(exc))
    return m.group(1) if m else None


def _dynamic_hint(model: onnx.ModelProto) -> str:
    """For an error of TVM's importer or compiler on a model with dynamic input dims: how to compile it anyway
    (its shape functions for masks and position ids built from the input's sizes are where TVM gives up)."""
    names = sorted({d for dims in input_dims(model).values() for d in dims if isinstance(d, str) and d != "?"})
    if not names:
        return ""
    sizes = " ".join(f"--dim {name}=N" for name in names)
    return f" (dynamic dims {', '.join(names)}; to compile for fixed sizes: {sizes} --bind-dims)"


def _import(model: onnx.ModelProto, spec: TargetSpec, shared: bool = False):
    """``shared``: merge equal expressions before constant folding (the per-image copies of a depth-first prefix
    each reshape the same biases, and folding each copy's again took 8x the time)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    dtypes = {}
    for vi in _graph_inputs(model):
        dtypes[vi.name] = _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, "float32")
    try:
        mod = from_onnx(model, dtype_dict=dtypes, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as exc:  # noqa: BLE001 - the importer raises many types
        raise SpcError(f"target {spec.name}: TVM could not import the model: {_first_line(exc)}"
                       f"{_dynamic_hint(model)}") from exc
    if shared:
        mod = relax.transform.EliminateCommonSubexpr()(mod)
    mod = relax.transform.FoldConstant()(mod)
    del tvm
    return mod


def _type_info(ty) -> list[dict]:
    from tvm import relax, tirx

    def one(t):
        shape = []
        if getattr(t, "shape", None) is not None and hasattr(t.shape, "values"):
            for d in t.shape.values:
                shape.append(int(d.value) if isinstance(d, tirx.IntImm) else str(d))
        return {"shape": shape, "dtype": str(t.dtype)}

    if isinstance(ty, relax.TupleType):
        return [one(f) for f in ty.fields]
    return [one(ty)]


def _distinct(records: list) -> list:
    seen, out = set(), []
    for record in records:
        key = (record.node, record.weight, tuple(record.shape), record.kernel)
        if record.node is None or key not in seen:
            seen.add(key)
            out.append(dataclasses.replace(record, index=len(out)))
    return out


def compile_model(
    model: onnx.ModelProto,
    target: str | TargetSpec,
    out_dir: str | Path,
    *,
    sparsity: float | dict[str, float] = 0.0,
    block: tuple[int, int] = (4, 1),
    input_shapes: dict[str, list[int]] | None = None,
    progress: Callable[[str], None] | None = None,
    kernel: str | None = None,
    depth_first: bool = True,
    winograd: bool = True,
) -> dict:
    """Compile ``model`` for ``target`` ("x86", "arm", "cuda", ... see list_targets) into ``out_dir``.

    ``sparsity`` > 0 zeroes that fraction of each large MatMul/Gemm/Conv weight's ``block``-shaped blocks
    (passes/sparsify.py); layers where the block-sparse kernel is predicted faster use it. Symbolic input dims stay
    symbolic (dynamic batch) unless ``input_shapes`` binds them. ``kernel`` ("dense" or "bsr") overrides the cost
    model's per-layer choice (benchmarks). ``sparsity`` may instead map weight (initializer) names to fractions:
    exactly those layers are sparsified, each at its own fraction, and run the BSR kernel (``--speedup`` measured
    that it pays); the others stay dense. With a static batch of images, CPU targets run the high-resolution layers
    one image at a time (depth_first.py) unless ``depth_first`` is False. Dense 3x3 convolutions at stride 1 or 2
    run by Winograd's algorithm where it pays (fewer multiplies; results within about 1e-5 of the sums' magnitude)
    unless ``winograd`` is False. Returns the manifest (also written as manifest.json).
    """
    say = progress or (lambda _msg: None)
    spec = get_target(target)
    t0 = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        raise SpcError(f"compile_model expects an onnx.ModelProto, got {type(model).__name__}")
    from spc import weights

    if weights.has_external(model):  # weights still on disk (spc.load of a large model): code generation reads all
        model = weights.materialised(model)
    per_layer = _per_layer_sparsity(model, sparsity) if isinstance(sparsity, dict) else None
    if per_layer is not None:
        sparsity = 0.0
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise SpcError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= sparsity < 1.0:
        raise SpcError(f"sparsity must be in [0, 1), got {sparsity}")
    try:
        block = tuple(int(b) for b in block)
    except (TypeError, ValueError):
        raise SpcError(f"block must be two positive ints, got {block!r}") from None
    if len(block) != 2 or min(block) < 1 or block[0] * block[1] > 64:
        raise SpcError(f"block must be two positive ints with at most 64 elements, got {block}")
    if kernel not in (None, "dense", "bsr"):
        raise SpcError(f"kernel must be 'dense' or 'bsr', got {kernel!r}")
    out = Path(out_dir)
    _prepare_out_dir(out)

    model = copy.deepcopy(model)
    bound = bind_shapes(model, input_shapes)
    try:
        model, n_recurrent = unroll_recurrent(model)  # TVM has no LSTM/GRU/RNN; the bundle keeps what it compiled
    except SpcError as exc:
        raise SpcError(f"target {spec.name} {exc}") from None
    if n_recurrent:
        say(f"unrolled {n_recurrent} recurrent node(s) (LSTM/GRU/RNN) over their sequence length")
    _check_supported_ops(model, spec)

    notes = list(spec.notes)
    sparsify_report = None
    force_layers = None
    if per_layer and not spec.sparse_kernels:
        notes.append(f"per-layer sparsity not applied: target {spec.name} has no block-sparse kernels")
    elif per_layer:
        model, report = _load_sparsify()(model, per_layer, block, min_size=0)  # the caller chose them
        sparsify_report = report.to_json()
        force_layers = {layer.weight: "bsr" for layer in report.sparsified if layer.zero_blocks}
        say(f"sparsifying {len(force_layers)} weight layer(s) as the per-layer map says; they run block-sparse")
    if sparsity > 0:
        if not spec.sparse_kernels:
            notes.append(f"sparsity {sparsity} not applied: target {spec.name} has no block-sparse kernels")
            say(f"{spec.name}: no block-sparse kernels, sparsity ignored")
        else:
            from .layer_records import index_onnx_weights, sparsity_plan

            # only layers whose block-sparse kernel is predicted to pay lose weights
            importable = fold_pad(fold_shape_constants(model)[0])[0]  # weights as given: the index finds them
            plan = sparsity_plan(_import(importable, spec), index_onnx_weights(model), spec, block, 1.0 - sparsity,
                                 winograd)
            skip = {} if kernel == "bsr" else {name: why for name, (_speedup, why) in plan.items() if why}
            say(f"sparsifying weights: {sparsity:.0%} of {block[0]}x{block[1]} blocks per layer "
                f"({len(plan) - len(skip)} of {len(plan)} layers pay)")
            model, report = _load_sparsify()(model, sparsity, block, skip=skip)
            sparsify_report = report.to_json()
            if skip:
                notes.append(
                    f"{len(skip)} weight layer(s) kept dense: the block-sparse kernel is not predicted to pay "
                    "(see sparsify.layers[].skipped; symbolic row counts are costed as 1: bind them with input_shapes)"
                )

    say(f"importing into TVM Relax ({spec.name}: {spec.description})")
    codegen_model, n_widened = widen_to_float32(model) if spec.is_cpu else (model, 0)
    if n_widened:
        notes.append("float16/bfloat16 computed in float32 (spc's CPU kernels are float32; the inputs and outputs "
                     "keep their types)")
        say("computing the float16/bfloat16 model in float32 (spc's CPU kernels are float32)")
    folded_model, n_folded = fold_batchnorm(codegen_model)  # the bundle keeps `model`; code is generated from this
    if n_folded:
        say(f"folded {n_folded} BatchNormalization(s) into the convolution before each")
    folded_model, _ = fold_shape_constants(folded_model)  # e.g. Pad amounts computed from constants
    if spec.is_cpu:  # ops TVM leaves as scalar loop nests on CPUs, in forms spc's kernels run
        folded_model, n_forms = rewrite_op_forms(folded_model)
        if n_forms:
            say(f"rewrote {n_forms} op(s) (1-D convolutions, norms, pools, upsampling, einsums) for spc's kernels")
        folded_model, n_transposed = lower_conv_transpose(folded_model)
        if n_transposed:
            say(f"rewrote {n_transposed} ConvTranspose(s) as convolutions")
    folded_model, n_pads = fold_pad(folded_model)
    if n_pads:
        say(f"folded {n_pads} zero Pad(s) into the convolution after each")
    split = depth_first
    depth_first = None
    layers_model = folded_model  # the per-layer records name the model's nodes, not their per-image copies
    if split and spec.is_cpu:  # a static batch of images: the high-resolution layers one image at a time
        folded_model, depth_first = split_prefix(folded_model)
        if depth_first:
            say(f"running the first {depth_first['prefix_nodes']} nodes one image at a time "
                f"({depth_first['images']} images; their feature maps stay in cache)")
    mod = _import(folded_model, spec, shared=depth_first is not None)
    records = []
    if spec.is_cpu:
        from .glue_schedule import cpu_pipeline
        from .layer_records import index_onnx_weights
        from .lower import Lowering, rewrite

        lowering = Lowering(
            spec,
            block=block,
            weight_index=index_onnx_weights(layers_model),
            sparse=spec.sparse_kernels,
            force=kernel,
            force_layers=force_layers,
            winograd=winograd,
        )
        try:
            mod = rewrite(mod, lowering)
        except SpcError:
            raise
        records = lowering.records
        if depth_first:  # the per-image copies of a layer are one layer
            records = _distinct(records)
        n_bsr = sum(r.kernel == "bsr" for r in records)
        say(f"lowered {len(records)} weight layers: {n_bsr} block-sparse, {len(records) - n_bsr} dense/other")
        pipeline = cpu_pipeline(spec)
    else:
        from .layer_records import describe, index_onnx_weights

        records = describe(mod, index_onnx_weights(layers_model), "TVM's default (dlight) schedule for this target")
        pipeline = "default"

    import tvm
    from tvm import relax

    say(f"compiling with TVM {tvm.__version__} for {spec.tvm_target}")
    try:
        ex = relax.build(mod, target=spec.tvm(), relax_pipeline=pipeline, exec_mode=spec.vm_exec_mode)
    except Exception as exc:  # noqa: BLE001 - TVM raises many types
        op = _op_in_error(exc)
        what = f"op {op}" if op else "the model"
        raise SpcError(f"target {spec.name} cannot compile {what}: {_first_line(exc)}{_dynamic_hint(model)}") from exc

    lib_path = out / LIBRARY
    say(f"exporting {lib_path}" + (f" with {spec.cross_compiler}" if spec.cross_compiler else ""))
    if spec.cross_compiler:
        from tvm.support import cc

        ex.export_library(str(lib_path), fcompile=cc.cross_compiler(spec.cross_compiler))
    else:
        ex.export_library(str(lib_path))
    files = {"library": LIBRARY, "model": MODEL}
    if spec.emits_source:
        src = _device_source(ex, spec.emits_source)
        (out / CUDA_SOURCE).write_text(src)
        files["device_source"] = CUDA_SOURCE
    onnx.save(model, str(out / MODEL))

    main = mod["main"]
    in_types = [p.ty for p in main.params]
    inputs = []
    for vi, ty in zip(_graph_inputs(model), in_types):
        info = _type_info(ty)[0]
        inputs.append({"name": vi.name, **info})
    outputs = []
    for vo, info in zip(model.graph.output, _type_info(main.ret_ty)):
        outputs.append({"name": vo.name, **info})
    symbolic = sorted({d for io in inputs for d in io["shape"] if isinstance(d, str)})
    manifest = {
        "format": FORMAT,
        "target": spec.name,
        "description": spec.description,
        "tvm_version": tvm.__version__,
        "tvm_target": spec.tvm_target,
        "tvm_host": spec.tvm_host,
        "cross_compiler": spec.cross_compiler,
        "files": files,
        "entry": "main",
        "inputs": inputs,
        "outputs": outputs,
        "bound_shapes": bound,
        "dynamic_dims": symbolic,
        "threads": "all cores by default (load_bundle and the arm runner set TVM_NUM_THREADS to the core "
        "count when it is unset); TVM_NUM_THREADS overrides",
        "params": "embedded in the library",
        "sparsity": per_layer if per_layer is not None else sparsity,
        "block": list(block),
        "round_to": spec.round_to,
        "vector_lanes": spec.vector_lanes,
        "layers": [r.to_json() for r in records],
        "depth_first": depth_first,
        "winograd": winograd,
        "expected_speedup": _overall_speedup(records),
        "cost_model": "symbolic row counts (dynamic batch) are costed as 1 unless input_shapes binds them",
        "sparsify": sparsify_report,
        "notes": notes,
        "compile_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote bundle {out} ({manifest['compile_seconds']} s)")
    return manifest


def _per_layer_sparsity(model: onnx.ModelProto, sparsity: dict) -> dict[str, float]:
    """Validate a {weight name: fraction} map: each name a MatMul/Gemm/Conv weight, each fraction in [0, 1)."""
    weights = {node.input[1] for node in model.graph.node
               if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1}
    out = {}
    for name, value in sparsity.items():
        if name not in weights:
            raise SpcError(f"sparsity names {name!r}, which is not the weight of a MatMul/Gemm/Conv node")
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise SpcError(f"sparsity of {name!r} must be a number in [0, 1), got {value!r}") from None
        if not 0.0 <= out[name] < 1.0:
            raise SpcError(f"sparsity of {name!r} must be in [0, 1), got {value}")
    return out


def _overall_speedup(records) -> float:
    """MAC-weighted expected speed-up of the weight layers (dense/other layers count 1.0)."""
    total = dense = 0.0
    for r in records:
        rows = r.rows if isinstance(r.rows, int) else 1
        macs = float(r.shape[0]) * float(r.shape[1]) * max(rows, 1)
        total += macs
        dense += macs / max(r.expected_speedup, 1e-6)
    return round(total / dense, 2) if dense else 1.0


def _device_source(ex, kind: str) -> str:
    sources = []

    def walk(mod):
        for sub in mod.imports:
            if sub.kind == kind:
                sources.append(sub.inspect_source(kind))
            walk(sub)

    walk(ex.mod)
    return "\n".join(sources)


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SpcError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.glob("*.onnx") if p.name != MODEL]
    if foreign:
        raise SpcError(
            f"output directory {out} already holds {', '.join(sorted(foreign))}; a bundle has exactly one .onnx "
            f"file: choose another directory"
        )
    if (out / MODEL).exists() and not (out / MANIFEST).exists():
        raise SpcError(f"output directory {out} holds a {MODEL} that is not from an spc bundle: choose another")
    for name in _OWN_FILES:
        path = out / name
        if path.exists():
            os.remove(path)


def bundle_inputs(manifest: dict, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs matching a manifest (symbolic dims take ``dims`` or 1): tests and benchmarks."""
    rng = np.random.default_rng(seed)
    out = {}
    for io in manifest["inputs"]:
        shape = [d if isinstance(d, int) else (dims or {}).get(d, 1) for d in io["shape"]]
        if io["dtype"].startswith("float"):
            out[io["name"]] = rng.standard_normal(shape).astype(io["dtype"])
        else:
            out[io["name"]] = rng.integers(0, 2, size=shape).astype(io["dtype"])
    return out
