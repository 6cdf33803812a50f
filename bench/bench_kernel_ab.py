"""One of spc's kernel rules against TVM's own lowering of the same op, A/B in one process.

Each model is compiled twice for x86, with the rule on and with it off (the op then goes to TVM's legalized
schedule, as before the rule existed), and the two bundles are timed round-robin (median of per-round ratios; one
thread unless ``--threads``), with ONNX Runtime on the same model beside them. Rules:

* ``maxpool``: max pooling (kernels/pool.py) on a lone 3x3/2 pool of 64x112x112, the 56x56 CNN and ResNet-18;
* ``depthwise``: depthwise convolutions (kernels/depthwise.py) on MobileNetV2's 17 layer shapes alone and in the
  whole model (torchvision layout, random weights);
* ``clip``: ReLU6 (ONNX Clip) fused into the producing kernel's epilogue (fusion.py) on MobileNetV2;
* ``pad``: zero Pad ops folded into the convolution after them (fold.py) on EfficientNet-Lite0 (bench extra);
* ``expand_depthwise``: a 1x1 conv and the depthwise conv after it as one kernel (kernels/expand_depthwise.py)
  against spc's two kernels, on MobileNetV2 (batch 1 and 8) and EfficientNet-Lite0;
* ``depthwise_flat``: the depthwise kernel's flat form on maps narrower than a vector (kernels/depthwise.py)
  against its row form, on EfficientNet-Lite0's and MobileNetV2's small-map layers alone and in the models;
* ``small_1x1``: 1x1 convs on small maps vectorised over output channels (lower.py ``_small_map_1x1``) against
  conv2d's pixel vectors, on EfficientNet-Lite0 and MobileNetV2 (batch 1 and 8);
* ``row_block``: the depthwise row form's output rows computed several at a time (kernels/depthwise.py
  ``ROW_BLOCK``) against one row at a time, on MobileNetV2's large-map depthwise layers alone and on MobileNetV2 and
  EfficientNet-Lite0 (batch 1 and 8);
* ``channel_vectors``: dense convolutions on padded planes vectorised over output channels
  (kernels/conv_channels.py) against pixel vectors (kernels/conv_planes.py), on ResNet-18's convolution shapes
  alone and in ResNet-18, the 56x56 CNN and the digits CNN of models/ (batch 1 and 8);
* ``parallel_copy``: copies (im2col, planes, transposes) of 32K elements and more on the thread pool against 256K
  (kernels/source.py ``PARALLEL_MIN_COPY``), on 3x3 layers compiled 80% block-sparse and on the CNN, ResNet-18,
  MobileNetV2 and the encoder (dense); meant for ``--threads 2``.
* ``padding_taps``: the channel-vector convolutions' border rows and tiles leaving out the taps that read padding
  (kernels/conv_channels.py ``SKIP_PADDING``) against computing them, on ResNet's 3x3 shapes alone and in
  ResNet-18, ResNet-50, the 56x56 CNN and the digits CNN of models/ (batch 1 and 8).
* ``glue_vectors``: element-wise glue (residual adds, ...) vectorised over its innermost loops fused into whole
  vectors (glue_schedule.py ``VECTORISE_FUSED``) against only where the innermost loop is whole vectors, on
  ResNet-18, ResNet-50, the 56x56 CNN, MobileNetV2, the encoder and the digits CNN.
* ``winograd``: dense 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3) (kernels/conv_winograd.py) against the
  direct forms, on ResNet's 3x3 shapes and narrower (pruned) ones alone and in ResNet-18, ResNet-50, the 56x56 CNN
  and the digits CNN of models/ (batch 1 and 8).
* ``winograd_stride2``: dense 3x3 stride-2 convolutions by the stride-2 F(4x4, 3x3) and F(2x2, 3x3) too
  (kernels/conv_winograd.py ``STRIDED``) against stride-1 layers only, on ResNet's stride-2 3x3 shapes and pruned
  ones alone and in ResNet-18, the 56x56 CNN and the digits CNN (batch 1 and 8), ResNet-50 (batch 1).
* ``winograd_copy``: Winograd's transposing copy in blocks of a vector of channels x 4 columns
  (kernels/conv_winograd.py ``COPY_BLOCK``) against element by element, on 3x3 layers alone (wide and pruned, both
  strides) and in ResNet-18, the 56x56 CNN and the digits CNN (batch 1 and 8).

    python bench/bench_kernel_ab.py --rule maxpool          # was bench/bench_pool.py
    python bench/bench_kernel_ab.py --rule depthwise --rounds 15 --out depthwise.json
    python bench/bench_kernel_ab.py --rule channel_vectors --threads 2 --models ResNet
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

# MobileNetV2's depthwise layers: (channels, input size, stride), all 3x3 with padding 1
MOBILENET_V2_DEPTHWISE = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2),
                          (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1)]


def lone_pool():
    from onnx import TensorProto, helper

    node = helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "pool",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64, 112, 112])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64, 56, 56])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# depthwise layers on maps narrower than a vector (EfficientNet-Lite0's 5x5 and MobileNetV2's 3x3): (channels,
# input size, stride, kernel)
SMALL_MAP_DEPTHWISE = [(480, 14, 2, 5), (672, 14, 1, 5), (672, 14, 2, 5), (1152, 7, 1, 5), (576, 14, 1, 3),
                       (960, 7, 1, 3)]


def lone_depthwise(channels: int, size: int, stride: int, kernel: int = 3):
    from spc.targets.measure import LayerSpec

    pad = kernel // 2
    spec = LayerSpec("conv", 1, size, size, (kernel, kernel), (stride, stride), (pad,) * 4, depthwise=True, bias=True)
    return spec.model(channels, channels)


def per_call(fn, budget: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _efficientnet_lite0(testing):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_targets import efficientnet_lite0

    return efficientnet_lite0(testing)


RULES = ("maxpool", "depthwise", "clip", "pad", "expand_depthwise", "depthwise_flat", "small_1x1", "row_block",
         "channel_vectors", "parallel_copy", "padding_taps", "glue_vectors", "winograd", "winograd_stride2",
         "winograd_copy")

# dense convolutions of ResNet-18 and the 56x56 CNN: (in, out, input size, kernel, stride), padding kernel // 2
RESNET_CONVS = [(3, 64, 224, 7, 2), (64, 64, 56, 3, 1), (64, 128, 56, 3, 2), (128, 128, 28, 3, 1),
                (128, 256, 28, 3, 2), (256, 256, 14, 3, 1), (256, 512, 14, 3, 2), (512, 512, 7, 3, 1)]


def lone_conv_models(shapes) -> dict:
    """Lone convolutions by title: (in, out, input size, kernel, stride) -> (builder, input shape)."""
    return {f"conv {k}x{k}/{s}, {ci} -> {co}, {n}x{n}": (lambda ci=ci, co=co, n=n, k=k, s=s:
                                                         lone_conv(ci, co, n, k, s), [1, ci, n, n])
            for ci, co, n, k, s in shapes}


def lone_conv(c_in: int, c_out: int, size: int, kernel: int, stride: int):
    from spc.targets.measure import LayerSpec

    spec = LayerSpec("conv", 1, size, size, (kernel, kernel), (stride, stride), (kernel // 2,) * 4, bias=True)
    return spec.model(c_in, c_out)


def whole_models(*wanted: tuple[str, int]) -> dict:
    """{title: (build, input shape)} of whole models by short name and batch, titled as in earlier results."""
    import onnx

    from spc.targets import testing

    def resnet50(_batch):
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_targets import _resnet50

        return _resnet50()

    table = {
        "resnet18": ("ResNet-18 224x224", lambda b: testing.resnet18(size=224, batch=b), [3, 224, 224]),
        "resnet50": ("ResNet-50 224x224", resnet50, [3, 224, 224]),
        "cnn": ("CNN 56x56", lambda b: testing.cnn(channels=64, size=56, batch=b), [3, 56, 56]),
        "digits": ("digits CNN (models/)", lambda b: onnx.load(ROOT / "models" / "digits_cnn.onnx"), [1, 8, 8]),
        "mobilenet_v2": ("MobileNetV2 224x224", lambda b: testing.mobilenet_v2(size=224, batch=b), [3, 224, 224]),
        "encoder": ("encoder d=384", lambda b: testing.encoder(d_model=384, heads=6, ffn=1536, layers=2, seq=128,
                                                               batch=b), [128, 384]),
    }
    models = {}
    for name, batch in wanted:
        title, build, shape = table[name]
        models[f"{title}, batch {batch}"] = (lambda build=build, batch=batch: build(batch), [batch, *shape])
    return models


def rule_switch(rule: str):
    """(turn the rule on or off, models {title: (build, input shape)})."""
    from spc.targets import fusion, lower, testing

    if rule == "maxpool":
        original = lower.Lowering.lower_max_pool
        off = lambda self, mutator, call: None  # noqa: E731
        models = {
            "MaxPool 3x3/2, 64x112x112": (lone_pool, [1, 64, 112, 112]),
            "CNN 56x56 (2x2 pool), batch 1": (lambda: testing.cnn(channels=64, size=56, batch=1), [1, 3, 56, 56]),
            "ResNet-18 224x224, batch 1": (lambda: testing.resnet18(size=224, batch=1), [1, 3, 224, 224]),
        }
        return (lambda on: setattr(lower.Lowering, "lower_max_pool", original if on else off)), models
    mobilenet = whole_models(("mobilenet_v2", 1))
    if rule == "depthwise":
        original = lower.DEPTHWISE_MAX_ELEMENTS
        models = {f"depthwise 3x3/{s}, {c}x{n}x{n}": (lambda c=c, n=n, s=s: lone_depthwise(c, n, s), [1, c, n, n])
                  for c, n, s in MOBILENET_V2_DEPTHWISE}
        models.update(mobilenet)
        return (lambda on: setattr(lower, "DEPTHWISE_MAX_ELEMENTS", original if on else 0)), models
    if rule == "pad":
        from spc.targets import compile as compile_module

        original = compile_module.fold_pad
        effnet = {"EfficientNet-Lite0 224x224, batch 1": (lambda: _efficientnet_lite0(testing), [1, 3, 224, 224])}
        return (lambda on: setattr(compile_module, "fold_pad", original if on else (lambda m: (m, 0)))), effnet
    if rule == "expand_depthwise":
        original = lower.EXPAND_DEPTHWISE_MIN_ELEMENTS
        models = dict(mobilenet)
        models["MobileNetV2 224x224, batch 8"] = (lambda: testing.mobilenet_v2(size=224, batch=8), [8, 3, 224, 224])
        models["EfficientNet-Lite0 224x224, batch 1"] = (lambda: _efficientnet_lite0(testing), [1, 3, 224, 224])
        return (lambda on: setattr(lower, "EXPAND_DEPTHWISE_MIN_ELEMENTS", original if on else 0)), models
    if rule == "depthwise_flat":
        from spc.targets.kernels import depthwise

        original = depthwise._flat_pays
        models = {f"depthwise {k}x{k}/{s}, {c}x{n}x{n}": (lambda c=c, n=n, s=s, k=k: lone_depthwise(c, n, s, k),
                                                          [1, c, n, n])
                  for c, n, s, k in SMALL_MAP_DEPTHWISE}
        models["EfficientNet-Lite0 224x224, batch 1"] = (lambda: _efficientnet_lite0(testing), [1, 3, 224, 224])
        models.update(mobilenet)
        return (lambda on: setattr(depthwise, "_flat_pays", original if on else (lambda g, lanes: False))), models
    if rule == "small_1x1":
        original = lower._small_map_1x1
        models = {"EfficientNet-Lite0 224x224, batch 1": (lambda: _efficientnet_lite0(testing), [1, 3, 224, 224])}
        models.update(mobilenet)
        models["MobileNetV2 224x224, batch 8"] = (lambda: testing.mobilenet_v2(size=224, batch=8), [8, 3, 224, 224])
        return (lambda on: setattr(lower, "_small_map_1x1", original if on else (lambda g: False))), models
    if rule == "row_block":
        from spc.targets.kernels import depthwise

        original = dict(depthwise.ROW_BLOCK)
        models = {f"depthwise 3x3/{s}, {c}x{n}x{n}": (lambda c=c, n=n, s=s: lone_depthwise(c, n, s), [1, c, n, n])
                  for c, n, s in MOBILENET_V2_DEPTHWISE if n >= 28}
        for batch in (1, 8):
            models[f"MobileNetV2 224x224, batch {batch}"] = (lambda b=batch: testing.mobilenet_v2(size=224, batch=b),
                                                             [batch, 3, 224, 224])
            models[f"EfficientNet-Lite0 224x224, batch {batch}"] = (lambda: _efficientnet_lite0(testing),
                                                                    [batch, 3, 224, 224])
        return (lambda on: setattr(depthwise, "ROW_BLOCK", original if on else {})), models
    if rule == "channel_vectors":
        from spc.targets.kernels import conv_channels

        models = lone_conv_models(RESNET_CONVS)
        models.update(whole_models(*((name, b) for b in (1, 8) for name in ("resnet18", "cnn", "digits"))))
        return (lambda on: setattr(conv_channels, "CHANNEL_VECTORS", on)), models
    if rule == "padding_taps":
        from spc.targets.kernels import conv_channels

        models = lone_conv_models(RESNET_CONVS[1:])
        models.update(whole_models(*((name, b) for b in (1, 8) for name in ("digits", "cnn", "resnet18")),
                                   ("resnet50", 1)))
        return (lambda on: setattr(conv_channels, "SKIP_PADDING", on)), models
    if rule == "winograd":
        from spc.targets.kernels import conv_winograd

        shapes = [c for c in RESNET_CONVS if c[3:] == (3, 1)]
        shapes += [(c, c, n, 3, 1) for c, n in ((16, 56), (32, 28), (48, 14), (96, 7))]  # pruned to 1/4-1/5
        models = lone_conv_models(shapes)
        models.update(whole_models(*((name, b) for b in (1, 8) for name in ("digits", "cnn", "resnet18")),
                                   ("resnet50", 1)))
        return (lambda on: setattr(conv_winograd, "WINOGRAD", on)), models
    if rule == "winograd_stride2":
        from spc.targets.kernels import conv_winograd

        shapes = [c for c in RESNET_CONVS if c[3:] == (3, 2)]
        shapes += [(48, 80, 56, 3, 2), (32, 64, 28, 3, 2), (32, 64, 8, 3, 2)]  # pruned, the digits CNN's 8x8 -> 4x4
        models = lone_conv_models(shapes)
        models.update(whole_models(*((name, b) for b in (1, 8) for name in ("digits", "cnn", "resnet18")),
                                   ("resnet50", 1)))
        return (lambda on: setattr(conv_winograd, "STRIDED", on)), models
    if rule == "winograd_copy":
        from spc.targets.kernels import conv_winograd

        models = lone_conv_models([(64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (512, 512, 7, 3, 1), (16, 16, 56, 3, 1),
                                   (32, 32, 28, 3, 1), (16, 80, 28, 3, 1), (64, 128, 56, 3, 2), (48, 80, 56, 3, 2)])
        models.update(whole_models(*((name, b) for b in (1, 8) for name in ("digits", "cnn", "resnet18"))))
        return (lambda on: setattr(conv_winograd, "COPY_BLOCK", 4 if on else 0)), models
    if rule == "glue_vectors":
        from spc.targets import glue_schedule

        models = whole_models(*((name, b) for b in (1, 8) for name in ("resnet18", "cnn", "mobilenet_v2")),
                              ("resnet50", 1), ("digits", 8), ("encoder", 1))
        return (lambda on: setattr(glue_schedule, "VECTORISE_FUSED", on)), models
    if rule == "parallel_copy":
        from spc.targets.kernels import source

        original = source.PARALLEL_MIN_COPY
        models = {f"conv 3x3 {c} -> {c}, {n}x{n}, 80% block-sparse": (lambda c=c, n=n: lone_conv(c, c, n, 3, 1),
                                                                      [1, c, n, n])
                  for c, n in [(64, 56), (128, 28), (256, 14)]}
        models.update(whole_models(("cnn", 1), ("cnn", 8), ("resnet18", 1), ("mobilenet_v2", 1), ("encoder", 1)))
        return (lambda on: setattr(source, "PARALLEL_MIN_COPY", original if on else 1 << 18)), models
    if rule == "clip":
        original = fusion._Plan._clip
        return (lambda on: setattr(fusion._Plan, "_clip", original if on else (lambda self, call: None))), mobilenet
    raise SystemExit(f"--rule: unknown rule {rule!r} ({', '.join(RULES)})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="maxpool", help=", ".join(RULES))
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--budget", type=float, default=0.3, help="seconds per variant per round")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1, help="for TVM and ONNX Runtime")
    p.add_argument("--models", default=None, help="only the models whose title contains one of these (comma list)")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read once by TVM's thread pool: before importing TVM
    sys.path.insert(0, str(ROOT))
    from spc.targets import compile_model, load_bundle

    switch, models = rule_switch(args.rule)
    if args.models:
        models = {t: m for t, m in models.items() if any(part in t for part in args.models.split(","))}
    tmp = Path(tempfile.mkdtemp(prefix="spc-bench-kernel-ab-"))
    rows = []
    for title, (build, shape) in models.items():
        model = build()
        name = model.graph.input[0].name
        x = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        timers, outputs = {}, {}
        for variant in ("TVM", "spc"):
            switch(variant == "spc")
            out = tmp / f"{len(rows)}-{variant}"
            compile_model(model, "x86", out, input_shapes={name: shape},
                          sparsity=0.8 if "block-sparse" in title else 0.0)
            bundle = load_bundle(out)
            outputs[variant] = next(iter(bundle.run(x).values()))
            timers[variant] = bundle.timer(x)
        switch(True)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        timers["ORT"] = lambda session=session, x=x: session.run(None, x)
        ratios, times = [], {v: [] for v in timers}
        for _ in range(args.rounds):
            for variant, fn in timers.items():
                times[variant].append(per_call(fn, args.budget))
            ratios.append(times["TVM"][-1] / times["spc"][-1])
        row = {"rule": args.rule, "model": title, "threads": args.threads,
               "tvm_ms": float(np.median(times["TVM"])) * 1e3, "spc_ms": float(np.median(times["spc"])) * 1e3,
               "ort_ms": float(np.median(times["ORT"])) * 1e3,
               "speedup": float(np.median(ratios)),
               "q25": float(np.quantile(ratios, 0.25)), "q75": float(np.quantile(ratios, 0.75)),
               "max_abs_diff": float(np.abs(outputs["TVM"] - outputs["spc"]).max())}
        rows.append(row)
        off = {"expand_depthwise": "two kernels", "depthwise_flat": "rows", "small_1x1": "pixel vectors",
               "row_block": "one row", "channel_vectors": "pixel vectors", "parallel_copy": "256K",
               "padding_taps": "all taps", "glue_vectors": "whole rows", "winograd": "direct",
               "winograd_stride2": "stride 1 only", "winograd_copy": "element copy"}.get(
            args.rule, "TVM")  # what the rule replaces
        row["off"] = off
        print(f"{title}: {off} {row['tvm_ms']:.3f} ms, spc {row['spc_ms']:.3f} ms, {row['speedup']:.2f}x "
              f"[{row['q25']:.2f}-{row['q75']:.2f}], max |diff| {row['max_abs_diff']:.1e}; ONNX Runtime "
              f"{row['ort_ms']:.3f} ms", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
