"""Single ops (and small op chains) compiled by spc for x86 against ONNX Runtime on the same model: finds the ops
that TVM legalizes to loop nests its CPU schedules leave scalar, and checks the forms spc rewrote them into.

    python bench/bench_ops.py                    # every op, about 3 minutes; prints a markdown table
    python bench/bench_ops.py conv1d norm        # the ops whose names contain any of these words

One thread for both, interleaved rounds (median of per-round time ratios), batch 1, float32.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def cases() -> dict:
    """op label -> (model with input x, x's shape)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def model(nodes, x_shape, inits=(), opset=17):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
        out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        out.ir_version = 9
        return out

    def one(op, shape, inputs=(), inits=(), opset=17, **attrs):
        return model([helper.make_node(op, ["x", *inputs], ["y"], **attrs)], shape, inits, opset), shape

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    def floats(name, values):
        return numpy_helper.from_array(np.array(values, np.float32), name)

    map56 = [1, 64, 56, 56]
    affine = [floats("g", np.ones(64)), floats("b", np.zeros(64))]
    gelu = [helper.make_node("Div", ["x", "c"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["f"]), helper.make_node("Mul", ["x", "f"], ["h"]),
            helper.make_node("Mul", ["h", "half"], ["y"])]
    return {
        "Conv 1-D, k 3, 64 -> 64, 512 steps": one("Conv", [1, 64, 512], ["w"], [weight("w", 64, 64, 3)], pads=[1, 1]),
        "Conv 3-D, k 3, 16 -> 16, 16^3": one("Conv", [1, 16, 16, 16, 16], ["w"], [weight("w", 16, 16, 3, 3, 3)],
                                            pads=[1] * 6),
        "InstanceNormalization 64 x 56 x 56": one("InstanceNormalization", map56, ["g", "b"], affine),
        "GroupNormalization (32 groups) 64 x 56 x 56": one("GroupNormalization", map56, ["g", "b"], affine, opset=21,
                                                           num_groups=32),
        "Resize nearest 2x, 64 x 28 x 28": one("Resize", [1, 64, 28, 28], ["", "s"], [floats("s", [1, 1, 2, 2])],
                                               mode="nearest"),
        "Resize linear 2x, 64 x 28 x 28": one("Resize", [1, 64, 28, 28], ["", "s"], [floats("s", [1, 1, 2, 2])],
                                              mode="linear"),
        "AveragePool 3x3/1, 64 x 56 x 56": one("AveragePool", map56, kernel_shape=[3, 3], pads=[1] * 4),
        "AveragePool 2x2/2, 64 x 56 x 56": one("AveragePool", map56, kernel_shape=[2, 2], strides=[2, 2]),
        "MaxPool 3x3/2, 64 x 56 x 56": one("MaxPool", map56, kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
        "ReduceMean over H, W, 64 x 56 x 56": one("ReduceMean", map56, ["ax"], [ints("ax", [2, 3])], opset=18),
        "Softmax over channels, 64 x 56 x 56": one("Softmax", map56, axis=1),
        "Pad reflect, 64 x 56 x 56": one("Pad", map56, ["p"], [ints("p", [0, 0, 1, 1, 0, 0, 1, 1])], mode="reflect"),
        "HardSwish 64 x 56 x 56": one("HardSwish", map56),
        "GELU (Erf) 128 x 3072": (model(gelu, [128, 3072], [floats("c", 1.4142135), floats("one", 1.0),
                                                          floats("half", 0.5)]), [128, 3072]),
        "Einsum bij,jk->bik, 8 x 64 x 64": one("Einsum", [8, 64, 64], ["w"], [weight("w", 64, 64)],
                                               equation="bij,jk->bik"),
    }


def main(argv=None) -> int:
    words = (argv if argv is not None else sys.argv[1:])
    os.environ["TVM_NUM_THREADS"] = "1"  # read once by TVM's thread pool, before the first parallel region
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import onnxruntime as ort

    from bench_speedup import interleaved
    from spc.targets import compile_model, load_bundle

    rng = np.random.default_rng(1)
    lines = ["| op | spc | ONNX Runtime | spc speed / ORT | max abs err |", "|---|---|---|---|---|"]
    for name, (m, shape) in cases().items():
        if words and not any(w in name for w in words):
            continue
        x = {"x": rng.standard_normal(shape).astype(np.float32)}
        out = tempfile.mkdtemp(prefix="spc-bench-ops-")
        compile_model(m, "x86", out)
        bundle = load_bundle(out)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        err = float(np.abs(list(bundle.run(x).values())[0] - sess.run(None, x)[0]).max())
        t = interleaved({"ort": lambda: sess.run(None, x), "spc": bundle.timer(x)}, 5, 0.1)
        ratio = float(np.median(np.array(t["ort"]) / np.array(t["spc"])))
        lines.append(f"| {name} | {np.median(t['spc']) * 1e3:.3f} ms | {np.median(t['ort']) * 1e3:.3f} ms | "
                     f"{ratio:.2f}x | {err:.1e} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
