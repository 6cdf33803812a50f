"""Benchmarks of the pruning engine (issue: structured pruning engine).

1. Speed: `analyze` + `prune` (L1, 50% MACs) of full-size ResNet-50 and 12-layer BERT-base ONNX (random weights,
   exported here with torch), and analysis time against graph size (a residual MLP stack at 1x and 10x depth).
2. Memory: peak resident memory of a prune run in a fresh process, against the model file size.
3. Latency: ONNX Runtime on the dense model and on pruned models at 1.25x / 1.5x / 2x fewer MACs, with kept widths
   rounded to 16 (the default on this AVX-512 CPU) and not rounded (--round-to 1), batch 1 and 8: ratios to the
   dense model measured in the same run, interleaved, medians of repeats.

    python bench/bench_engine.py            # writes bench/engine.json and prints the markdown tables
    python bench/bench_engine.py --sections speed --models bert_base     # only BERT-base's speed row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spc  # noqa: E402
from spc.validate import session  # noqa: E402


def export_resnet50(path: Path) -> None:
    import torch

    from tests.zoo.cnn import Bottleneck, ResNet

    torch.manual_seed(0)
    model = ResNet(Bottleneck, [3, 4, 6, 3], widths=(64, 128, 256, 512), stem=64, num_classes=1000).eval()
    _randomise_bn(model)
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})


def export_mobilenetv2(path: Path) -> None:
    import torch

    from tests.zoo.cnn import MobileNetV2

    class Full(MobileNetV2):
        CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]

    torch.manual_seed(0)
    model = Full(num_classes=1000, stem=32, last=1280).eval()
    _randomise_bn(model)
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})


def _randomise_bn(model) -> None:
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)


def export_bert_base(path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="eager")).eval()  # 12 layers, 768 hidden, 12 heads

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.zeros(1, 128, dtype=torch.int64)
    torch.onnx.export(Wrapper(model), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})


def mlp_stack(blocks: int, width: int = 64) -> onnx.ModelProto:
    """A residual stack of Linear-ReLU-Linear blocks: graph size grows linearly with ``blocks``."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        w1, w2 = f"w1_{i}", f"w2_{i}"
        inits += [numpy_helper.from_array(rng.standard_normal((width, 2 * width)).astype(np.float32) * 0.1, w1),
                  numpy_helper.from_array(rng.standard_normal((2 * width, width)).astype(np.float32) * 0.1, w2)]
        nodes += [helper.make_node("MatMul", [x, w1], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", w2], [f"o{i}"]),
                  helper.make_node("Add", [f"o{i}", x], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def timed_prune(path: Path, dims: dict) -> dict:
    """One load + analyze + prune, as a script would run them (the prune reuses the analysis)."""
    start = time.perf_counter()
    model = spc.load(path)
    loaded = time.perf_counter()
    analysis = spc.analyze(model)
    analysed = time.perf_counter()
    result = spc.prune(analysis, ratio=0.5, by="macs", criterion="l1", dim_values=dims)
    done = time.perf_counter()
    return {"load_s": loaded - start, "analyze_s": analysed - loaded, "prune_s": done - analysed,
            "nodes": len(model.graph.node), "groups": len(analysis.prunable_groups),
            "analyze_in_prune_s": result.timings["analyse"], "validate_s": result.timings["validate"],
            "phases_s": {k: round(v, 3) for k, v in result.timings.items()}}


def median_run(path: Path, dims: dict, repeats: int) -> dict:
    """The run with the median total time of ``repeats`` (the machine is shared; one run is noisy)."""
    runs = sorted((timed_prune(path, dims) for _ in range(repeats)),
                  key=lambda r: r["load_s"] + r["analyze_s"] + r["prune_s"])
    return dict(runs[len(runs) // 2], repeats=repeats)


# VmHWM, not ru_maxrss: the latter survives exec, so a child of a big parent would report the parent's peak
PEAK_SCRIPT = """
import sys, spc
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
before = peak()
spc.save(spc.prune(sys.argv[1], ratio=0.5, criterion="l1").model, sys.argv[2])
print(peak() - before)
"""


def peak_memory(path: Path, out: Path) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(out)], capture_output=True,
                            text=True, check=True, cwd=ROOT)
    return int(result.stdout.strip().splitlines()[-1])


def cli_times(path: Path, out: Path, dims: dict, repeats: int) -> dict:
    """Wall time of the two commands the issue names, each a fresh process (interpreter start and imports
    included): ``spc analyze`` and ``spc prune`` (L1, 50% of MACs, written to ``out``); median of ``repeats``."""
    dim_args = [a for name, size in dims.items() for a in ("--dim", f"{name}={size}")]
    commands = {"analyze": ["analyze", str(path), "--json", *dim_args],
                "prune": ["prune", str(path), "--ratio", "0.5", "--criterion", "l1", "-o", str(out), "--quiet",
                          *dim_args]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "spc.cli", *argv], check=True, capture_output=True, cwd=ROOT)
            times[name].append(time.perf_counter() - start)
    medians = {f"{name}_s": float(np.median(t)) for name, t in times.items()}
    return {**medians, "total_s": sum(medians.values()), "repeats": repeats}


def latency_ratios(models: dict[str, onnx.ModelProto], feeds: dict, repeats: int) -> dict[str, float]:
    """Median latency of each model divided by the dense one's, measured interleaved in one process."""
    sessions = {name: session(model) for name, model in models.items()}
    for sess in sessions.values():
        sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    dense = float(np.median(times["dense"]))
    return {name: float(np.median(t)) / dense for name, t in times.items()}


def latency_table(path: Path, label: str) -> list[dict]:
    model = spc.load(path)
    rows = []
    variants = {"dense": model}
    macs = {}
    for speedup in (1.25, 1.5, 2.0):
        for round_to in (16, 1):
            result = spc.prune(model, ratio=1 - 1 / speedup, by="macs", criterion="l1", round_to=round_to)
            key = f"{speedup}x/r{round_to}"
            variants[key] = result.model
            macs[key] = result.plan.before.macs / result.plan.after.macs
    for batch, repeats in ((1, 30), (8, 8)):
        feeds = {"x": np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)}
        ratios = latency_ratios(variants, feeds, repeats)
        for key, ratio in ratios.items():
            if key == "dense":
                continue
            rows.append({"model": label, "batch": batch, "variant": key, "macs_reduction": round(macs[key], 3),
                         "latency_speedup": round(1 / ratio, 3), "efficiency": round((1 / ratio) / macs[key], 3)})
    return rows


SECTIONS = ("speed", "cli", "memory", "scaling", "latency")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmarks of the pruning engine; writes bench/engine.json (the "
                                     "sections measured replace theirs, the others are kept) and prints tables.")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure (default: all)")
    parser.add_argument("--models", nargs="+", choices=("resnet50", "bert_base"), default=["resnet50", "bert_base"],
                        help="models of the speed and memory rows (default: both); e.g. --sections speed "
                             "--models bert_base times only BERT-base")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per model; the median is kept")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="spc-bench-"))
    out = ROOT / "bench" / "engine.json"
    report: dict = json.loads(out.read_text()) if out.exists() else {}
    report["machine"] = f"{os.cpu_count()} cores"
    exports = {"resnet50": export_resnet50, "bert_base": export_bert_base, "mobilenetv2": export_mobilenetv2}
    wanted = set(args.models) if {"speed", "cli", "memory"} & set(args.sections) else set()
    wanted |= {"resnet50", "mobilenetv2"} if "latency" in args.sections else set()
    paths = {name: work / f"{name}.onnx" for name in exports}
    for name in sorted(wanted):
        exports[name](paths[name])
    dims = {"resnet50": {}, "mobilenetv2": {}, "bert_base": {"seq": 128}}
    for name in args.models:
        if "speed" in args.sections:
            report.setdefault("speed", {})[name] = median_run(paths[name], dims[name], args.repeats)
        if "cli" in args.sections:
            report.setdefault("cli", {})[name] = cli_times(paths[name], work / f"{name}.cli.onnx", dims[name],
                                                           args.repeats)
        if "memory" in args.sections:
            report.setdefault("memory", {})[name] = {
                "file_bytes": paths[name].stat().st_size,
                "peak_rss_increase_bytes": peak_memory(paths[name], work / f"{name}.pruned.onnx")}
    if "scaling" in args.sections:
        report["scaling"] = {}
        for blocks in (50, 500):
            model = mlp_stack(blocks)
            start = time.perf_counter()
            spc.analyze(spc.io.from_proto(model))
            report["scaling"][str(blocks)] = {"nodes": len(model.graph.node), "analyze_s": time.perf_counter() - start}
    if "latency" in args.sections:
        report["latency"] = []
        for name in ("resnet50", "mobilenetv2"):
            report["latency"] += latency_table(paths[name], name)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["| model | nodes | prunable groups | load s | analyze s | prune s | total s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report.get("speed", {}).items():
        lines.append(f"| {name} | {r['nodes']} | {r['groups']} | {r['load_s']:.2f} | {r['analyze_s']:.2f} | "
                     f"{r['prune_s']:.2f} (validate {r['validate_s']:.2f}) | "
                     f"{r['load_s'] + r['analyze_s'] + r['prune_s']:.2f} |")
    lines += ["", "| model | `spc analyze` s | `spc prune` s | both s |", "|---|---|---|---|"]
    for name, r in report.get("cli", {}).items():
        lines.append(f"| {name} | {r['analyze_s']:.2f} | {r['prune_s']:.2f} | {r['total_s']:.2f} |")
    lines += ["", "| MLP stack | nodes | analyze s |", "|---|---|---|"]
    for blocks, r in report.get("scaling", {}).items():
        lines.append(f"| {blocks} blocks | {r['nodes']} | {r['analyze_s']:.3f} |")
    lines += ["", "| model | file MB | peak RSS increase MB | ratio |", "|---|---|---|---|"]
    for name, r in report.get("memory", {}).items():
        lines.append(f"| {name} | {r['file_bytes'] / 1e6:.1f} | {r['peak_rss_increase_bytes'] / 1e6:.1f} | "
                     f"{r['peak_rss_increase_bytes'] / r['file_bytes']:.2f} |")
    lines += ["", "| model | batch | target, round-to | MACs reduction | ORT speed-up | efficiency |",
              "|---|---|---|---|---|---|"]
    for r in report.get("latency", []):
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['macs_reduction']}x | "
                     f"{r['latency_speedup']}x | {r['efficiency']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
