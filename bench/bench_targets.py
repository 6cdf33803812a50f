"""Benchmarks of the TVM back end (issue: TVM targets): spc x86 bundles against ONNX Runtime.

Per model: ONNX Runtime on the dense model, spc x86 dense (sparsity 0), and spc x86 at 70/80/90% 4x1 block sparsity
(the cost model picks BSR or dense per layer, as `spc compile` does). Reported: speed-up over ORT dense
(ORT-dense time / time), measured in one process, interleaved round-robin, medians of per-round ratios; and the max
abs error of each spc bundle against ONNX Runtime run on the same (sparsified) model, the bundle's model.onnx.

    python bench/bench_targets.py                      # 1 thread (TVM and ORT); prints the markdown table
    python bench/bench_targets.py --threads 2          # all cores of this machine
    python bench/bench_targets.py --models ffn --rounds 30
    python bench/bench_targets.py --models resnet18,resnet50 --sparsities 0.8
    python bench/bench_targets.py --models digits,digits_transformer --exec-modes compiled,bytecode   # VM modes

Models: BERT-base FFN up-projection (MatMul 128x768 @ 768x3072), a 2-layer BERT-base-width encoder (d=768, 12
heads, FFN 3072, seq 128, batch 1; GELU, LayerNorm, softmax attention), a small ResNet-style CNN (64/128
channels, 56x56 input, batch 1), ResNet-18, ResNet-50 (`resnet50`, torch export), MobileNetV2 (depthwise
convolutions, ReLU6), EfficientNet-Lite0 (the same, with TF-style Pad ops; needs the bench extra), the trained
digits CNN of models/ at batch 1 and 8 (`digits`, `digits8`) and the trained digits transformer at batch 1
(`digits_transformer`).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--threads", type=int, default=1, help="threads for both TVM and ONNX Runtime (default 1)")
    p.add_argument("--models", default="ffn,encoder,cnn,digits,digits8")
    p.add_argument("--sparsities", default="0.7,0.8,0.9")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median over rounds)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds per variant per round")
    p.add_argument("--exec-modes", default="compiled",
                   help="Relax VM modes to build the spc variants in, comma-separated: compiled (spc's default: the "
                        "VM's instructions compiled to a host function) and/or bytecode (interpreted), side by side")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # TVM's thread pool reads TVM_NUM_THREADS once, before the first parallel region: set it before importing TVM.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import onnx
    import onnxruntime as ort

    from spc.targets import compile_model, get_target, load_bundle, testing

    exec_modes = args.exec_modes.split(",")

    models = {
        "ffn": ("BERT-base FFN layer 128x768x3072 (MatMul)", lambda: testing.ffn_layer(128, 768, 3072), None),
        "encoder": (
            "encoder: 2 layers, d=768, 12 heads, FFN 3072, seq 128, batch 1",
            lambda: testing.encoder(d_model=768, heads=12, ffn=3072, layers=2, seq=128, batch=1),
            {"input": [1, 128, 768]},
        ),
        "cnn": (
            "CNN: conv3x3(3->64)+BN, conv3x3/2(64->128), 1x1 + 3x3 residual, 56x56, batch 1",
            lambda: testing.cnn(channels=64, size=56, batch=1),
            {"input": [1, 3, 56, 56]},
        ),
        "resnet18": (
            "ResNet-18 (torchvision layout, random weights), 224x224, batch 1",
            lambda: testing.resnet18(size=224, batch=1),
            {"input": [1, 3, 224, 224]},
        ),
        "resnet50": (
            "ResNet-50 (torchvision layout, random weights and BatchNorm statistics), 224x224, batch 1",
            _resnet50, {"x": [1, 3, 224, 224]},
        ),
        "mobilenet_v2": (
            "MobileNetV2 (torchvision layout, random weights), 224x224, batch 1",
            lambda: testing.mobilenet_v2(size=224, batch=1),
            {"input": [1, 3, 224, 224]},
        ),
        "efficientnet_lite0": (
            "EfficientNet-Lite0 (PyPI efficientnet-lite-pytorch, random weights; TF-style Pad ops), 224x224, batch 1",
            lambda: efficientnet_lite0(testing), {"input": [1, 3, 224, 224]},
        ),
        # the trained ResNet-style CNN of models/ (8x8 digits, 32/64 channels, explicit BatchNorms): small
        # convolutions, where per-call overheads and BatchNorm glue weigh most
        "digits": ("digits CNN (models/digits_cnn.onnx), batch 1", lambda: onnx.load(ROOT / "models" / "digits_cnn.onnx"),
                   {"image": [1, 1, 8, 8]}),
        "digits8": ("digits CNN (models/digits_cnn.onnx), batch 8", lambda: onnx.load(ROOT / "models" / "digits_cnn.onnx"),
                    {"image": [8, 1, 8, 8]}),
        "digits_transformer": ("digits transformer (models/digits_transformer.onnx), batch 1",
                               lambda: onnx.load(ROOT / "models" / "digits_transformer.onnx"), {"image": [1, 1, 8, 8]}),
    }
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    results = {"threads": args.threads, "rounds": args.rounds, "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="spc-bench-targets-"))
    for key in args.models.split(","):
        title, build, shapes = models[key]
        print(f"== {title}", flush=True)
        model = build()
        variants = {}  # name -> (callable, error, manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        rng = np.random.default_rng(0)
        in_name = model.graph.input[0].name
        in_shape = shapes[in_name] if shapes else [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = {in_name: rng.standard_normal(in_shape).astype(np.float32)}
        out_name = model.graph.output[0].name
        ort_dense = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        variants["ORT dense"] = (lambda s=ort_dense: s.run(None, x), 0.0, None)
        for mode, sp in [(mode, sp) for sp in [0.0] + sparsities for mode in exec_modes]:
            name = ("spc dense" if sp == 0 else f"spc {sp:.0%}") + (f" ({mode})" if len(exec_modes) > 1 else "")
            out = tmp / f"{key}-{sp}-{mode}"
            t0 = time.perf_counter()
            target = dataclasses.replace(get_target("x86"), vm_exec_mode=mode)
            manifest = compile_model(model, target, out, sparsity=sp, block=(4, 1), input_shapes=shapes)
            bundle = load_bundle(out)
            ref_sess = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            ref = ref_sess.run(None, x)[0]
            got = bundle.run(x)[out_name]
            err = float(np.abs(got - ref).max())
            kernels = [layer["kernel"] for layer in manifest["layers"]]
            print(
                f"   {name}: compiled in {time.perf_counter() - t0:.1f}s, layers {kernels}, max err {err:.2e}",
                flush=True,
            )
            variants[name] = (bundle.timer(x), err, manifest)
        from bench_speedup import interleaved

        times = interleaved({name: fn for name, (fn, _, _) in variants.items()}, args.rounds, args.budget)
        ratios = {name: [base / t for base, t in zip(times["ORT dense"], times[name])] for name in variants}
        rows = []
        for name, (_, err, manifest) in variants.items():
            rows.append(
                {
                    "variant": name,
                    "speedup_vs_ort_dense": round(float(np.median(ratios[name])), 2),
                    "q25": round(float(np.quantile(ratios[name], 0.25)), 2),
                    "q75": round(float(np.quantile(ratios[name], 0.75)), 2),
                    "median_ms": round(float(np.median(times[name])) * 1e3, 3),
                    "max_err_vs_ort": err,
                    "expected_speedup": manifest["expected_speedup"] if manifest else None,
                    "bsr_layers": sum(layer["kernel"] == "bsr" for layer in manifest["layers"]) if manifest else None,
                    "layers": len(manifest["layers"]) if manifest else None,
                }
            )
            print(
                f"   {name:10s} x{rows[-1]['speedup_vs_ort_dense']:.2f} vs ORT dense "
                f"[{rows[-1]['q25']:.2f}, {rows[-1]['q75']:.2f}]  {rows[-1]['median_ms']:.3f} ms  err {err:.1e}",
                flush=True,
            )
        results["models"][key] = {"title": title, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def _resnet50():
    """bench_engine's ResNet-50 (tests/zoo's bottleneck ResNet in torchvision's layout), exported to ONNX."""
    import onnx

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_engine import export_resnet50

    with tempfile.TemporaryDirectory() as tmp:
        export_resnet50(Path(tmp) / "resnet50.onnx")
        return onnx.load(Path(tmp) / "resnet50.onnx")


def efficientnet_lite0(testing):
    """EfficientNet-Lite0's architecture (the bench extra's ``efficientnet-lite-pytorch``) with random weights: its
    strided depthwise convolutions take an explicit zero Pad, as TensorFlow-style "same" padding is exported."""
    from efficientnet_lite_pytorch import EfficientNet
    import torch

    torch.manual_seed(0)
    return testing._export(EfficientNet.from_name("efficientnet-lite0", num_classes=1000), torch.randn(1, 3, 224, 224),
                           {0: "batch"})


def markdown(results: dict) -> str:
    variants = [r["variant"] for r in next(iter(results["models"].values()))["rows"]]
    lines = [
        f"threads: {results['threads']}, rounds: {results['rounds']} (speed-up over ORT dense, median "
        "[25%, 75%] of per-round ratios; error: max |spc - ORT| on the same model)",
        "",
        "| model | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for model in results["models"].values():
        cells = []
        for r in model["rows"]:
            if r["variant"] == "ORT dense":
                cells.append(f"1.00 ({r['median_ms']:.2f} ms)")
            else:
                cells.append(f"{r['speedup_vs_ort_dense']:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}], err {r['max_err_vs_ort']:.0e}")
        lines.append(f"| {model['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
