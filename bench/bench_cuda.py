#!/usr/bin/env python3
"""CUDA bundles on a real GPU: correctness against ONNX Runtime and the speed of pruned against dense builds.

Two steps, because the GPU machine (when one is lent) has no TVM compiler and no network:

    python bench/bench_cuda.py prepare build/cuda_bench      # here: prune, compile cuda bundles, ORT references
    python bench/bench_cuda.py run build/cuda_bench --out r.json   # on the GPU: load, check, time

``prepare`` compiles, for each model, the dense model and spc's pruned model (OBSPA, no data) into cuda bundles
(TVM Relax, dlight GPU schedules; the bundle's model.so holds CUDA source that is compiled when it is loaded) and
stores inputs at batch 1 and 8 with ONNX Runtime's outputs on the same models. ``run`` loads each bundle with
``spc.targets.load_bundle``, which on a GPU needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``: no libtvm_compiler)
and nvcc (targets/cuda_runtime.py), checks the outputs against ONNX Runtime's, times ``main`` with TVM's time
evaluator (synchronised with the GPU) and, for the digits models, measures accuracy on
models/digits_eval.npz. Reported: max abs error, milliseconds, and the pruned/dense speed-up beside the MACs
reduction (latency efficiency = measured speed-up / MACs reduction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8)


def _models():
    """name -> (onnx model, input builder, eval file or None). Imported lazily: ``run`` needs none of this."""
    import onnx

    from spc.targets import testing

    digits_eval = ROOT / "models" / "digits_eval.npz"
    return {
        "digits_cnn": (onnx.load(str(ROOT / "models" / "digits_cnn.onnx")), digits_eval),
        "digits_transformer": (onnx.load(str(ROOT / "models" / "digits_transformer.onnx")), digits_eval),
        "cnn64": (testing.cnn(channels=64, size=56), None),
        "encoder512": (testing.encoder(d_model=512, heads=8, ffn=2048, layers=1, seq=128), None),
    }


def _inputs(model, batch: int, rng) -> dict[str, np.ndarray]:
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.dim_value > 0 else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def prepare(out: Path, ratio: float, target: str = "cuda", only: list[str] | None = None) -> None:
    import spc
    from spc.cost import count
    from spc.graph import Graph
    from spc.io import from_proto
    from spc.targets import compile_model
    from spc.targets.testing import ort_run

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    index = {}
    for name, (model, eval_file) in _models().items():
        if only and name not in only:
            continue
        pruned = spc.prune(model, ratio=ratio, by="macs", criterion="obspa", round_to=8).model
        for variant, proto in (("dense", from_proto(model)), ("pruned", pruned)):
            key = f"{name}-{variant}"
            print(f"compiling {key}", file=sys.stderr, flush=True)
            compile_model(proto, target, out / key)
            for spare in ("model.onnx", "model.cu"):  # `run` loads model.so only; keeps the copy sent to the GPU small
                (out / key / spare).unlink(missing_ok=True)
            feeds = {b: _inputs(proto, b, rng) for b in BATCHES}
            refs = {}
            for b, feed in feeds.items():
                for k, v in feed.items():
                    refs[f"in/{b}/{k}"] = v
                for k, v in ort_run(proto, feed).items():
                    refs[f"out/{b}/{k}"] = v
            np.savez(out / key / "reference.npz", **refs)
            index[key] = {"model": name, "variant": variant, "macs": count(Graph(proto)).macs,
                          "eval": str(eval_file.relative_to(ROOT)) if eval_file else None}
    (out / "index.json").write_text(json.dumps(index, indent=2))


def _call(bundle, feed):
    return [bundle.run(feed)[name] for name in bundle.output_names]


def _accuracy(bundle, eval_file: Path) -> float:
    data = np.load(eval_file)
    images, labels = data["image"].astype(np.float32), data["label"]
    name = bundle.input_names[0]
    hits = 0
    for start in range(0, len(images), 64):
        logits, *_ = _call(bundle, {name: images[start:start + 64]})
        hits += int((logits.argmax(-1) == labels[start:start + 64]).sum())
    return hits / len(images)


def run_all(root: Path, repeat: int) -> dict:
    from spc.targets import load_bundle

    index = json.loads((root / "index.json").read_text())
    results = {"models": {}}
    for key, info in index.items():
        bundle = load_bundle(root / key)
        device = bundle._device
        results["device"] = device.device_name or str(device)
        results["arch"] = f"sm_{device.compute_version.replace('.', '')}" if device.dlpack_device_type() == 2 \
            else "cpu"
        refs = np.load(root / key / "reference.npz")
        row = {**info, "batches": {}}
        for b in BATCHES:
            feed = {k.split("/", 2)[2]: refs[k] for k in refs.files if k.startswith(f"in/{b}/")}
            outs = _call(bundle, feed)
            expected = [refs[f"out/{b}/{name}"] for name in bundle.output_names]
            err = max(float(np.max(np.abs(o - e))) for o, e in zip(outs, expected))
            scale = max(float(np.max(np.abs(e))) for e in expected)
            ms = float(np.median(bundle.benchmark(feed, repeat=repeat))) * 1e3
            row["batches"][b] = {"max_abs_err": err, "ref_scale": scale, "ms": ms}
        if info["eval"]:
            row["accuracy"] = _accuracy(bundle, ROOT / info["eval"])
        results["models"][key] = row
        print(key, json.dumps(row), flush=True)
    return results


def markdown(results: dict) -> str:
    models = results["models"]
    lines = [f"GPU: {results['device']} ({results['arch']})", "",
             "| model | MACs reduction | batch | dense ms | pruned ms | speed-up | efficiency | max abs err "
             "(dense / pruned) | accuracy (dense / pruned) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted({m["model"] for m in models.values()}):
        dense, pruned = models[f"{name}-dense"], models[f"{name}-pruned"]
        reduction = dense["macs"] / pruned["macs"]
        acc = (f"{dense['accuracy']:.4f} / {pruned['accuracy']:.4f}" if "accuracy" in dense else "-")
        for b in BATCHES:
            d, p = dense["batches"][str(b)], pruned["batches"][str(b)]
            speedup = d["ms"] / p["ms"]
            lines.append(f"| {name} | {reduction:.2f}x | {b} | {d['ms']:.3f} | {p['ms']:.3f} | {speedup:.2f}x | "
                         f"{speedup / reduction:.2f} | {d['max_abs_err']:.1e} / {p['max_abs_err']:.1e} | {acc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of MACs to prune (default 0.5: 2x fewer)")
    p.add_argument("--target", default="cuda", help="x86 checks this script on a machine without a GPU")
    p.add_argument("--models", default=None, help="comma-separated subset")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--repeat", type=int, default=10)
    r.add_argument("--out", default=None)
    t = sub.add_parser("table")
    t.add_argument("json")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(Path(args.dir), args.ratio, args.target, args.models.split(",") if args.models else None)
    elif args.cmd == "run":
        results = json.loads(json.dumps(run_all(Path(args.dir), args.repeat)))  # int keys -> str, as on disk
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
        print(markdown(results))
    else:
        print(markdown(json.loads(Path(args.json).read_text())))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
