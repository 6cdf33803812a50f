"""Where a pruned model's time fails to follow its MACs: each latency layer timed alone, dense and pruned.

The model is pruned by MACs (``spc.prune(by="macs")``), then every layer that ``--speedup`` plans with
(spc.latency_layers: a prunable Conv/MatMul/Gemm, or a 1x1 expand + depthwise pair timed as one kernel) is compiled
alone for x86 at its dense and its pruned widths, with spc's kernels, and timed (best of ``--repeats``). The table
gives, per layer, the MACs reduction, the time reduction and the layer's share of the dense layers' time; the
summary, how much of that time sits in layers the plan left at full width. Latency efficiency (speed-up / MACs
reduction) below 1 comes from layers whose time shrinks less than their MACs, and from full-width layers that are
slow per MAC (a MACs plan keeps them; only a faster kernel helps there). Threads: TVM_NUM_THREADS, else all cores.

    python bench/bench_layer_scaling.py --model mobilenet_v2 --batch 8 --ratio 0.5
    TVM_NUM_THREADS=1 python bench/bench_layer_scaling.py --batch 8 --out scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.5, help="share of the MACs removed (0.5: 2x fewer)")
    p.add_argument("--criterion", default="l1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def layer_macs(spec, ci: int, co: int) -> int:
    """Multiply-adds of one latency layer at widths (ci, co), batch included."""
    kh, kw = spec.kernel
    oh, ow = spec.out_hw() if spec.op != "matmul" else (1, 1)
    if spec.op == "matmul":
        return spec.rows * ci * co
    if spec.op == "expand_depthwise":
        return spec.rows * (ci * co * spec.height * spec.width + co * kh * kw * oh * ow)
    return spec.rows * (co if spec.depthwise else ci * co) * kh * kw * oh * ow


def build(name: str):
    """The model with a symbolic batch dimension named "batch"."""
    from spc.targets import testing

    if name == "mobilenet_v2":
        return testing.mobilenet_v2(size=224, batch=1)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_targets import efficientnet_lite0

    return efficientnet_lite0(testing)


def main(argv=None) -> int:
    args = parse_args(argv)
    from spc import api
    from spc.analysis import analyze
    from spc.cost import CostModel
    from spc.graph import Graph
    from spc.latency_layers import find_layers
    from spc.targets.measure import Measurer

    dims = {"batch": args.batch}
    analysis = analyze(Graph(build(args.model)))
    pruned = api.prune(analysis, ratio=args.ratio, by="macs", criterion=args.criterion, round_to=16, check=False,
                       dim_values=dims)
    cost = CostModel(analysis, dims)
    layers = find_layers(analysis, cost, dims, 16)
    full = cost.shape_function(np.zeros(analysis.atom_count, dtype=bool))
    kept = cost.shape_function(pruned.plan.removed)
    measurer = Measurer("x86")
    rows = []
    for i, layer in enumerate(layers):
        before, after = layer.widths(full), layer.widths(kept)
        t_before = min(measurer.time_layer(layer.spec, *before) for _ in range(args.repeats))
        t_after = min(measurer.time_layer(layer.spec, *after) for _ in range(args.repeats))
        rows.append({"layer": layer.node, "op": layer.spec.op, "widths": [list(before), list(after)],
                     "macs_reduction": layer_macs(layer.spec, *before) / layer_macs(layer.spec, *after),
                     "time_reduction": t_before / t_after, "ms": [t_before * 1e3, t_after * 1e3]})
        print(f"  {i + 1}/{len(layers)} {layer.node}: {before} -> {after}, MACs /{rows[-1]['macs_reduction']:.2f}, "
              f"time /{rows[-1]['time_reduction']:.2f}", file=sys.stderr, flush=True)
    dense_ms = sum(r["ms"][0] for r in rows)
    pruned_ms = sum(r["ms"][1] for r in rows)
    full_width = sum(r["ms"][0] for r in rows if r["widths"][0] == r["widths"][1])
    threads = os.environ.get("TVM_NUM_THREADS", "all cores")
    print(f"{args.model}, batch {args.batch}, MACs /{1 / (1 - args.ratio):g} ({args.criterion}), threads: {threads}\n")
    print("| layer | op | widths (in, out) | MACs reduction | time reduction | share of dense time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        (a, b), (c, d) = r["widths"]
        print(f"| {r['layer']} | {r['op']} | ({a}, {b}) -> ({c}, {d}) | {r['macs_reduction']:.2f}x | "
              f"{r['time_reduction']:.2f}x | {r['ms'][0] / dense_ms:.1%} |")
    print(f"\nlayers alone: dense {dense_ms:.2f} ms, pruned {pruned_ms:.2f} ms ({dense_ms / pruned_ms:.2f}x); "
          f"left at full width: {full_width / dense_ms:.1%} of the dense time")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "threads": threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
