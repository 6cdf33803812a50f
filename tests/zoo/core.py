"""Zoo registry, deterministic model building and ONNX export.

Public API (re-exported by ``tests.zoo``):

* ``ZOO``      name -> zero-argument builder returning the ``nn.Module`` (eval mode).
* ``INPUTS``   name -> list of ``InputSpec`` (name, shape, dtype, dynamic axes).
* ``build(name, seed=0)``   seeded model with non-trivial norm statistics + example inputs.
* ``export(name, path, opset=17, exporter=..., dynamic=True, fold_bn=True, optimize=True)``
  writes a self-contained ``.onnx`` and returns ``{input name: np.ndarray}``.
* ``DEFAULT_EXPORTER``  "dynamo" unless the environment sets SPC_ZOO_EXPORTER=legacy.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import torch
import torch.nn as nn

from . import cnn, hf, transformer

Exporter = Literal["legacy", "dynamo"]

#: exporter used when ``export(exporter=None)``.  The dynamo (torch.export) exporter gives
#: markedly cleaner graphs when axes are dynamic: it knows which dims are symbolic, whereas
#: the TorchScript exporter records every ``x.size(i)`` as Shape->Gather->Unsqueeze->Concat
#: arithmetic (e.g. shufflenetv2 83 vs 195 nodes, swin 208 vs 372, gpt2 114 vs 251).  The
#: legacy exporter is 2-5x faster; set SPC_ZOO_EXPORTER=legacy to make it the default.
DEFAULT_EXPORTER: Exporter = os.environ.get("SPC_ZOO_EXPORTER", "dynamo")  # type: ignore[assignment]
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    dynamic: dict[int, str] = field(default_factory=dict)  # axis -> symbolic dim name
    high: int = 0  # exclusive upper bound for integer inputs (token ids)
    fill: int | None = None  # constant fill for integer inputs (attention mask)


def _image(size: int) -> list[InputSpec]:
    return [InputSpec("x", (1, 3, size, size), dynamic={0: "batch"})]


def _tokens(vocab: int = 100, seq: int = 8, mask: bool = True) -> list[InputSpec]:
    specs = [InputSpec("input_ids", (1, seq), torch.int64, {0: "batch", 1: "seq"}, high=vocab)]
    if mask:
        specs.append(InputSpec("attention_mask", (1, seq), torch.int64, {0: "batch", 1: "seq"}, fill=1))
    return specs


ZOO: dict[str, Callable[[], nn.Module]] = {
    # CNNs (tests/zoo/cnn.py)
    "resnet18": cnn.resnet18,
    "resnet50": cnn.resnet50,
    "mobilenetv2": cnn.mobilenetv2,
    "mobilenetv3": cnn.mobilenetv3,
    "efficientnet_b0": cnn.efficientnet_b0,
    "regnet": cnn.regnet,
    "densenet121": cnn.densenet121,
    "shufflenetv2": cnn.shufflenetv2,
    "googlenet": cnn.googlenet,
    "convnext": cnn.convnext,
    "unet": cnn.unet,
    # token models written by hand (tests/zoo/transformer.py)
    "vit": transformer.vit,
    "swin": transformer.swin,
    "mlp_mixer": transformer.mlp_mixer,
    "lstm": transformer.lstm,
    # Hugging Face transformers from tiny configs (tests/zoo/hf.py)
    "bert": hf.bert,
    "gpt2": hf.gpt2,
    "llama": hf.llama,
    "t5_encoder": hf.t5_encoder,
}

INPUTS: dict[str, list[InputSpec]] = {
    **{n: _image(64) for n in ("resnet18", "resnet50", "mobilenetv2", "mobilenetv3", "efficientnet_b0",
                               "regnet", "densenet121", "shufflenetv2", "googlenet", "convnext")},
    **{n: _image(32) for n in ("unet", "vit", "swin", "mlp_mixer")},
    "lstm": _tokens(mask=False),
    **{n: _tokens() for n in ("bert", "gpt2", "llama", "t5_encoder")},
}

assert set(ZOO) == set(INPUTS)


# ----------------------------------------------------------------------------- build
def randomize_(model: nn.Module, seed: int = 1234) -> nn.Module:
    """Give norms / layer scales / zero biases random values (in place).

    Fresh modules have BatchNorm running stats (0, 1), norm weights 1, biases 0, and
    ConvNeXt layer scales 1e-6: all of that would hide a wrongly pruned channel in
    those parameters, so make them non-trivial (but well conditioned).
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(p, lo, hi):
        return torch.empty(p.shape).uniform_(lo, hi, generator=g)

    with torch.no_grad():
        for mod in model.modules():
            is_norm = "norm" in type(mod).__name__.lower()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(uniform(mod.running_var, 0.5, 1.5))
            for pname, p in mod.named_parameters(recurse=False):
                if is_norm and pname == "weight":
                    p.copy_(uniform(p, 0.5, 1.5))
                elif is_norm and pname == "bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif pname == "layer_scale":
                    p.copy_(uniform(p, 0.5, 1.5))
                elif pname == "bias" and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def example_inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in INPUTS[name]:
        if s.dtype.is_floating_point:
            out[s.name] = torch.randn(s.shape, generator=g, dtype=s.dtype)
        elif s.fill is not None:
            out[s.name] = torch.full(s.shape, s.fill, dtype=s.dtype)
        else:
            out[s.name] = torch.randint(0, s.high, s.shape, generator=g, dtype=s.dtype)
    return out


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Seeded model (eval mode, randomized norms) and its example inputs (torch tensors)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    torch.manual_seed(seed)
    model = randomize_(ZOO[name]()).eval()
    return model, example_inputs(name, seed)


