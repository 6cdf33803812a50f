"""spc's max-pool kernel (targets/kernels/pool.py) against TVM's legalized pool, A/B in one process.

Each model is compiled twice for x86, once with spc's kernel for its MaxPool and once leaving the pool to TVM (the
lowering rule switched off), and the two bundles are timed round-robin (median of per-round ratios; one thread).

    python bench/bench_pool.py                         # a lone pool (ResNet's 3x3/2 on 64x112x112), CNN, ResNet-18
    python bench/bench_pool.py --rounds 15 --out pool.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def lone_pool():
    from onnx import TensorProto, helper

    node = helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "pool",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64, 112, 112])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64, 56, 56])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def per_call(fn, budget: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--budget", type=float, default=0.3, help="seconds per variant per round")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"
    sys.path.insert(0, str(ROOT))
    from spc.targets import compile_model, load_bundle, lower, testing

    spc_rule = lower.Lowering.lower_max_pool
    models = {
        "MaxPool 3x3/2, 64x112x112": (lone_pool, [1, 64, 112, 112]),
        "CNN 56x56 (2x2 pool), batch 1": (lambda: testing.cnn(channels=64, size=56, batch=1), [1, 3, 56, 56]),
        "ResNet-18 224x224, batch 1": (lambda: testing.resnet18(size=224, batch=1), [1, 3, 224, 224]),
    }
    tmp = Path(tempfile.mkdtemp(prefix="spc-bench-pool-"))
    rows = []
    for title, (build, shape) in models.items():
        model = build()
        x = {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        timers, outputs = {}, {}
        for variant in ("TVM pool", "spc pool"):
            lower.Lowering.lower_max_pool = spc_rule if variant == "spc pool" else (lambda self, mutator, call: None)
            out = tmp / f"{len(rows)}-{variant.split()[0]}"
            compile_model(model, "x86", out, input_shapes={"input": shape})
            bundle = load_bundle(out)
            outputs[variant] = next(iter(bundle.run(x).values()))
            timers[variant] = bundle.timer(x)
        lower.Lowering.lower_max_pool = spc_rule
        ratios, times = [], {v: [] for v in timers}
        for _ in range(args.rounds):
            for variant, fn in timers.items():
                times[variant].append(per_call(fn, args.budget))
            ratios.append(times["TVM pool"][-1] / times["spc pool"][-1])
        row = {"model": title, "tvm_ms": float(np.median(times["TVM pool"])) * 1e3,
               "spc_ms": float(np.median(times["spc pool"])) * 1e3, "speedup": float(np.median(ratios)),
               "q25": float(np.quantile(ratios, 0.25)), "q75": float(np.quantile(ratios, 0.75)),
               "max_abs_diff": float(np.abs(outputs["TVM pool"] - outputs["spc pool"]).max())}
        rows.append(row)
        print(f"{title}: TVM pool {row['tvm_ms']:.3f} ms, spc pool {row['spc_ms']:.3f} ms, "
              f"{row['speedup']:.2f}x [{row['q25']:.2f}-{row['q75']:.2f}], max |diff| {row['max_abs_diff']:.1e}",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
