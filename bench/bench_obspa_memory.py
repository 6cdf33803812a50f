"""OBSPA's memory on one wide consumer: a Gemm n -> n (producer), Relu, a Gemm n -> n (the consumer whose input
channels are pruned, with data-free second moments), scored and compensated by the OBSPA pass directly, with the
traced (tracemalloc) peak of each phase above what was live when it began, and the process's ru_maxrss.

    python bench/bench_obspa_memory.py                 # n = 4096: n x n float64 is 128 MiB
    python bench/bench_obspa_memory.py --n 1024 --save /tmp/a.npz   # scores and compensated weights, to compare

tracemalloc sees numpy's buffers (numpy reports them to it), not LAPACK's workspace; ru_maxrss includes everything
(and the interpreter, onnx, scipy), so the traced figure is the one that says how many n x n matrices are alive.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc

import numpy as np
from onnx import TensorProto, helper, numpy_helper

MIB = 1 << 20


def model(n: int, seed: int = 0):
    """x [4, n] -> Gemm (producer, prunable outputs) -> Relu -> Gemm (consumer) -> y."""
    rng = np.random.default_rng(seed)
    inits = []
    for name in ("w1", "w2"):
        inits.append(numpy_helper.from_array((rng.standard_normal((n, n), dtype=np.float32)
                                              / np.float32(np.sqrt(n))), name))
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, name.replace("w", "b")))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="producer", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="consumer", transB=1)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def phase(name: str, report: dict, work):
    """Run ``work`` and record its traced peak above the memory live when it began."""
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    clock = time.perf_counter()
    result = work()
    report[name] = {"peak_traced_mib": round((tracemalloc.get_traced_memory()[1] - start) / MIB, 1),
                    "seconds": round(time.perf_counter() - clock, 2)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="width of both layers (default 4096)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--save", help="write scores and the compensated consumer weight here (.npz)")
    args = parser.parse_args(argv)
    from spc.passes import PassContext
    from spc.passes.obspa import ObspaImportance

    from spc.analysis import analyze
    from spc.api import default_round_to
    from spc.cost import CostModel
    from spc.graph import Graph
    from spc.plan import make_plan
    from spc.rewrite import apply_removal

    analysis = analyze(Graph(model(args.n)))
    scorer = ObspaImportance()
    context = PassContext()
    report = {"n": args.n, "n_x_n_float64_mib": args.n * args.n * 8 / MIB}
    tracemalloc.start()
    scores = phase("score", report, lambda: scorer.score(analysis, context))
    plan = make_plan(analysis, scores, args.ratio, "macs", default_round_to(), CostModel(analysis, {}),
                     normalize=scorer.normalize)
    pruned = apply_removal(analysis, plan.removed)
    pruned = phase("compensate", report, lambda: scorer.compensate(analysis, plan, pruned, context))
    tracemalloc.stop()
    report["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.save:
        weight = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "w2")
        bias = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "b2")
        np.savez(args.save, scores=scores, removed=plan.removed, weight=weight, bias=bias)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