# ---------------------------------------------------------------------------- export
@contextlib.contextmanager
def _without_bn_fusion():
    """Temporarily drop onnxscript's BatchNormalization-into-Conv/Gemm rewrite rules."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    saved = rewriter._DEFAULT_REWRITE_RULES
    bn_rules = set(map(id, _fuse_batchnorm.rules))
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in bn_rules)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _optimize(model, fold_bn: bool):
    """onnxscript's optimizer (constant folding, CSE, no-op removal, ...) on a proto or ir.Model."""
    import logging

    import onnxscript.optimizer

    log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = log.level
    log.setLevel(logging.ERROR)  # "Evaluation failed: ..." warnings are harmless noise
    try:
        with contextlib.nullcontext() if fold_bn else _without_bn_fusion():
            return onnxscript.optimizer.optimize(model)
    finally:
        log.setLevel(level)


_REDUCE_AXES_INPUT = {  # ops whose ``axes`` became an input in opset 18
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSumSquare",
}
_NEW_IN_18 = {
    "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad", "Col2Im",
    "GroupNormalization", "Mish", "OptionalGetElement", "OptionalHasElement",
}


def _downgrade(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Rewrite an opset-18 model (what the dynamo exporter emits) for an older opset.

    onnx's version converter cannot do 18 -> 17 for Split and leaves an invalid attribute
    on Reduce ops, so the few 17/18 differences are rewritten here directly:
    ``ReduceX(data, axes)`` -> ``ReduceX(data){axes}`` and ``Split{num_outputs}`` ->
    ``Split(data, split)``.  Anything else that changed in opset 18 raises.  Targets below
    17 go through onnx's converter from there.
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in [*inferred.input, *inferred.value_info, *inferred.output]
        if vi.type.tensor_type.HasField("shape")
    }
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def const_value(name: str) -> np.ndarray:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        raise RuntimeError(f"opset {opset}: {name!r} must be a constant")

    def attr(node, name):
        return next((a for a in node.attribute if a.name == name), None)

    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _NEW_IN_18:
            raise RuntimeError(f"{node.op_type} does not exist before opset 18")
        if node.op_type in _REDUCE_AXES_INPUT:
            noop = attr(node, "noop_with_empty_axes")
            has_axes = len(node.input) > 1 and node.input[1] != ""
            if noop is not None:
                if noop.i and not has_axes:
                    raise RuntimeError(f"{node.name}: noop_with_empty_axes=1 has no opset-17 form")
                node.attribute.remove(noop)
            if has_axes:
                axes = const_value(node.input[1]).astype(np.int64).reshape(-1).tolist()
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", axes))
        elif node.op_type == "Split" and attr(node, "num_outputs") is not None:
            n = attr(node, "num_outputs").i
            axis = attr(node, "axis").i if attr(node, "axis") is not None else 0
            shape = shapes.get(node.input[0])
            dim = shape[axis] if shape is not None else None
            if dim is None:
                raise RuntimeError(f"{node.name}: Split{{num_outputs}} on a dynamic axis")
            chunk = -(-dim // n)  # opset-18 semantics: ceil-sized chunks, last one smaller
            sizes = [min(chunk, dim - i * chunk) for i in range(n)]
            name = f"{node.output[0]}__split_sizes"
            g.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), name))
            node.attribute.remove(attr(node, "num_outputs"))
            del node.input[1:]
            node.input.append(name)
        elif node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            raise RuntimeError(f"{node.name}: Pad with axes has no opset-17 form")
        elif node.op_type == "Resize":
            for a in ("antialias", "keep_aspect_ratio_policy"):
                at = attr(node, a)
                if at is not None:
                    if (at.i if a == "antialias" else at.s != b"stretch"):
                        raise RuntimeError(f"{node.name}: Resize {a} has no opset-17 form")
                    node.attribute.remove(at)
        elif node.op_type in ("ScatterElements", "ScatterND"):
            red = attr(node, "reduction")
            if red is not None and red.s in (b"max", b"min"):
                raise RuntimeError(f"{node.name}: reduction={red.s!r} has no opset-17 form")
        elif node.op_type == "LpPool" and attr(node, "ceil_mode") is not None:
            if attr(node, "ceil_mode").i:
                raise RuntimeError(f"{node.name}: LpPool ceil_mode has no opset-17 form")
            node.attribute.remove(attr(node, "ceil_mode"))
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 17
    _remove_unused_constants(proto)  # the axes tensors that became attributes
    if opset < 17:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, opset)
    onnx.checker.check_model(proto)
    return proto


