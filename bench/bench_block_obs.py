#!/usr/bin/env python3
"""Block-sparse layers zeroed by magnitude against OBS-chosen and compensated blocks (passes/block_obs.py).

On the trained digits CNN (models/), after channel pruning with OBSPA (0%, 30% and 50% of the MACs, widths rounded
to 16), given layers get a share of their 4x1 blocks zeroed, once as compile_model does alone (least magnitude) and
once with ``spc.latency_sparse.compensate_blocks`` (OBS saliency, rows re-fitted with OBSPA's data-free moments).
Accuracy on digits_eval.npz (540 images). About 20 s.

    python bench/bench_block_obs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import spc  # noqa: E402
from spc.latency_sparse import compensate_blocks  # noqa: E402
from spc.passes import PassContext  # noqa: E402
from spc.passes.obspa import ObspaImportance  # noqa: E402
from spc.passes.sparsify import sparsify  # noqa: E402
from spc.plan import make_plan  # noqa: E402
from spc.rewrite import apply_removal  # noqa: E402

CASES = [
    {"layer2.conv1.weight": 0.8, "layer2.conv2.weight": 0.8, "layer3.conv1.weight": 0.8},
    {"layer1.conv1.weight": 0.5, "layer1.conv2.weight": 0.5},
    {"layer1.conv1.weight": 0.8, "layer1.conv2.weight": 0.5},
]


def main() -> int:
    from bench_obspa import DigitsTask

    task = DigitsTask("digits_cnn")
    analysis = spc.analyze(task.onnx_model())
    scorer = ObspaImportance()
    scores = scorer(analysis, PassContext())
    print(f"dense accuracy {task.evaluate(task.onnx_model()):.4f}")
    print("| channels removed first | BSR layers | zeroed by magnitude | OBS-compensated |")
    print("|---|---|---|---|")
    for ratio in (0.0, 0.3, 0.5):
        plan = make_plan(analysis, scores, ratio, "macs", 16 if ratio else 1, normalize=scorer.normalize)
        pruned = scorer.compensate(analysis, plan, apply_removal(analysis, plan.removed), PassContext())
        for case in CASES:
            magnitude = task.evaluate(sparsify(pruned, case, min_size=1)[0])
            compensated, _ = compensate_blocks(analysis, scorer, plan, pruned, case)
            obs = task.evaluate(sparsify(compensated, case, min_size=1)[0])  # as compile_model would
            layers = ", ".join(f"{name.removesuffix('.weight')} {share:g}" for name, share in case.items())
            print(f"| {ratio:.0%} | {layers} | {magnitude:.4f} | {obs:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
