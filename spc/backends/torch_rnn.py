"""ONNX LSTM as a torch function: the cell unrolled over time, so gradients reach W, R and B directly.

ONNX packs the gates as i, o, f, c (torch uses i, f, g, o) and keeps separate input and recurrent biases; writing the
cell out keeps the ONNX weights as they are, so ``to_onnx()`` needs no repacking. Peepholes, clipping, custom
activations and per-sequence lengths are refused (exporters of ``nn.LSTM`` emit none of them).
"""

from __future__ import annotations

import torch

from .torch_ops import Unsupported


def _check(a, lengths, peepholes):
    if lengths is not None or peepholes is not None:
        raise Unsupported("sequence_lens or peepholes on LSTM")
    if a.get("clip") is not None or a.get("input_forget", 0):
        raise Unsupported("clip or input_forget on LSTM")
    if a.get("activations", ["Sigmoid", "Tanh", "Tanh"] * 2)[:3] != ["Sigmoid", "Tanh", "Tanh"]:
        raise Unsupported(f"LSTM activations {a['activations']}")


def _direction(x, w, r, b, h, c, reverse: bool):
    """One direction over x [seq, batch, in]; returns the outputs [seq, batch, hidden] and the last h, c."""
    hidden = r.shape[-1]
    bias = b[:4 * hidden] + b[4 * hidden:] if b is not None else 0
    projected = torch.matmul(x, w.t()) + bias  # input contributions for every step at once
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in steps:
        i, o, f, g = (projected[t] + h @ r.t()).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs), h, c


def lstm(a, x, w, r, b=None, lengths=None, h0=None, c0=None, peepholes=None):
    _check(a, lengths, peepholes)
    batch_first = a.get("layout", 0) == 1
    x = x.transpose(0, 1) if batch_first else x
    dirs, hidden = w.shape[0], r.shape[-1]
    zeros = x.new_zeros(dirs, x.shape[1], hidden)
    h0, c0 = (zeros if h0 is None else (h0.transpose(0, 1) if batch_first else h0)), (
        zeros if c0 is None else (c0.transpose(0, 1) if batch_first else c0))
    reverse = [a.get("direction", "forward") == "reverse"] if dirs == 1 else [False, True]
    ys, hs, cs = zip(*(_direction(x, w[d], r[d], None if b is None else b[d], h0[d], c0[d], reverse[d])
                       for d in range(dirs)))
    y, h, c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)  # [seq, dirs, batch, hidden], [dirs, batch, h]
    if batch_first:
        return y.permute(2, 0, 1, 3), h.transpose(0, 1), c.transpose(0, 1)
    return y, h, c


RECURRENT = {"LSTM": lstm}
