"""Export every zoo model, run it in onnxruntime and compare against torch.

    python -m tests.zoo.check_zoo [--exporter dynamo|legacy] [--opset 17] [--keep-bn]
                                  [--ops] [--models resnet18 vit ...]

Prints one row per model: number of ONNX nodes, export seconds (build + export +
optimize + save; wall clock, and CPU seconds of this process, which is steadier on a
loaded machine), max |onnx - torch| on the example inputs, and the same on inputs with a
different batch size (and sequence length for token models) to check the dynamic axes.
Exits non-zero if any model fails or differs by more than --atol.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__ in (None, ""):  # allow `python tests/zoo/check_zoo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.zoo"

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tests.zoo import INPUTS, ZOO, build, export


def _torch_out(model, feeds: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[n]) for n in names)).numpy()


def _resized_feeds(name: str, feeds: dict[str, np.ndarray], proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs with every symbolic axis of the ONNX graph changed: batch -> 2, others -> 5."""
    rng = np.random.default_rng(1)
    graph_dims = {
        i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    out = {}
    for s in INPUTS[name]:
        shape = list(feeds[s.name].shape)
        for ax, dim in enumerate(graph_dims[s.name]):
            if dim:
                shape[ax] = 2 if ax == 0 else 5
        if s.dtype.is_floating_point:
            out[s.name] = rng.standard_normal(shape).astype(np.float32)
        elif s.fill is not None:
            out[s.name] = np.full(shape, s.fill, dtype=np.int64)
        else:
            out[s.name] = rng.integers(0, s.high, shape, dtype=np.int64)
    return out


def _warm_up(exporter) -> None:
    import transformers  # noqa: F401  (what the first HF model would otherwise pay)

    from tests.zoo import core

    with tempfile.TemporaryDirectory() as d:
        m, x = torch.nn.Linear(4, 2).eval(), torch.randn(2, 4)
        spec = [core.InputSpec("x", (2, 4), dynamic={0: "batch"})]
        if (exporter or core.DEFAULT_EXPORTER) == "legacy":
            core._export_legacy(m, (x,), spec, 17, True, True)
        else:
            core._export_dynamo("warmup", m, (x,), spec, 18, True)


def check(name: str, tmp: Path, args) -> dict:
    path = tmp / f"{name}.onnx"
    t0, c0 = time.perf_counter(), time.process_time()
    feeds = export(name, path, args.opset, exporter=args.exporter, fold_bn=not args.keep_bn,
                   dynamic=not args.static, cache=False)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    model, _ = build(name)
    names = [s.name for s in INPUTS[name]]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = float(np.abs(sess.run(None, feeds)[0] - _torch_out(model, feeds, names)).max())
    dyn_diff = float("nan")
    if not args.static:
        feeds2 = _resized_feeds(name, feeds, proto)
        dyn_diff = float(np.abs(sess.run(None, feeds2)[0] - _torch_out(model, feeds2, names)).max())
    return dict(name=name, nodes=len(proto.graph.node), secs=secs, cpu=cpu, diff=diff, dyn_diff=dyn_diff,
                ops=ops, opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                kib=path.stat().st_size / 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default=None)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--keep-bn", action="store_true", help="export with fold_bn=False")
    p.add_argument("--static", action="store_true", help="export without dynamic axes")
    p.add_argument("--ops", action="store_true", help="print op_type counts per model")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--models", nargs="*", default=list(ZOO))
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows, failures = [], []
    # one-time costs (importing transformers, initialising the exporter) are paid by the
    # first export of a process; measure them apart so the per-model times are comparable
    t0 = time.perf_counter()
    _warm_up(args.exporter)
    print(f"one-time warm-up (import transformers + first {args.exporter or 'default'} export): "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"{'model':<16} {'opset':>5} {'nodes':>6} {'KiB':>7} {'export s':>9} {'cpu s':>6} {'max diff':>10} {'dyn diff':>10}")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            try:
                r = check(name, Path(d), args)
            except Exception as e:  # keep going: report every model
                traceback.print_exc()
                failures.append(name)
                print(f"{name:<16} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                continue
            rows.append(r)
            bad = not (r["diff"] <= args.atol and (args.static or r["dyn_diff"] <= args.atol))
            if bad:
                failures.append(name)
            print(f"{name:<16} {r['opset']:>5} {r['nodes']:>6} {r['kib']:>7.0f} {r['secs']:>9.2f} {r['cpu']:>6.2f} "
                  f"{r['diff']:>10.2e} {r['dyn_diff']:>10.2e}{'  <-- MISMATCH' if bad else ''}", flush=True)
            if args.ops:
                print("    " + ", ".join(f"{k}:{v}" for k, v in sorted(r["ops"].items(), key=lambda kv: -kv[1])))
    total = collections.Counter()
    for r in rows:
        total.update(r["ops"])
    print(f"\n{len(rows)} exported, {len(failures)} failed/mismatched {failures if failures else ''}")
    print("op types used: " + ", ".join(f"{k}:{v}" for k, v in sorted(total.items(), key=lambda kv: -kv[1])))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
