"""LSTM, GRU and RNN: the hidden size is prunable as a whole unit across gates.

Hidden unit ``h`` owns row ``h`` of every gate block in W and R (rows ``g*H + h``), column ``h`` of R, its biases
and peepholes, and position ``h`` of every hidden-state tensor. A virtual "hidden" dim ties them, and
``hidden_size`` follows the kept count. The input size is tied to W's last axis like a matmul.
"""

from __future__ import annotations

import numpy as np

from .base import ROLE_BIAS, ROLE_WEIGHT, couples, updates


@couples("LSTM", "GRU", "RNN")
def recurrent(ctx):
    names = ctx.inputs + [""] * 8
    x, w, r, b, _seq_lens, h0 = names[:6]
    c0 = names[6] if ctx.op == "LSTM" else ""
    peep = names[7] if ctx.op == "LSTM" else ""
    hidden = int(ctx.attr("hidden_size"))
    layout = int(ctx.attr("layout", 0))
    virtual = ctx.virtual("hidden", hidden)
    for name in (w, r, b, peep):
        if name:
            ctx.tie_keys(ctx.key(name, 1), virtual, np.arange(ctx.shape(name)[1]) % hidden)
    ctx.tie_keys(ctx.key(r, 2), virtual)
    ctx.tie(x, 2, w, 2)
    ctx.role(w, ROLE_WEIGHT)
    ctx.role(r, ROLE_WEIGHT)
    ctx.role(b, ROLE_BIAS)
    seq_axis, batch_axis = (1, 0) if layout else (0, 1)
    outs = ctx.outputs + [""] * 3
    y, y_h, y_c = outs[:3]
    if y:
        ctx.tie_keys(ctx.key(y, 3), virtual)
        ctx.tie(x, seq_axis, y, seq_axis)
        ctx.tie(x, batch_axis, y, 0 if layout else 2)
    for state in (y_h, y_c, h0, c0):
        if state:
            ctx.tie_keys(ctx.key(state, 2), virtual)
            ctx.tie(x, batch_axis, state, 0 if layout else 1)


@updates("LSTM", "GRU", "RNN")
def recurrent_hidden_size(edit):
    edit.set_attr("hidden_size", edit.virtual_size("hidden"))
