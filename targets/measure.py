"""Measured latency with the target's own compiled kernels: one layer at a given width, or a whole model.

A layer is rebuilt alone as a one-node ONNX model (a ``LayerSpec`` at input/output widths ``ci``/``co``) and compiled
by ``compile_model``, so it gets exactly the kernels, fusions and pipeline it gets inside the full model. Timing runs
on this machine or, with an RPC session (targets/rpc.py), on the device behind it: the library is uploaded there
and TVM's ``time_evaluator`` runs remotely. The statistic is the minimum over repeats of the mean of a batch of
runs: on a shared machine, interference only ever adds time.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .compile import LIBRARY, bundle_inputs, compile_model
from .errors import SpcError
from .kernels.source import window_count
from .registry import TargetSpec, get_target

_DEVICE_KIND = {"llvm": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class LayerSpec:
    """One prunable layer's shape, without its widths: ``model(ci, co)`` builds it at any width.

    ``op="expand_depthwise"`` is a 1x1 conv (``ci`` -> ``co``, on the ``height`` x ``width`` map), its
    ``activation`` and the depthwise conv (``kernel``, ``stride``, ``pads``, ``dilation``) that alone reads it: the
    compiler runs such a pair as one kernel where the map between them is large (lower.can_pair), and timed apart
    the two layers took up to 1.6x the pair's time in the model (the expanded map's trip through memory)."""

    op: str  # "conv", "matmul" or "expand_depthwise"
    rows: int  # matmul: rows of the activation (tokens x batch); conv: batch
    height: int = 1  # conv input spatial size
    width: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False  # one input channel per output channel (ci == co, group == co)
    bias: bool = False
    activation: str = ""  # expand_depthwise: between the two convs, "", "relu" or "clip:LO:HI"

    def key(self) -> dict:
        return asdict(self)

    def model(self, ci: int, co: int, seed: int = 0) -> onnx.ModelProto:
        """The layer alone at widths (ci, co); its first (or only) weight is named "W" (time_layer's sparsity map)."""
        rng = np.random.default_rng(seed)
        if self.depthwise:
            ci = co
        inits, nodes = [], []

        def conv(x: str, y: str, c_in: int, group: int, kernel, name: str, **attrs) -> None:
            w = rng.standard_normal((co, c_in // group, *kernel))
            inits.append(numpy_helper.from_array((w / np.sqrt(w[0].size)).astype(np.float32), "W" + name))
            inputs = [x, "W" + name]
            if self.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "B" + name))
                inputs.append("B" + name)
            nodes.append(helper.make_node("Conv", inputs, [y], name="layer" + name, kernel_shape=list(kernel),
                                          group=group, **attrs))

        spatial = dict(strides=list(self.stride), pads=list(self.pads), dilations=list(self.dilation))
        if self.op == "conv":
            conv("input", "output", ci, co if self.depthwise else 1, self.kernel, "", **spatial)
            x_shape, out_shape = [self.rows, ci, self.height, self.width], [self.rows, co, *self.out_hw()]
        elif self.op == "expand_depthwise":
            conv("input", "expanded", ci, 1, (1, 1), "")
            between = self._activation("expanded", "activated", inits, nodes)
            conv(between, "output", co, co, self.kernel, "_depthwise", **spatial)
            x_shape, out_shape = [self.rows, ci, self.height, self.width], [self.rows, co, *self.out_hw()]
        elif self.op == "matmul":
            x_shape, out_shape = [self.rows, ci], [self.rows, co]
            w = (rng.standard_normal((ci, co)) / np.sqrt(ci)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, "W"))
            nodes.append(helper.make_node("Gemm" if self.bias else "MatMul", ["input", "W"] + (["B"] if self.bias else []),
                                          ["output"], name="layer"))
            if self.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "B"))
        else:
            raise SpcError(f"latency: unknown layer op {self.op!r}")
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def _activation(self, x: str, y: str, inits: list, nodes: list) -> str:
        """The activation node (appended to ``nodes``) from ``x``; returns the name its reader reads."""
        if not self.activation:
            return x
        if self.activation == "relu":
            nodes.append(helper.make_node("Relu", [x], [y], name="activation"))
            return y
        kind, low, high = self.activation.split(":")
        if kind != "clip":
            raise SpcError(f"latency: unknown activation {self.activation!r}")
        inits += [numpy_helper.from_array(np.array(float(v), np.float32), n) for v, n in ((low, "lo"), (high, "hi"))]
        nodes.append(helper.make_node("Clip", [x, "lo", "hi"], [y], name="activation"))
        return y

    def out_hw(self) -> list[int]:
        return [window_count(size, lo, hi, k, d, s) for size, k, s, d, lo, hi in
                zip((self.height, self.width), self.kernel, self.stride, self.dilation, self.pads[:2], self.pads[2:])]


