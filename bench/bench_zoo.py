"""`spc compile` across real architectures: the test zoo's models (tests/zoo: reduced-width ResNets, MobileNets,
EfficientNet, RegNet, DenseNet, ShuffleNet, GoogLeNet, ConvNeXt, U-Net, ViT, Swin, MLP-Mixer, an LSTM, and Hugging
Face BERT, GPT-2, Llama, T5 built from configs), exported by torch's dynamo exporter and, for seven of them, by the
TorchScript one. Per model: does it compile for x86, arm and cuda (dims bound to the zoo's example inputs, and
with the dynamic dims left dynamic for x86), the x86 bundle's largest error against ONNX Runtime, and its speed
against ONNX Runtime on the same model (one thread each, interleaved rounds, median of per-round ratios).

    python bench/bench_zoo.py                              # everything, about 10 minutes
    python bench/bench_zoo.py --models bert,resnet18 --targets x86 --out bench/results/zoo.json

The zoo's models are small (widths of 8-64, 32x32 images, 8 tokens): the times measure how well spc runs small
models, where per-call overheads weigh most, not its kernels on full-size layers (bench_targets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ["resnet18", "mobilenetv2", "shufflenetv2", "vit", "bert", "gpt2", "llama"]  # as tests/test_zoo.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--targets", default="x86,arm,cuda")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--budget", type=float, default=0.1, help="seconds per variant per round")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"  # read once by TVM's thread pool, before the first parallel region
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import onnxruntime as ort

    from bench_speedup import interleaved
    from spc.errors import SpcError
    from spc.io import load
    from spc.targets import compile_model, get_target, load_bundle
    from tests.zoo import ZOO, export

    names = args.models.split(",") if args.models else sorted(ZOO)
    targets = args.targets.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="spc-bench-zoo-"))
    rows = []
    for name, exporter in [(n, None) for n in names] + [(n, "legacy") for n in LEGACY if n in names]:
        label = f"{name} ({exporter or 'dynamo'})"
        path = tmp / f"{name}-{exporter}.onnx"
        feeds = export(name, path, exporter=exporter)
        model = load(path)
        shapes = {key: list(value.shape) for key, value in feeds.items()}
        row = {"model": label}

        def attempt(target, out, input_shapes):
            try:
                compile_model(model, target, out, input_shapes=input_shapes)
                return "ok"
            except SpcError as exc:
                return f"error: {exc}"

        for target in targets:
            row[target] = attempt(target, tmp / f"{name}-{exporter}-{target}", shapes)
        if "x86" in targets:
            row["x86 dynamic"] = attempt("x86", tmp / f"{name}-{exporter}-dynamic", None)
        if row.get("x86") == "ok" and get_target("x86").runs_here():
            bundle = load_bundle(tmp / f"{name}-{exporter}-x86")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            ref = sess.run(None, feeds)
            got = list(bundle.run(feeds).values())
            row["rel_err"] = max(float(np.abs(g - r).max() / max(float(np.abs(r).max()), 1e-12))
                                 for g, r in zip(got, ref))
            times = interleaved({"ort": lambda: sess.run(None, feeds), "spc": bundle.timer(feeds)}, args.rounds,
                                args.budget)
            row["speedup_vs_ort"] = float(np.median([o / s for o, s in zip(times["ort"], times["spc"])]))
            row["ort_ms"] = float(np.median(times["ort"]) * 1e3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "targets": targets}, indent=2) + "\n")
    print(markdown(rows, targets))
    return 0


def _cell(status: str | None) -> str:
    """yes, or no and the reason in a few words."""
    if status is None:
        return "-"
    if status == "ok":
        return "yes"
    op = re.search(r"op (\S+) is not supported", status)
    if op:
        return f"no ({op.group(1)}: not in TVM's importer)"
    if "dynamic dims" in status:
        return "no (TVM, on the dynamic dims)"
    return "no (" + status.split(": ", 2)[-1][:50] + ")"


def markdown(rows: list[dict], targets: list[str]) -> str:
    columns = targets + (["x86 dynamic"] if "x86" in targets else [])
    lines = ["| model | " + " | ".join(f"compiles: {c}" for c in columns) + " | rel. err (x86) | x86 vs ORT |",
             "|---|" + "---|" * (len(columns) + 2)]
    for row in rows:
        err = f"{row['rel_err']:.1e}" if "rel_err" in row else "-"
        speed = f"{row['speedup_vs_ort']:.2f}x" if "speedup_vs_ort" in row else "-"
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row.get(c)) for c in columns) + f" | {err} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
