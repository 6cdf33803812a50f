"""LSTM, GRU and RNN nodes unrolled into the ops they are made of, ahead of code generation.

TVM's ONNX importer has no LSTM, GRU or RNN, so a model with one could be pruned but not compiled. Over a static
sequence length a recurrent node is a fixed chain: the input projection of every step at once (one MatMul of all
time steps by W, plus both biases), then per step the recurrent MatMul by R, the gates (Split, Sigmoid, Tanh, Mul,
Add; the node's own activations, clip, peepholes, ``input_forget`` and GRU's ``linear_before_reset``), for each
direction, and the outputs concatenated in the layout the node declares. The unrolled graph only feeds the
compiler: the bundle keeps the model as the user gave it. A node whose sequence length is dynamic, whose weights
are computed at run time or whose sequences have their own lengths stays, and the compiler says why.
"""

from __future__ import annotations

import numpy as np
import onnx

from spc.errors import SpcError
from spc.graph import node_attr

from .onnx_emitter import Emitter, constant_values, replaced, taken_names

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# activation name (lower case) -> (ONNX op, takes alpha, takes beta, default alpha, default beta)
ACTIVATIONS = {
    "sigmoid": ("Sigmoid", False, False, None, None),
    "tanh": ("Tanh", False, False, None, None),
    "relu": ("Relu", False, False, None, None),
    "softsign": ("Softsign", False, False, None, None),
    "softplus": ("Softplus", False, False, None, None),
    "leakyrelu": ("LeakyRelu", True, False, 0.01, None),
    "thresholdedrelu": ("ThresholdedRelu", True, False, 1.0, None),
    "elu": ("Elu", True, False, 1.0, None),
    "hardsigmoid": ("HardSigmoid", True, True, 0.2, 0.5),
}


def _activations(node: onnx.NodeProto, directions: int) -> list[tuple[str, dict]]:
    """(ONNX op, attributes) of each activation the node applies, forward direction's first."""
    names = node_attr(node, "activations") or DEFAULT_ACTIVATIONS[node.op_type] * directions
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    if len(names) == len(DEFAULT_ACTIVATIONS[node.op_type]) and directions == 2:
        names = names * 2
    alphas = list(node_attr(node, "activation_alpha") or [])
    betas = list(node_attr(node, "activation_beta") or [])
    out = []
    for name in names:
        known = ACTIVATIONS.get(name.lower())
        if known is None:
            raise ValueError(f"activation {name}")
        op, takes_alpha, takes_beta, alpha, beta = known
        attrs = {}
        if takes_alpha:
            attrs["alpha"] = float(alphas.pop(0)) if alphas else alpha
        if takes_beta:
            attrs["beta"] = float(betas.pop(0)) if betas else beta
        out.append((op, attrs))
    return out


def why_not_unrolled(node: onnx.NodeProto, seq: int | None, constants: dict[str, np.ndarray]) -> str | None:
    """Why ``node`` cannot be unrolled (None: it can)."""
    inputs = list(node.input) + [""] * 8
    if seq is None:
        return "its sequence length is dynamic (bind it: --dim NAME=SIZE --bind-dims)"
    if seq < 1:
        return "its sequence is empty"
    if inputs[1] not in constants or inputs[2] not in constants:
        return "its weights are computed at run time"
    if inputs[3] and inputs[3] not in constants:
        return "its bias is computed at run time"
    if inputs[4]:
        lengths = constants.get(inputs[4])
        if lengths is None or not np.all(lengths == seq):
            return "its sequences have their own lengths (sequence_lens)"
    if node.op_type == "LSTM" and inputs[7] and inputs[7] not in constants:
        return "its peephole weights are computed at run time"
    try:
        _activations(node, 2 if node_attr(node, "direction", "forward") == "bidirectional" else 1)
    except ValueError as exc:
        return f"its {exc} has no ONNX op"
    return None


def _gate_activation(e: Emitter, x: str, act: tuple[str, dict], clip: float | None, what: str) -> str:
    if clip is not None:
        x = e.op("Clip", [x, e.const(np.float32(-clip), "clip_lo"), e.const(np.float32(clip), "clip_hi")], "clip")
    op, attrs = act
    return e.op(op, [x], what, **attrs)


