"""Depth-first prefixes at a static batch: the model compiled with its high-resolution layers run one image at a
time (targets/depth_first.py, the default) against the same model compiled layer by layer over the whole batch.

Both builds of the dense model and of its MACs /2 prune (l1, widths rounded to 16) are timed round-robin in one
process (medians of per-round times over ``--rounds``), outputs checked against each other. ``--map-to-weight``
tries other values of the cut rule (targets.depth_first.MAP_TO_WEIGHT; 0 turns the split off). Threads:
TVM_NUM_THREADS, else all cores.

    TVM_NUM_THREADS=1 python bench/bench_depth_first.py --model mobilenet_v2 --batch 8
    python bench/bench_depth_first.py --model efficientnet_lite0 --map-to-weight 0,1,2,4 --out depth_first.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0", "cnn"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--map-to-weight", default="0,2", help="cut rules to compare (0: no split, the baseline)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def build(name: str):
    """The model with a symbolic batch dimension (bench_layer_scaling builds the two mobile CNNs)."""
    from spc.targets import testing

    if name == "cnn":
        return testing.cnn(channels=64, size=56)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_layer_scaling import build as build_mobile

    return build_mobile(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    import tvm

    from spc import api
    from spc.analysis import analyze
    from spc.graph import Graph
    from spc.targets import compile_model, load_bundle

    depth_first = importlib.import_module("spc.targets.depth_first")
    rules = [float(r) for r in args.map_to_weight.split(",")]
    dense = build(args.model)
    inp = dense.graph.input[0]
    shape = [args.batch] + [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    dims = {d.dim_param: args.batch for d in inp.type.tensor_type.shape.dim[:1] if d.dim_param}
    pruned = api.prune(analyze(Graph(dense)), ratio=0.5, by="macs", criterion="l1", round_to=16, check=False,
                       dim_values=dims).model
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    default_rule = depth_first.MAP_TO_WEIGHT
    runs, info = {}, {}
    for label, model in (("dense", dense), ("MACs /2", pruned)):
        reference = None
        for rule in rules:
            depth_first.MAP_TO_WEIGHT = rule or default_rule
            out_dir = tempfile.mkdtemp(prefix="spc-depth-first-")
            start = time.perf_counter()
            manifest = compile_model(model, "x86", out_dir, input_shapes={inp.name: shape}, depth_first=rule > 0)
            seconds = time.perf_counter() - start
            bundle = load_bundle(out_dir)
            out = next(iter(bundle.run({inp.name: x}).values()))
            reference = out if reference is None else reference
            error = float(np.abs(out - reference).max() / max(1e-12, np.abs(reference).max()))
            info[(label, rule)] = {"compile_s": round(seconds, 1), "depth_first": manifest["depth_first"],
                                   "rel_error_vs_first": error}
            runs[(label, rule)] = (bundle._vm, tvm.runtime.tensor(x, bundle._device))
            print(f"  {label}, rule {rule:g}: compiled in {seconds:.0f} s, cut "
                  f"{(manifest['depth_first'] or {}).get('cut')}, rel. error {error:.1e}", file=sys.stderr, flush=True)
    depth_first.MAP_TO_WEIGHT = default_rule
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (vm, arg) in runs.items():
            vm["main"](arg)
            start = time.perf_counter()
            vm["main"](arg)
            times[key].append(time.perf_counter() - start)
    ms = {key: float(np.median(values)) * 1e3 for key, values in times.items()}
    threads = os.environ.get("TVM_NUM_THREADS", "all cores")
    base = rules[0]
    print(f"{args.model}, batch {args.batch}, threads: {threads}, {args.rounds} rounds (medians)\n")
    print("| cut rule (maps / weights) | prefix nodes | dense ms | MACs /2 ms | dense vs rule " f"{base:g} | "
          f"MACs /2 vs rule {base:g} | MACs /2 speed-up over dense |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for rule in rules:
        d, p = ms[("dense", rule)], ms[("MACs /2", rule)]
        cut = info[("dense", rule)]["depth_first"]
        row = {"rule": rule, "prefix_nodes": cut["prefix_nodes"] if cut else 0, "dense_ms": d, "pruned_ms": p,
               "dense_gain": ms[("dense", base)] / d, "pruned_gain": ms[("MACs /2", base)] / p, "speedup": d / p,
               "compile": {label: info[(label, rule)] for label in ("dense", "MACs /2")}}
        rows.append(row)
        print(f"| {'off' if rule == 0 else f'{rule:g}'} | {row['prefix_nodes']} | {d:.2f} | {p:.2f} | "
              f"{row['dense_gain']:.2f}x | {row['pruned_gain']:.2f}x | {row['speedup']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "threads": threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
