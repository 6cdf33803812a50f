"""The engine's fast paths give the results of the plain computations they replace: atoms classed by hashed dim
lists, L1/L2 norms formed in blocks, the analysis reused by ``prune``, weights handed to ONNX Runtime apart."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import spc
from spc.analysis import grouping
from spc.errors import SpcError
from spc.io import from_proto
from spc.passes import PassContext, importance_pass
from spc.passes.magnitude import per_axis_norms
from spc.validate import example_inputs, run, validate
from tests.helpers import GraphBuilder, conv_bn_relu


def residual_cnn() -> onnx.ModelProto:
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 16, 16])
    y = conv_bn_relu(b, x, 3, 32)
    z = conv_bn_relu(b, y, 32, 32)
    y = b.op("Add", [y, conv_bn_relu(b, z, 32, 32)])
    y = b.op("GlobalAveragePool", [conv_bn_relu(b, y, 32, 48)])
    y = b.op("Flatten", [y])
    return b.model(b.op("Gemm", [y, b.w(10, 48), b.w(10)], transB=1))


def test_unique_ints_matches_numpy():
    values = np.random.default_rng(0).integers(0, 50, size=400)
    assert np.array_equal(grouping.unique_ints(values), np.unique(values))
    assert grouping.unique_ints(np.zeros(0, dtype=np.int64)).size == 0


def _random_pairs(rng, atoms: int, dims: int):
    lists = [rng.choice(dims, size=rng.integers(1, 4), replace=False) for _ in range(6)]
    pairs = sorted({(a, int(d)) for a in range(atoms) for d in lists[rng.integers(len(lists))]})
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.parametrize("collide", [False, True])
def test_same_dim_classes_equal_grouping_by_tuples(monkeypatch, collide):
    rng = np.random.default_rng(1)
    atom_of_pair, dim_of_pair = _random_pairs(rng, 300, 12)
    extra = rng.integers(-1, 2, size=300)
    if collide:  # as if two different dim lists shared a hash: the exact grouping must take over
        monkeypatch.setattr(grouping, "_exact", lambda *args: False)
    got = grouping.same_dim_classes(atom_of_pair, dim_of_pair, 12, [extra])
    starts = np.flatnonzero(np.r_[True, np.diff(atom_of_pair) != 0])
    counts = np.diff(np.r_[starts, atom_of_pair.size])
    want = grouping._by_tuple(atom_of_pair[starts], starts, counts, dim_of_pair, [extra])
    assert len(got) == len(want) > 1
    for (atoms, dims), (want_atoms, want_dims) in zip(got, want):
        assert np.array_equal(atoms, want_atoms) and np.array_equal(dims, want_dims)


@pytest.mark.parametrize("shape", [(7,), (9, 5), (6, 4, 3, 3), (3, 5, 2)])
@pytest.mark.parametrize("power", [1, 2])
def test_blocked_norms_equal_direct_sums(shape, power):
    array = np.random.default_rng(2).standard_normal(shape).astype(np.float16)
    axes = list(range(len(shape)))
    got = per_axis_norms(array, axes, power, block=7)  # a small block: several blocks per weight
    magnitude = np.abs(array.astype(np.float32)) ** power
    for axis, norms in zip(axes, got):
        others = tuple(a for a in range(len(shape)) if a != axis)
        assert np.allclose(norms, magnitude.sum(axis=others, dtype=np.float64), rtol=1e-6)


def test_l1_scores_every_unpinned_atom_by_its_weights():
    analysis = spc.analyze(from_proto(residual_cnn()))
    scores = importance_pass("l1")(analysis, PassContext())
    expected = np.zeros(analysis.atom_count)
    for tensor, axis in analysis.weight_dims:
        if analysis.roles.get(tensor, "weight") in ("weight", "scale"):
            weight = np.abs(analysis.graph.weight(tensor).astype(np.float64))
            norms = weight.sum(axis=tuple(a for a in range(weight.ndim) if a != axis))
            expected += np.bincount(analysis.dim_labels((tensor, axis)), norms, analysis.atom_count)
    free = ~analysis.pinned
    assert free.sum() >= 32 and np.allclose(scores[free], expected[free], rtol=1e-9)
    assert not scores[analysis.pinned].any()


def test_prune_reuses_an_analysis_and_matches_pruning_the_model():
    model = from_proto(residual_cnn())
    analysis = spc.analyze(model)
    reused = spc.prune(analysis, ratio=0.5, criterion="l1", round_to=1)
    fresh = spc.prune(model, ratio=0.5, criterion="l1", round_to=1)
    assert reused.analysis is analysis and fresh.analysis is not analysis
    assert np.array_equal(reused.plan.removed, fresh.plan.removed) and reused.plan.removed.any()
    feeds = example_inputs(model)
    assert np.allclose(run(reused.model, feeds)[model.graph.output[0].name],
                       run(fresh.model, feeds)[model.graph.output[0].name], atol=1e-5)
    inexact = spc.prune(analysis, ratio=0.5, criterion="l1", round_to=1, allow_inexact=True)
    assert inexact.analysis is not analysis and inexact.analysis.allow_inexact


def _large_matmul(rows: int = 256) -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    x = b.input("x", [2, rows])
    return b.model(b.op("Relu", [b.op("MatMul", [x, b.w(rows, 128)])]))  # 128 KB: handed over apart


def test_weights_handed_apart_give_the_serialised_models_outputs():
    import onnxruntime as ort

    model = _large_matmul()
    feeds = example_inputs(model)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = plain.run(None, feeds)[0]
    assert np.array_equal(run(model, feeds, optimize=False)[model.graph.output[0].name], expected)
    assert np.array_equal(run(model, feeds)[model.graph.output[0].name], expected)


def test_a_weight_whose_bytes_do_not_match_its_dims_is_still_refused():
    model = _large_matmul()
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    weight = model.graph.initializer[0]
    weight.raw_data = numpy_helper.to_array(weight).reshape(-1)[:-3].tobytes()
    with pytest.raises(SpcError, match="refusing to write"):
        validate(model, reference)
