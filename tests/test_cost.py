"""The MAC and parameter counter agrees with PyTorch's FLOP counter and parameter count, and costs plans exactly."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference counts come from PyTorch's FLOP counter")

import spc  # noqa: E402
from spc.cost import CostModel, count  # noqa: E402
from spc.graph import Graph  # noqa: E402
from spc.io import load  # noqa: E402
from tests.zoo import build, export  # noqa: E402


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "regnet", "unet", "vit", "bert"])
def test_macs_and_params_match_pytorch(name, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    model, inputs = build(name)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(*inputs.values()) if isinstance(inputs, dict) else model(*inputs)
    torch_macs = counter.get_total_flops() // 2
    feeds = export(name, tmp_path / f"{name}.onnx")
    graph = Graph(load(tmp_path / f"{name}.onnx"))
    dims = {}
    for value in graph.model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param:
                dims[dim.dim_param] = feeds[value.name].shape[axis]
    cost = count(graph, dims)
    assert cost.macs == pytest.approx(torch_macs, rel=0.02)
    torch_params = sum(p.numel() for p in model.parameters())
    # BatchNorm running statistics are weights in ONNX but buffers in PyTorch; folded BNs vanish entirely
    assert torch_params * 0.9 <= cost.params <= torch_params * 1.1


def test_cost_of_a_plan_equals_the_cost_of_the_rewritten_model(tmp_path):
    export("resnet18", tmp_path / "r.onnx")
    model = load(tmp_path / "r.onnx")
    analysis = spc.analyze(model)
    removed = np.zeros(analysis.atom_count, dtype=bool)
    rng = np.random.default_rng(0)
    for group in analysis.prunable_groups:
        removed[rng.choice(group.atoms, size=group.size // 3, replace=False)] = True
    predicted = CostModel(analysis).evaluate(removed)
    actual = count(Graph(spc.apply_removal(analysis, removed)))
    assert predicted.macs == actual.macs and predicted.params == actual.params
