"""Accuracy without fine-tuning of the trained demo models for each criterion at 1.5x/2x/3x fewer MACs (round-to 1).

    python bench/bench_criteria.py        # prints the markdown table of bench/README.md
"""
import numpy as np, spc, time
from spc.evaluate import load_npz, score
rows=[]
for name in ("digits_cnn","digits_transformer"):
    m=spc.load(f"models/{name}.onnx")
    feeds, labels = load_npz("models/digits_eval.npz", m)
    calib = load_npz("models/digits_calib.npz", m)[0]
    base=score(m, feeds, labels)
    for speed in (1.5, 2.0, 3.0):
        row=[name, f"{speed}x", f"{base:.4f}"]
        for crit in ("l1","random","obspa","obs"):
            r=spc.prune(m, ratio=1-1/speed, criterion=crit, round_to=1, calibration=calib if crit=="obs" else None)
            row.append(f"{score(r.model, feeds, labels):.4f}")
        rows.append(row)
print("| model | MACs | dense | L1 | random | OBSPA (no data) | OBS (256 calib) |")
print("|---|---|---|---|---|---|---|")
for r in rows: print("| "+" | ".join(r)+" |")
