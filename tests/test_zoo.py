"""Real architectures exported from PyTorch (random weights, reduced widths): the oracle holds on every prunable
group, and pruning 30% of the MACs gives a valid smaller model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the zoo is exported from PyTorch modules; install the [test] extra")

import spc  # noqa: E402
from spc.io import load  # noqa: E402
from spc.validate import run  # noqa: E402
from tests.helpers import check_oracle  # noqa: E402
from tests.zoo import ZOO, export  # noqa: E402

# architectures whose groups must include attention heads (whole heads, width > 1)
WITH_HEADS = {"vit", "swin", "bert", "gpt2", "llama", "t5_encoder"}


# the TorchScript exporter writes dynamic shapes as Shape->Gather->Concat chains: check those graphs too
LEGACY = ["resnet18", "mobilenetv2", "shufflenetv2", "vit", "bert", "gpt2", "llama"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, exporter=None):
        if (name, exporter) not in cache:
            path = tmp_path_factory.mktemp("zoo") / f"{name}.onnx"
            feeds = export(name, path, exporter=exporter)
            cache[(name, exporter)] = (path, feeds)
        return cache[(name, exporter)]

    return get


@pytest.mark.parametrize("name,exporter", [(n, None) for n in sorted(ZOO)] + [(n, "legacy") for n in LEGACY])
def test_zoo_model_prunes_exactly(name, exporter, exported):
    path, feeds = exported(name, exporter)
    model = load(path)
    dims = {d: int(v) for d, v in _dim_sizes(model, feeds).items()}
    analysis = check_oracle(model, trials=1, dim_values=dims, rtol=2e-4)
    if name in WITH_HEADS:
        assert any(g.width > 1 for g in analysis.prunable_groups), "attention heads should be prunable units"
    result = spc.prune(model, ratio=0.3, by="macs", criterion="l1", round_to=1, dim_values=dims)
    assert result.plan.reduction("macs") >= 0.3
    outputs = run(result.model, feeds)
    reference = run(model, feeds)
    for key, value in reference.items():
        assert outputs[key].shape == value.shape and np.isfinite(outputs[key]).all()


def _dim_sizes(model, feeds):
    """Sizes of the dynamic axes, read off the example inputs."""
    sizes = {}
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and value.name in feeds:
                sizes[dim.dim_param] = feeds[value.name].shape[axis]
    return sizes
