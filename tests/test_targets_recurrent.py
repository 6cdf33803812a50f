"""LSTM, GRU and RNN unrolled for code generation (targets/recurrent.py): the unrolled graph computes what the
node computes (ONNX Runtime runs both) for every direction, layout, gate option and activation; a bundle with an
LSTM matches ONNX Runtime; a node that cannot be unrolled is a one-line error with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.errors import SpcError
from spc.targets.recurrent import GATES, unroll_recurrent
from spc.targets.testing import ort_run

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def _model(op: str, direction: str = "forward", layout: int = 0, bias: bool = True, states: bool = False,
           peepholes: bool = False, seq=SEQ, batch=BATCH, **attrs) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    const = lambda name, *shape: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) * 0.5).astype(np.float32), name)
    inits = [const("W", dirs, gates * HIDDEN, INPUT), const("R", dirs, gates * HIDDEN, HIDDEN)]
    inputs = ["x", "W", "R", "B" if bias else "", "", "h0" if states else ""]
    if bias:
        inits.append(const("B", dirs, 2 * gates * HIDDEN))
    if op == "LSTM":
        inputs += ["c0" if states and op == "LSTM" else "", "P" if peepholes else ""]
        if peepholes:
            inits.append(const("P", dirs, 3 * HIDDEN))
    x_shape = [seq, batch, INPUT] if not layout else [batch, seq, INPUT]
    state_shape = [dirs, BATCH, HIDDEN] if not layout else [BATCH, dirs, HIDDEN]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    feeds = {"x": rng.standard_normal([SEQ, BATCH, INPUT] if not layout else [BATCH, SEQ, INPUT]).astype(np.float32)}
    if states:
        for name in ("h0", "c0") if op == "LSTM" else ("h0",):
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, state_shape))
            feeds[name] = rng.standard_normal(state_shape).astype(np.float32)
    outputs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, inputs, outputs, name="rnn", hidden_size=HIDDEN, direction=direction, layout=layout,
                            **attrs)
    shapes = {"Y": [seq, dirs, batch, HIDDEN] if not layout else [batch, seq, dirs, HIDDEN],
              "Y_h": [dirs, batch, HIDDEN] if not layout else [batch, dirs, HIDDEN]}
    shapes["Y_c"] = shapes["Y_h"]
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, feeds


CASES = [
    ("LSTM", {}), ("LSTM", {"direction": "reverse"}), ("LSTM", {"direction": "bidirectional", "states": True}),
    ("LSTM", {"layout": 1, "states": True}), ("LSTM", {"peepholes": True, "states": True}),
    ("LSTM", {"bias": False, "input_forget": 1}), ("LSTM", {"clip": 0.7, "direction": "bidirectional"}),
    ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Tanh"], "activation_alpha": [0.3, 0.2],
              "activation_beta": [0.4]}),
    ("GRU", {}), ("GRU", {"direction": "bidirectional", "states": True}), ("GRU", {"linear_before_reset": 1}),
    ("GRU", {"linear_before_reset": 1, "states": True, "layout": 1}), ("GRU", {"clip": 0.5, "direction": "reverse"}),
    ("RNN", {}), ("RNN", {"direction": "bidirectional", "states": True, "activations": ["Relu", "Tanh"]}),
    ("RNN", {"layout": 1, "bias": False}),
]


@pytest.mark.parametrize("op,options", CASES, ids=[f"{op}-{'-'.join(map(str, o)) or 'plain'}" for op, o in CASES])
def test_unrolled_node_computes_what_the_node_computes(op, options):
    model, feeds = _model(op, **options)
    unrolled, count = unroll_recurrent(model)
    assert count == 1 and op not in {n.op_type for n in unrolled.graph.node}
    onnx.checker.check_model(unrolled)
    if options.get("layout"):  # ONNX Runtime runs no batch-first recurrent node: the reference is the node in layout 0
        reference, ref_feeds = _model(op, **{**options, "layout": 0})
        feeds = {name: value.transpose(1, 0, 2) for name, value in ref_feeds.items()}
        expected = {name: value.transpose((2, 0, 1, 3) if value.ndim == 4 else (1, 0, 2))
                    for name, value in ort_run(reference, ref_feeds).items()}
    else:
        expected = ort_run(model, feeds)
    got = ort_run(unrolled, feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_dynamic_batch_unrolls_a_dynamic_sequence_does_not():
    model, feeds = _model("LSTM", batch="batch")
    unrolled, _ = unroll_recurrent(model)
    for name, value in ort_run(model, feeds).items():
        np.testing.assert_allclose(ort_run(unrolled, feeds)[name], value, rtol=1e-5, atol=1e-5)
    model, _ = _model("GRU", seq="seq")
    with pytest.raises(SpcError, match=r"node 'rnn': op GRU is unrolled .* its sequence length is dynamic"):
        unroll_recurrent(model)
    model, _ = _model("RNN", activations=["Affine"])
    with pytest.raises(SpcError, match="its activation Affine has no ONNX op"):
        unroll_recurrent(model)


def test_compiled_lstm_matches_onnxruntime(tmp_path):
    """An LSTM model compiles (it could not: TVM's importer has no LSTM) and runs like ONNX Runtime."""
    pytest.importorskip("tvm")
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    model, feeds = _model("LSTM", direction="bidirectional", states=True, peepholes=True)
    compile_model(model, "x86", tmp_path)
    got = load_bundle(tmp_path).run(feeds)
    for name, value in ort_run(model, feeds).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)
