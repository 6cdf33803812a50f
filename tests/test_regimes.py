"""The three pruning regimes of examples/three_regimes.py, on scikit-learn's 8x8 digits (seconds, no download).

A small CNN (16/32/64 channels) is trained for 8 epochs; every pruned model has half the MACs (``round_to=1``:
the layers are too narrow for multiples of 16). Accuracies come from ONNX Runtime on a held-out 20% split, and the
thresholds sit where a broken regime would land: L1 pruning of the trained model without fine-tuning falls to
about 30%, so "fine-tuning recovers" and "OBSPA needs no fine-tuning" are both visible.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import spc
from tests.helpers import close

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "three_regimes.py"
PRUNE = {"ratio": 0.5, "by": "macs", "round_to": 1}
EPOCHS, FINETUNE_EPOCHS, LR, FINETUNE_LR = 8, 2, 3e-3, 1e-3


def _example():
    spec = importlib.util.spec_from_file_location("three_regimes", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup():
    """The data, the untrained and the trained dense model (ONNX), and the dense test accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ex = _example()
    train_set, test_set = ex.load_data("digits")
    init = ex.to_onnx(ex.build_cnn(), train_set[0])
    dense = ex.to_onnx(ex.train(ex.build_cnn(), train_set, EPOCHS, LR), train_set[0])
    yield ex, train_set, test_set, init, dense, ex.accuracy(dense, test_set)
    torch.set_num_threads(threads)


def test_dense_model_trains(setup):
    *_, dense_accuracy = setup
    assert dense_accuracy >= 0.97


def test_regime1_pruned_before_training_trains_to_near_dense(setup):
    ex, train_set, test_set, init, _, dense_accuracy = setup
    pruned = spc.prune(init, criterion="l1", **PRUNE)
    assert pruned.plan.after.macs <= 0.52 * pruned.plan.before.macs
    module = spc.to_torch(pruned.model)
    with torch.no_grad():
        before = module(torch.from_numpy(test_set[0])).numpy()
    ort_logits = ex.ort.InferenceSession(pruned.model.SerializeToString()).run(None, {"image": test_set[0]})[0]
    assert close(before, ort_logits, rtol=1e-4)
    untrained = ex.accuracy(pruned.model, test_set)
    trained = ex.accuracy(ex.train(module, train_set, EPOCHS, LR).to_onnx(), test_set)
    assert untrained < 0.3 and trained >= 0.95 and trained >= dense_accuracy - 0.03


def test_regime2_fine_tuning_recovers_to_within_two_points_of_dense(setup):
    ex, train_set, test_set, _, dense, dense_accuracy = setup
    pruned = spc.prune(dense, criterion="obspa", **PRUNE)
    no_finetune = ex.accuracy(pruned.model, test_set)
    tuned = ex.train(spc.to_torch(pruned.model), train_set, FINETUNE_EPOCHS, FINETUNE_LR).to_onnx()
    l1_no_finetune = ex.accuracy(spc.prune(dense, criterion="l1", **PRUNE).model, test_set)
    finetuned = ex.accuracy(tuned, test_set)
    assert finetuned >= dense_accuracy - 0.02
    assert finetuned >= no_finetune and finetuned > l1_no_finetune + 0.3


def test_regime3_obspa_without_data_or_fine_tuning_beats_l1(setup):
    ex, _, test_set, _, dense, dense_accuracy = setup
    accuracy = {c: ex.accuracy(spc.prune(dense, criterion=c, **PRUNE).model, test_set) for c in ("obspa", "l1")}
    assert accuracy["obspa"] >= 0.9 and accuracy["obspa"] >= dense_accuracy - 0.05
    assert accuracy["obspa"] > accuracy["l1"] + 0.3


def test_example_table_lists_every_regime_and_criterion():
    report = {"dense": {"accuracy": 0.99, "macs": 1000}, "epochs": 8, "finetune_epochs": 2,
              **{c: {"regime1": 0.9, "regime2": 0.95, "regime3": 0.5, "macs": 500} for c in ("obspa", "l1")}}
    lines = _example().table(report).splitlines()
    assert len(lines) == 7 and "OBSPA | L1" in lines[0] and "2.00x fewer" in lines[-1]
    assert np.all(["%" in line for line in lines[2:6]])