def _remove_unused_constants(proto: onnx.ModelProto) -> None:
    g = proto.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
        for n in dead:
            g.node.remove(n)
        if not dead:
            break
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _export_legacy(model, args, specs, opset, dynamic, fold_bn) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, buf, dynamo=False, opset_version=opset,
            input_names=[s.name for s in specs], output_names=[OUTPUT_NAME],
            dynamic_axes={s.name: dict(s.dynamic) for s in specs} if dynamic else None,
            # EVAL folds BatchNorm into the preceding Conv; PRESERVE (model is in eval mode
            # anyway) keeps BatchNormalization nodes.
            training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


#: dims the dynamo exporter cannot keep symbolic (torch.export unrolls nn.LSTM over time)
_DYNAMO_STATIC_DIMS: dict[str, set[str]] = {"lstm": {"seq"}}


def _export_dynamo(name, model, args, specs, opset, dynamic) -> "object":
    dims: dict[str, torch.export.Dim] = {}

    def dim(n: str):
        if n not in dims:
            dims[n] = torch.export.Dim(n, max=hf.TINY["max_pos"]) if n == "seq" else torch.export.Dim(n)
        return dims[n]

    dynamic_shapes = None
    if dynamic:
        static = _DYNAMO_STATIC_DIMS.get(name, set())
        dynamic_shapes = tuple(
            {ax: dim(n) for ax, n in s.dynamic.items() if n not in static} or None for s in specs
        )
        # torch.export specialises size-1 dims ("0/1 specialisation"): trace with batch 2
        args = tuple(
            torch.cat([a, a], 0) if any(n == "batch" for n in s.dynamic.values()) else a
            for a, s in zip(args, specs)
        )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, dynamo=True, opset_version=max(opset, 18),
            input_names=[s.name for s in specs], output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes, optimize=False, verbose=False, external_data=False,
        )
    return program.model  # onnx_ir.Model


_CACHE: dict[tuple, tuple[bytes, dict[str, np.ndarray]]] = {}


def _disk_cache_dir() -> Path | None:
    """``$SPC_ZOO_CACHE`` (``0``/empty disables), default ``tests/zoo/.cache``."""
    d = os.environ.get("SPC_ZOO_CACHE", str(Path(__file__).with_name(".cache")))
    return None if d in ("", "0") else Path(d)


