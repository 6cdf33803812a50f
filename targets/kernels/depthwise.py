"""``depthwise_conv2d``: NCHW depthwise convolution (one input channel per output channel), one channel per task:
its plane copied once into a zero-padded buffer (columns split by stride phase), then each output vector is the
weighted sum of the kernel's contiguous shifted views of it, with the bias and activation fused. TVM's legalized
grouped convolution runs the window element by element: on torchvision's MobileNetV2 (17 depthwise layers) it was
70% of the model's time and the model ran 3.1x slower than ONNX Runtime.

``Planes`` (the padded, phase-split plane layout) and ``emit_depthwise_rows`` (the taps read from it) are shared
with ``expand_depthwise.py``, which fills the planes from a 1x1 convolution instead of a copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .source import Clip, CpuKernelParams, Kernel, _ceil, _epilogue, _loop, _parse, _Src


@dataclass(frozen=True)
class Planes:
    """Zero-padded input planes of a depthwise convolution, columns split by stride phase: padded column q lives at
    ``(q % sw) * part + q // sw`` of its row, so every tap of a stride-2 window reads a contiguous view."""

    h: int
    w: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]

    @property
    def oh(self) -> int:
        return (self.h + self.pads[0] + self.pads[2] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.w + self.pads[1] + self.pads[3] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def part(self) -> int:  # columns of one phase
        sw, dw = self.stride[1], self.dilation[1]
        return _ceil(max(self.pads[1] + self.w + self.pads[3], (self.ow - 1) * sw + (self.kw - 1) * dw + 1), sw)

    @property
    def width(self) -> int:
        return self.stride[1] * self.part

    @property
    def rows(self) -> int:
        sh, dh = self.stride[0], self.dilation[0]
        return max(self.pads[0] + self.h + self.pads[2], (self.oh - 1) * sh + (self.kh - 1) * dh + 1)

    @property
    def size(self) -> int:
        return self.rows * self.width

    def column(self, q: int) -> int:
        """Where padded column ``q`` of a row lives."""
        sw = self.stride[1]
        return (q % sw) * self.part + q // sw


def emit_depthwise_rows(a: _Src, ind: int, g: Planes, plane: str, channel: str, out: str, bias: bool,
                        act: str | Clip | None, params: CpuKernelParams) -> None:
    """Output rows of one channel: ``out[row, col]`` (``out`` indexes a buffer by its last two axes) from the
    planes at offset ``plane``, kernel ``K[channel, tap]``, bias ``B[channel]``; whole vectors, then the tail in
    power-of-two pieces (LLVM splits other widths badly)."""
    sh, sw = g.stride
    dh, dw = g.dilation
    lanes = params.lanes
    a(ind, f"for row in range({g.oh}):")

    def tap(i: int, j: int, offset: str) -> str:
        col = j * dw
        return f"P[{plane} + (row * {sh} + {i * dh}) * {g.width} + {(col % sw) * g.part + col // sw} + {offset} + v]"

    def store(ind2: int, offset: str, count: int) -> None:
        terms = [f"K[{channel}, {i * g.kw + j}] * {tap(i, j, offset)}" for i in range(g.kh) for j in range(g.kw)]
        value = _epilogue(" + ".join(terms), f"B[{channel}]" if bias else None, act)
        a(ind2, f"for v in T.vectorized({count}):")
        a(ind2 + 1, f"{out}row, {offset} + v] = {value}")

    if g.ow >= lanes:
        a(ind + 1, f"for o in range({g.ow // lanes}):")
        store(ind + 2, f"o * {lanes}", lanes)
    done = g.ow - g.ow % lanes
    while done < g.ow:
        piece = 1 << ((g.ow - done).bit_length() - 1)
        store(ind + 1, str(done), piece)
        done += piece


def depthwise_conv2d(name: str, c: int, h: int, w: int, weight: np.ndarray, stride: tuple[int, int],
                     pads: tuple[int, int, int, int], dilation: tuple[int, int], bias: np.ndarray | None,
                     act: str | Clip | None, params: CpuKernelParams, n_static: int | None = None) -> Kernel:
    """Y[n, c, oh, ow] = sum W[c, 0, i, j] X[n, c, oh * sh - pt + i * dh, ow * sw - pl + j * dw] (+ bias) (act);
    ``weight`` is [C, 1, KH, KW] (pads: top, left, bottom, right)."""
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    g = Planes(h, w, kh, kw, tuple(stride), tuple(pads), tuple(dilation))
    sw = g.stride[1]
    pt, pl = g.pads[0], g.pads[1]
    width, part, plane = g.width, g.part, g.size
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    args = ["x: T.handle", "k: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a.signature(name, args, ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {c}, {h}, {w}), "float32")')
    a(1, f'K = T.match_buffer(k, ({c}, {kh * kw}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({c},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {c}, {g.oh}, {g.ow}), "float32")')
    # one plane per channel, filled and read by that channel's task only (a small buffer per task, on the stack,
    # ran stride-1 layers up to 3x slower)
    a(1, f'P = T.alloc_buffer(({c * plane},), "float32")')
    a(1, f"for image in range({n}):")
    a(2, f"for channel in {_loop(c * g.oh * g.ow * kh * kw)}({c}):")
    base = f"channel * {plane}"

    def zeros(ind: int, start: str, count: int) -> None:
        if count > 0:
            a(ind, f"for v in T.vectorized({count}):")
            a(ind + 1, f"P[{base} + {start} + v] = T.float32(0)")

    zeros(3, "0", pt * width)
    a(3, f"for r in range({h}):")
    row_start = f"(r + {pt}) * {width}"
    for phase in range(sw):
        # padded columns q = k * sw + phase inside the image: pl <= q < pl + w
        lo = _ceil(max(pl - phase, 0), sw)
        hi = max(lo, _ceil(pl + w - phase, sw))
        zeros(4, f"{row_start} + {phase * part}", lo)
        if hi > lo:
            a(4, f"for v in T.vectorized({hi - lo}):")
            a(5, f"P[{base} + {row_start} + {phase * part + lo} + v] = "
                 f"X[image, channel, r, (v + {lo}) * {sw} + {phase - pl}]")
        zeros(4, f"{row_start} + {phase * part + hi}", part - hi)
    zeros(3, str((pt + h) * width), (g.rows - pt - h) * width)
    emit_depthwise_rows(a, 3, g, base, "channel", "Y[image, channel, ", bias is not None, act, params)
    src = a.text()
    consts = [np.ascontiguousarray(weight.reshape(c, kh * kw), dtype=np.float32)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(c))
    return Kernel(name, _parse(src, name), consts, src)