def _direction(e: Emitter, node: onnx.NodeProto, xw: str, w_r: np.ndarray, bias_r: np.ndarray | None,
               peep: np.ndarray | None, h0: str | None, c0: str | None, acts: list, seq: int, reverse: bool,
               hidden: int) -> tuple[list[str], str, str | None]:
    """One direction's steps: (H of each time step in time order, the last H, the last C for LSTM)."""
    op = node.op_type
    clip = node_attr(node, "clip")
    clip = float(clip) if clip is not None else None
    rt = w_r.T.astype(np.float32)  # [hidden, gates * hidden]
    r_all = e.const(rt, "R_T")
    if op == "GRU":
        r_zr, r_h = e.const(rt[:, :2 * hidden], "R_zr_T"), e.const(rt[:, 2 * hidden:], "R_h_T")
    linear_before_reset = bool(node_attr(node, "linear_before_reset", 0))
    h, c = h0, c0
    outputs: dict[int, str] = {}
    order = range(seq - 1, -1, -1) if reverse else range(seq)
    for t in order:
        x_t = e.op("Gather", [xw, e.const(np.int64(t), "t")], "x_t", axis=0)  # [batch, gates * hidden]
        if op == "GRU":
            x_zr, x_h = e.op("Split", [x_t, e.const(np.array([2 * hidden, hidden], np.int64), "split")], "x_zrh",
                             outputs=2, axis=-1)
            zr = x_zr if h is None else e.op("Add", [x_zr, e.op("MatMul", [h, r_zr], "h_zr")], "zr")
            z_pre, r_pre = e.op("Split", [zr, e.const(np.array([hidden, hidden], np.int64), "split")], "zr_",
                                outputs=2, axis=-1)
            z = _gate_activation(e, z_pre, acts[0], clip, "z")
            r = _gate_activation(e, r_pre, acts[0], clip, "r")
            if h is None:  # H_{t-1} = 0: the reset gate multiplies zeros (and the recurrent bias, below)
                h_pre = x_h
                if linear_before_reset and bias_r is not None:
                    h_pre = e.op("Add", [x_h, e.op("Mul", [r, e.const(bias_r, "Rbh")], "r_rbh")], "h_pre")
            elif linear_before_reset:
                hr = e.op("MatMul", [h, r_h], "h_h")
                if bias_r is not None:
                    hr = e.op("Add", [hr, e.const(bias_r, "Rbh")], "h_h_b")
                h_pre = e.op("Add", [x_h, e.op("Mul", [r, hr], "r_hh")], "h_pre")
            else:
                h_pre = e.op("Add", [x_h, e.op("MatMul", [e.op("Mul", [r, h], "r_h"), r_h], "rh_h")], "h_pre")
            cand = _gate_activation(e, h_pre, acts[1], clip, "h_cand")
            one_minus_z = e.op("Sub", [e.const(np.float32(1), "one"), z], "one_minus_z")
            new_h = e.op("Mul", [one_minus_z, cand], "h_new")
            if h is not None:
                new_h = e.op("Add", [new_h, e.op("Mul", [z, h], "z_h")], "h")
            h = new_h
        else:
            pre = x_t if h is None else e.op("Add", [x_t, e.op("MatMul", [h, r_all], "h_r")], "gates")
            if op == "RNN":
                h = _gate_activation(e, pre, acts[0], clip, "h")
            else:
                i_pre, o_pre, f_pre, c_pre = e.op("Split", [pre, e.const(np.full(4, hidden, np.int64), "split")],
                                                  "iofc", outputs=4, axis=-1)
                if peep is not None and c is not None:
                    i_pre = e.op("Add", [i_pre, e.op("Mul", [c, e.const(peep[0], "Pi")], "pi_c")], "i_peep")
                    f_pre = e.op("Add", [f_pre, e.op("Mul", [c, e.const(peep[2], "Pf")], "pf_c")], "f_peep")
                i = _gate_activation(e, i_pre, acts[0], clip, "i")
                cand = _gate_activation(e, c_pre, acts[1], clip, "c_cand")
                new_c = e.op("Mul", [i, cand], "i_c")
                if c is not None:
                    if node_attr(node, "input_forget", 0):
                        f = e.op("Sub", [e.const(np.float32(1), "one"), i], "f")
                    else:
                        f = _gate_activation(e, f_pre, acts[0], clip, "f")
                    new_c = e.op("Add", [e.op("Mul", [f, c], "f_c"), new_c], "c")
                c = new_c
                if peep is not None:
                    o_pre = e.op("Add", [o_pre, e.op("Mul", [c, e.const(peep[1], "Po")], "po_c")], "o_peep")
                o = _gate_activation(e, o_pre, acts[0], clip, "o")
                h = e.op("Mul", [o, _gate_activation(e, c, acts[2], None, "tanh_c")], "h")
        outputs[t] = h
    return [outputs[t] for t in range(seq)], h, c