class Runner:
    """A compiled library loaded on the device: ``time()`` in seconds, ``run()`` for its outputs."""

    def __init__(self, vm, device, manifest: dict):
        import tvm

        self.vm, self.device, self.manifest = vm, device, manifest
        self.inputs = bundle_inputs(manifest)
        self.args = [tvm.runtime.tensor(self.inputs[io["name"]], device) for io in manifest["inputs"]]

    def run(self) -> list[np.ndarray]:
        import tvm

        out = self.vm["main"](*self.args)
        return [out.numpy()] if isinstance(out, tvm.runtime.Tensor) else [o.numpy() for o in out]

    def time(self, repeat: int = 7, min_repeat_ms: int = 20) -> float:
        self.vm["main"](*self.args)  # warm-up: first-call allocations and page faults
        evaluator = self.vm.time_evaluator("main", self.device, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return float(min(evaluator(*self.args).results))


class Measurer:
    """Compiles for ``target`` and times on this machine or through ``session`` (an RPC session)."""

    def __init__(self, target: str | TargetSpec, session=None, device_name: str | None = None, repeat: int = 10,
                 min_repeat_ms: int = 25):
        self.spec = target if isinstance(target, TargetSpec) else get_target(target)
        self.session = session
        self.repeat, self.min_repeat_ms = repeat, min_repeat_ms
        self.kind = _DEVICE_KIND.get(self.spec.tvm_target.get("kind"), "cpu")
        self.device_name = device_name or ("local" if session is None else "rpc")
        if session is None and not self._runs_here():
            raise SpcError(f"--target {self.spec.name}: this machine cannot run it, so latencies cannot be measured "
                           "here; give the device with --rpc HOST:PORT (and --rpc-key KEY for a tracker)")
        self._count = 0

    def _runs_here(self) -> bool:
        if self.kind == "cuda":
            import tvm

            return bool(tvm.cuda(0).exist)
        return self.spec.runs_here()

    def compile(self, model: onnx.ModelProto, out_dir: str | Path, input_shapes: dict | None = None,
                **options) -> dict:
        return compile_model(model, self.spec.name, out_dir, input_shapes=input_shapes, **options)

    def load(self, bundle_dir: str | Path, manifest: dict) -> Runner:
        import tvm
        from tvm import relax

        path = str(Path(bundle_dir) / LIBRARY)
        if self.session is None:
            device = tvm.cuda(0) if self.kind == "cuda" else tvm.cpu(0)
            lib = tvm.runtime.load_module(path)
        else:
            self._count += 1
            name = f"spc_latency_{self._count}.so"
            self.session.upload(path, name)
            lib = self.session.load_module(name)
            device = self.session.cuda(0) if self.kind == "cuda" else self.session.cpu(0)
        return Runner(relax.VirtualMachine(lib, device), device, manifest)

    def runner(self, model: onnx.ModelProto, input_shapes: dict | None = None, **options) -> Runner:
        """``options`` go to compile_model (``sparsity``, ``kernel``)."""
        with tempfile.TemporaryDirectory(prefix="spc-latency-") as tmp:
            manifest = self.compile(model, tmp, input_shapes, **options)
            return self.load(tmp, manifest)

    def time(self, runner: Runner) -> float:
        return runner.time(self.repeat, self.min_repeat_ms)

    def time_model(self, model: onnx.ModelProto, input_shapes: dict | None = None) -> float:
        """Seconds per run of ``model`` compiled for the target (symbolic input dims bound by ``input_shapes``)."""
        return self.time(self.runner(model, input_shapes))

    def time_call(self) -> float:
        """Seconds of one call of a compiled model that computes next to nothing (a Relu of 16 numbers): what every
        layer timed alone pays on top of its own work (VM entry, argument checks, output allocation, a launch)."""
        node = helper.make_node("Relu", ["input"], ["output"], name="call")
        vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16])  # noqa: E731
        graph = helper.make_graph([node], "call", [vi("input")], [vi("output")])
        return self.time_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    def time_layer(self, layer: LayerSpec, ci: int, co: int, density: float = 1.0) -> float:
        """Seconds of ``layer`` at widths (ci, co); ``density`` < 1 keeps that fraction of its first weight's 4x1
        blocks and runs it with the block-sparse kernel, as compile_model does for a layer of its per-layer map (a
        pair's 1x1 conv then runs apart from its depthwise conv, as in the model)."""
        if density >= 1.0:
            return self.time_model(layer.model(ci, co))
        return self.time(self.runner(layer.model(ci, co), sparsity={"W": 1.0 - density}))