def _disk_key(key: tuple) -> str:
    """Hash of the export arguments, the zoo's source files and the tool versions."""
    import hashlib
    import importlib.metadata as md

    h = hashlib.sha256(repr(key).encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if f.name != "check_zoo.py":
            h.update(f.read_bytes())
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir"):
        try:
            h.update(f"{pkg}={md.version(pkg)}".encode())
        except md.PackageNotFoundError:
            pass
    return f"{key[0]}-{h.hexdigest()[:16]}"


def _disk_load(key: tuple) -> tuple[bytes, dict[str, np.ndarray]] | None:
    d = _disk_cache_dir()
    if d is None:
        return None
    stem = d / _disk_key(key)
    try:
        with np.load(stem.with_suffix(".npz")) as z:
            arrays = {k: z[k] for k in z.files}
        return stem.with_suffix(".onnx").read_bytes(), arrays
    except (OSError, ValueError):
        return None


def _disk_store(key: tuple, data: bytes, arrays: dict[str, np.ndarray]) -> None:
    d = _disk_cache_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        stem = d / _disk_key(key)
        tmp = stem.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, stem.with_suffix(".onnx"))
        with open(tmp, "wb") as f:  # inputs last: their presence marks a complete entry
            np.savez(f, **arrays)
        os.replace(tmp, stem.with_suffix(".npz"))
    except OSError:
        pass


#: dynamo node metadata dropped from the written file (bulky, machine-specific paths)
_DROP_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_metadata(proto: onnx.ModelProto) -> None:
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DROP_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def export(
    name: str,
    path: str | Path,
    opset: int = 17,
    *,
    exporter: Exporter | None = None,
    dynamic: bool = True,
    fold_bn: bool = True,
    optimize: bool = True,
    seed: int = 0,
    cache: bool = True,
) -> dict[str, np.ndarray]:
    """Build zoo model ``name`` (``torch.manual_seed(seed)``), export it to ONNX at ``path``.

    Args:
        opset: default-domain opset of the written model.  The dynamo exporter only emits
            opset >= 18; for 17 its optimized output is rewritten (``_downgrade``).
        exporter: ``"dynamo"`` (torch.export based, the default: cleaner graphs) or
            ``"legacy"`` (TorchScript based: 2-5x faster to export).
        dynamic: symbolic ``batch`` axis on every input, and ``seq`` on token inputs
            (except dynamo + lstm, whose time loop torch.export unrolls: static ``seq``).
        fold_bn: fold BatchNormalization into the preceding Conv, as the exporters do by
            default.  ``False`` keeps the BatchNormalization nodes.  (With dynamo the
            folding is done by the optimizer, so ``optimize=False`` also keeps them.)
        optimize: run onnxscript's optimizer (constant folding, CSE, dead-code removal).
        cache: reuse an identical earlier export (the build is deterministic): from this
            process, else from the on-disk cache ``tests/zoo/.cache`` (override the folder
            with ``$SPC_ZOO_CACHE``, ``SPC_ZOO_CACHE=0`` disables it).  Entries are keyed by
            the arguments, the zoo's source files and the torch/transformers/onnx/onnxscript
            versions, so editing a model invalidates its entry.

    Returns:
        ``{input name: array}`` example inputs for onnxruntime (batch 1), keyed and ordered
        like the graph inputs.  Weights are stored inside the file (no external data).
    """
    exporter = exporter or DEFAULT_EXPORTER
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    key = (name, opset, exporter, dynamic, fold_bn, optimize, seed)
    if cache and key not in _CACHE:
        hit = _disk_load(key)
        if hit is not None:
            _CACHE[key] = hit
    if not (cache and key in _CACHE):
        model, inputs = build(name, seed)
        specs = INPUTS[name]
        args = tuple(inputs[s.name] for s in specs)
        if exporter == "legacy":
            proto = _export_legacy(model, args, specs, opset, dynamic, fold_bn)
            if optimize:
                proto = _optimize(proto, fold_bn)
        else:
            import onnx_ir as ir

            ir_model = _export_dynamo(name, model, args, specs, opset, dynamic)
            if optimize:
                ir_model = _optimize(ir_model, fold_bn)
            proto = ir.serde.serialize_model(ir_model)
            _strip_metadata(proto)
            if opset < 18:
                proto = _downgrade(proto, opset)
        proto.producer_name = f"tests.zoo:{name}:{exporter}"
        _CACHE[key] = (proto.SerializeToString(), {k: v.numpy() for k, v in inputs.items()})
        if cache:
            _disk_store(key, *_CACHE[key])
    data, arrays = _CACHE[key]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)  # a serialized ModelProto: weights inline, no external data
    return {k: v.copy() for k, v in arrays.items()}
