"""The rest of the model's time outside the latency layers (spc/latency_rest.py): on a transformer encoder it
shrinks with the attention heads, barely with the FFN (only GELU's one pass), never with the LayerNorms; elementwise
chains count once, layer epilogues not at all; the latency model with it keeps the dense prediction exact."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from spc.analysis import analyze  # noqa: E402
from spc.api import _as_model  # noqa: E402
from spc.cost import CostModel  # noqa: E402
from spc.graph import Graph  # noqa: E402
from spc.latency_plan import LatencyModel, lowest_removal  # noqa: E402
from spc.latency_rest import MACS_PER_ELEMENT, RestWork  # noqa: E402
from spc.targets import testing  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    model = testing.encoder(d_model=32, heads=4, ffn=64, layers=1, seq=8, batch=2, static_batch=True)
    analysis = analyze(Graph(_as_model(model)))
    cost = CostModel(analysis)
    return analysis, cost, RestWork(analysis.graph, cost, lowest_removal(analysis, 1))


def _groups(analysis):
    heads = [g for g in analysis.prunable_groups if g.size == 4]
    ffn = [g for g in analysis.prunable_groups if g.size == 64]
    assert len(heads) == 1 and len(ffn) == 1
    return heads[0], ffn[0]


def _share(analysis, cost, rest, atoms):
    removed = np.zeros(analysis.atom_count, dtype=bool)
    removed[atoms] = True
    nothing = np.zeros(analysis.atom_count, dtype=bool)
    return rest(cost.shape_function(removed)) / rest(cost.shape_function(nothing))


def test_attention_work_goes_with_the_heads_and_the_ffn_takes_only_gelu(encoder):
    analysis, cost, rest = encoder
    heads, ffn = _groups(analysis)
    graph = analysis.graph
    seq, batch, d, hidden = 8, 2, 32, 64
    # by hand: the two attention products, then the passes over the attention scores (scale, softmax), head
    # layout (split, three transposes in, one out), GELU once, two residual adds and two LayerNorms
    scores = batch * 4 * seq * seq
    tokens = batch * seq
    products = 2 * scores * (d // 4) / MACS_PER_ELEMENT
    per_head = products + 2 * scores + tokens * 3 * d + 4 * tokens * d
    expected = per_head + tokens * hidden + 2 * tokens * d + 2 * tokens * d
    full = rest(cost.shape_function(np.zeros(analysis.atom_count, dtype=bool)))
    assert full == pytest.approx(expected)
    erf = next(n for n in graph.nodes if n.op_type == "Erf").output[0]
    assert not any(erf in tensors for tensors in rest._passes)  # fused into the GELU chain's first pass
    bias_adds = [n.output[0] for n in graph.nodes
                 if n.op_type == "Add" and any(i in graph.initializers for i in n.input)]
    assert bias_adds and not any(t in tensors[-1:] for tensors in rest._passes for t in bias_adds)  # epilogues
    half_heads = _share(analysis, cost, rest, heads.atoms[:2])
    half_ffn = _share(analysis, cost, rest, ffn.atoms[:32])
    assert half_heads == pytest.approx(1 - per_head / 2 / expected)
    assert half_ffn == pytest.approx(1 - tokens * hidden / 2 / expected)
    assert half_heads < half_ffn < 1


def test_the_latency_model_with_the_rest_keeps_the_dense_time_and_scales_the_rest_by_its_work(encoder):
    analysis, cost, rest = encoder
    heads, _ffn = _groups(analysis)
    model = LatencyModel(cost, [], other_seconds=1e-3, fixed_seconds=2e-4, rest=rest)
    nothing = np.zeros(analysis.atom_count, dtype=bool)
    assert model.predict(nothing) == pytest.approx(1e-3)
    removed = nothing.copy()
    removed[heads.atoms[:2]] = True
    share = _share(analysis, cost, rest, heads.atoms[:2])
    assert model.predict(removed) == pytest.approx(2e-4 + 8e-4 * share)


def test_weight_layers_that_no_plan_narrows_are_constant_work():
    """Channels pinned by Hardmax over them (spc has no rule for it): both MatMuls keep their widths, so their MACs
    are work of the rest that no plan removes; the Hardmax is one pass over its input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
              for s, n in (((8, 16), "w1"), ((16, 4), "w2")))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
             helper.make_node("Hardmax", ["h"], ["m"], name="pin"),
             helper.make_node("MatMul", ["m", "w2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "pinned", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w1, w2])
    analysis = analyze(Graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert not analysis.prunable_groups
    cost = CostModel(analysis)
    rest = RestWork(analysis.graph, cost, lowest_removal(analysis, 1))
    work = rest(cost.shape_function(np.zeros(analysis.atom_count, dtype=bool)))
    assert work == pytest.approx((2 * 8 * 16 + 2 * 16 * 4) / MACS_PER_ELEMENT + 2 * 16)