def _unroll(e: Emitter, node: onnx.NodeProto, seq: int, constants: dict[str, np.ndarray]) -> None:
    inputs = list(node.input) + [""] * 8
    outputs = list(node.output) + [""] * 3
    op = node.op_type
    gates = GATES[op]
    w, r = constants[inputs[1]], constants[inputs[2]]
    directions, hidden = w.shape[0], r.shape[-1]
    bias = constants[inputs[3]].astype(np.float32) if inputs[3] else np.zeros((directions, 2 * gates * hidden),
                                                                                np.float32)
    peep = constants[inputs[7]].astype(np.float32) if op == "LSTM" and inputs[7] else None
    direction = node_attr(node, "direction", "forward")
    layout = node_attr(node, "layout", 0)
    acts = _activations(node, directions)
    per_direction = len(acts) // directions
    x = inputs[0] if not layout else e.op("Transpose", [inputs[0]], "x_seq_first", perm=[1, 0, 2])
    ys, hs, cs = [], [], []
    for d in range(directions):
        wb, rb = bias[d, :gates * hidden], bias[d, gates * hidden:]
        in_bias = wb + rb
        bias_r = None
        if op == "GRU":  # Rbh stays inside the reset gate's product when linear_before_reset
            if node_attr(node, "linear_before_reset", 0):
                in_bias = np.concatenate([wb[:2 * hidden] + rb[:2 * hidden], wb[2 * hidden:]])
                bias_r = rb[2 * hidden:]
        xw = e.op("MatMul", [x, e.const(w[d].T.astype(np.float32), "W_T")], "xw")  # [seq, batch, gates * hidden]
        xw = e.op("Add", [xw, e.const(in_bias.astype(np.float32), "bias")], "xw_b")
        h0 = c0 = None
        state_axis = 1 if layout else 0  # initial states are [directions, batch, hidden], [batch, ...] in layout 1
        if inputs[5]:
            h0 = e.op("Gather", [inputs[5], e.const(np.int64(d), "dir")], "h0", axis=state_axis)
        if op == "LSTM" and inputs[6]:
            c0 = e.op("Gather", [inputs[6], e.const(np.int64(d), "dir")], "c0", axis=state_axis)
        reverse = direction == "reverse" or d == 1
        steps, last_h, last_c = _direction(e, node, xw, r[d], bias_r, None if peep is None else peep[d].reshape(3, -1),
                                           h0, c0, acts[d * per_direction:(d + 1) * per_direction], seq, reverse,
                                           hidden)
        if outputs[0]:
            axes = e.const(np.array([0, 1], np.int64), "axes")
            ys.append(e.op("Concat", [e.op("Unsqueeze", [s, axes], "y_t") for s in steps], "y_dir", axis=0))
        hs.append(e.op("Unsqueeze", [last_h, e.const(np.array([0], np.int64), "axis")], "h_dir"))
        if last_c is not None:
            cs.append(e.op("Unsqueeze", [last_c, e.const(np.array([0], np.int64), "axis")], "c_dir"))

    def finish(parts: list[str], axis: int, out: str, perm: list[int], what: str) -> None:
        if not out:
            return
        joined = parts[0] if len(parts) == 1 else e.op("Concat", parts, what, axis=axis)
        if layout:
            e.op("Transpose", [joined], what, out=out, perm=perm)
        else:
            e.op("Identity", [joined], what, out=out)

    finish(ys, 1, outputs[0], [2, 0, 1, 3], "Y")
    finish(hs, 0, outputs[1], [1, 0, 2], "Y_h")
    if op == "LSTM":
        finish(cs, 0, outputs[2], [1, 0, 2], "Y_c")


def unroll_recurrent(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each LSTM, GRU and RNN node over a static sequence length unrolled; returns it and
    how many were. Raises SpcError naming the node and the reason for one that cannot be."""
    nodes = [n for n in model.graph.node if n.op_type in GATES and n.domain in ("", "ai.onnx")]
    if not nodes:
        return model, 0
    from .fold import known_dims

    dims = known_dims(model)
    constants = constant_values(model, [name for node in nodes for name in node.input[1:]])
    taken = taken_names(model)
    emitters = {}
    for node in nodes:
        x_dims = dims.get(node.input[0])
        seq = None if x_dims is None else x_dims[1 if node_attr(node, "layout", 0) else 0]
        reason = why_not_unrolled(node, seq, constants)
        if reason:
            raise SpcError(f"cannot compile node {node.name or node.op_type!r}: op {node.op_type} is unrolled for "
                           f"TVM (which has no {node.op_type}), but {reason}")
        emitters[id(node)] = Emitter(node, taken)
        _unroll(emitters[id(node)], node, seq, constants)
    return replaced(model, emitters), len(nodes)
