"""The ``spc compile`` and ``spc run`` commands: structured pruning (as ``spc prune``, with widths rounded to what
the target's kernels like), then ``spc.targets`` sparsifies, compiles with TVM and writes a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import SpcError


def _block(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    if not rows.isdigit() or not cols.isdigit():
        raise SpcError(f"--block: '{text}' is not RxC (e.g. 4x1)")
    return int(rows), int(cols)


def compile_cli(args, progress) -> int:
    from . import api
    from .cli import _dims, _ratio
    from .plan import check_budget
    from .report import table

    ratio = _ratio(args.ratio)
    check_budget(ratio, args.by)
    if not 0.0 <= args.sparsity < 1.0:
        raise SpcError(f"--sparsity: {args.sparsity} is out of range; it must be in [0, 1)")
    block = _block(args.block)
    from .targets import compile_model, get_target

    try:
        spec = get_target(args.target)
    except (KeyError, ValueError, SpcError) as error:
        raise SpcError(f"--target: {error}") from None
    progress(f"loading {args.model}")
    model = api.load(args.model)
    shapes = bound_shapes(model, _dims(args.dim)) if args.bind_dims else None  # checked before the long work
    summary: dict = {"target": spec.name}
    latency = None
    if args.speedup is not None:  # budget: measured latency on the target (spc/speedup.py)
        from .evaluate import load_npz
        from .speedup import cli_prune

        if ratio > 0:
            raise SpcError("--speedup and --ratio are exclusive: give one budget")
        if args.sparsity > 0:
            raise SpcError("--speedup chooses each layer's kernel and sparsity from measured latencies; it "
                           "cannot be combined with --sparsity")
        if args.no_winograd:
            raise SpcError("--speedup measures its layer latencies with the default kernels (Winograd 3x3 "
                           "convolutions); it cannot be combined with --no-winograd")
        calibration = load_npz(args.calib, model)[0] if args.calib else None
        result, latency = cli_prune(args, model, calibration, progress, spec.name, sparse=args.sparse_layers)
        model = result.model
        summary["pruning"] = result.summary()
    elif ratio > 0:
        from .evaluate import load_npz

        calibration = load_npz(args.calib, model)[0] if args.calib else None
        result = api.prune(model, ratio=ratio, by=args.by, criterion=args.criterion,
                           round_to=args.round_to or spec.round_to, seed=args.seed,
                           allow_inexact=args.allow_inexact, dim_values=_dims(args.dim), calibration=calibration,
                           progress=progress)
        model = result.model
        summary["pruning"] = result.summary()
    sparsity = args.sparsity
    if latency is not None and latency.get("sparsity"):  # --speedup's per-layer choice, measured with 4x1 blocks
        sparsity, block = latency["sparsity"], (4, 1)
    manifest = compile_model(model, spec.name, args.output, sparsity=sparsity, block=block, input_shapes=shapes,
                             progress=progress, winograd=not args.no_winograd)
    summary["bundle"] = str(args.output)
    if latency is not None:
        (Path(args.output) / "latency.json").write_text(json.dumps(latency, indent=2) + "\n")
        summary["latency"] = {"file": "latency.json", **latency["result"]}
        unbound = unmeasured_dims(manifest, latency.get("input_shapes") or {})
        if unbound:
            summary["latency"]["note"] = (
                f"measured with static input shapes {latency['input_shapes']}; the bundle keeps "
                f"{', '.join(unbound)} dynamic, and its kernels then choose their loops per call, which can be "
                "slower than measured (e.g. one image at a time on one thread); --bind-dims with --dim compiles "
                "what was measured")
    summary["manifest"] = manifest
    if args.eval:
        import onnx

        from .evaluate import load_npz, score

        original = api.load(args.model)
        feeds, labels = load_npz(args.eval, original)
        compiled = onnx.load(str(Path(args.output) / "model.onnx"))
        if shapes:  # scored in batches of any size: the inputs' dynamic axes back as they were
            dynamic = {vi.name: vi.type for vi in model.graph.input}
            for vi in compiled.graph.input:
                if vi.name in dynamic:
                    vi.type.CopyFrom(dynamic[vi.name])
        summary["eval"] = {"metric": "accuracy" if labels is not None else "top1_agreement",
                           "before": score(original, feeds, labels, None if labels is not None else
                                           _reference(original, feeds)),
                           "after": score(compiled, feeds, labels, None if labels is not None else
                                          _reference(original, feeds))}
    summary["model"] = str(args.model)
    (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    layers = manifest.get("layers", [])
    if layers:
        rows = [[layer.get("node", ""), layer.get("op", ""), _kernel_name(layer),
                 f"{layer['density']:.2f}" if isinstance(layer.get("density"), (int, float)) else "",
                 f"{layer['expected_speedup']:.2f}x" if isinstance(layer.get("expected_speedup"), (int, float))
                 else ""] for layer in layers]
        print(table(["layer", "op", "kernel", "density", "expected"], rows, {3, 4}))
    if "pruning" in summary:
        pruning = summary["pruning"]
        print(f"\npruned {pruning['reduction']['macs']:.1%} of MACs ({pruning['speedup_macs']}x fewer) "
              f"with '{pruning['criterion']}'")
    if latency is not None:
        res = latency["result"]
        print(f"measured on {latency['device']}: {res['measured_speedup']}x faster than the dense model (goal "
              f"{args.speedup}x, predicted {res['predicted_speedup']}x, {res['macs_reduction']}x fewer MACs); "
              f"per-layer decisions in latency.json")
        if "note" in summary["latency"]:
            print(f"note: {summary['latency']['note']}")
    if "eval" in summary:
        ev = summary["eval"]
        print(f"{ev['metric']} on {args.eval}: {ev['before']:.4f} before, {ev['after']:.4f} for the compiled model")
    print(f"compiled for {spec.name} (expected speed-up of the sparse layers {manifest.get('expected_speedup')}x); "
          f"bundle written to {args.output}")
    return 0


def bound_shapes(model, dims: dict[str, int]) -> dict[str, list]:
    """``--bind-dims``: each model input's shape with the ``--dim`` sizes in place of its named dynamic axes (others
    stay dynamic). Static sizes let the kernels specialise (e.g. one parallel loop over the whole batch); the
    bundle then accepts only those sizes."""
    if not dims:
        raise SpcError("--bind-dims: give the sizes to bind with --dim NAME=SIZE (e.g. --dim batch=8)")
    from .targets.compile import input_dims

    declared = input_dims(model)
    shapes = {name: [dims.get(d, d) if isinstance(d, str) else d for d in shape] for name, shape in declared.items()}
    unknown = sorted(set(dims) - {d for shape in declared.values() for d in shape if isinstance(d, str)})
    if unknown:
        raise SpcError(f"--bind-dims: --dim {unknown[0]} names no dynamic axis of the model's inputs "
                       f"({'; '.join(f'{name} {shape}' for name, shape in declared.items())})")
    return shapes


def unmeasured_dims(manifest: dict, measured: dict[str, list]) -> list[str]:
    """Dynamic axes of the bundle's inputs that ``--speedup`` measured at a fixed size above 1, e.g.
    'input[0] (batch, measured at 8)' (at size 1 a dynamic axis costs little: the loops are per image anyway)."""
    out = []
    for io in manifest.get("inputs", []):
        sizes = measured.get(io["name"]) or []
        for axis, (dim, size) in enumerate(zip(io["shape"], sizes)):
            if isinstance(dim, str) and size > 1:
                out.append(f"{io['name']}[{axis}] ({dim}, measured at {size})")
    return out


def _reference(model, feeds):
    from .evaluate import predict

    return predict(model, feeds)


def run_cli(args) -> int:
    from .targets import load_bundle

    bundle_dir = Path(args.bundle)
    if not (bundle_dir / "manifest.json").is_file():
        raise SpcError(f"{bundle_dir}: not a bundle (no manifest.json)")
    feeds = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SpcError(f"--input: '{item}' is not NAME=FILE.npy")
        if not Path(path).is_file():
            raise SpcError(f"--input: {path}: no such file")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except Exception as error:
            raise SpcError(f"--input: {path}: not a readable .npy file ({error})") from None
    outputs = load_bundle(bundle_dir).run(feeds)
    np.savez(args.output, **outputs)
    print(f"wrote {', '.join(outputs)} to {args.output}")
    return 0


def _kernel_name(layer: dict) -> str:
    """The layer's kernel as the table shows it: a dense 3x3 conv by Winograd says its tile (F(m x m, 3x3)), a
    grouped one its groups."""
    m, groups = layer.get("winograd"), layer.get("groups", 1)
    name = f"{layer.get('kernel', '')}, Winograd {m}x{m}" if m else layer.get("kernel", "")
    return f"{name}, {groups} groups" if groups > 1 else name
