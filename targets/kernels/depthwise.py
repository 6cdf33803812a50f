"""``depthwise_conv2d``: NCHW depthwise convolution (one input channel per output channel), one channel per task:
its plane copied once into a zero-padded buffer (columns split by stride phase), then each output vector is the
weighted sum of the kernel's contiguous shifted views of it, with the bias and activation fused. TVM's legalized
grouped convolution runs the window element by element: on torchvision's MobileNetV2 (17 depthwise layers) it was
70% of the model's time and the model ran 3.1x slower than ONNX Runtime."""

from __future__ import annotations

import numpy as np

from .source import Clip, CpuKernelParams, Kernel, _ceil, _epilogue, _loop, _parse, _Src


def depthwise_conv2d(name: str, c: int, h: int, w: int, weight: np.ndarray, stride: tuple[int, int],
                     pads: tuple[int, int, int, int], dilation: tuple[int, int], bias: np.ndarray | None,
                     act: str | Clip | None, params: CpuKernelParams, n_static: int | None = None) -> Kernel:
    """Y[n, c, oh, ow] = sum W[c, 0, i, j] X[n, c, oh * sh - pt + i * dh, ow * sw - pl + j * dw] (+ bias) (act);
    ``weight`` is [C, 1, KH, KW] (pads: top, left, bottom, right)."""
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = stride, pads, dilation
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    # the zero-padded input plane, its columns split by phase (column q of the padded row at q // sw of part
    # q % sw): every tap then reads a contiguous view, also at stride 2
    part = _ceil(max(pl + w + pr, (ow - 1) * sw + (kw - 1) * dw + 1), sw)
    width = sw * part
    rows = max(pt + h + pb, (oh - 1) * sh + (kh - 1) * dh + 1)
    plane = rows * width
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    args = ["x: T.handle", "k: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a.signature(name, args, ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {c}, {h}, {w}), "float32")')
    a(1, f'K = T.match_buffer(k, ({c}, {kh * kw}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({c},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {c}, {oh}, {ow}), "float32")')
    # one plane per channel, filled and read by that channel's task only (a small buffer per task, on the stack,
    # ran stride-1 layers up to 3x slower)
    a(1, f'P = T.alloc_buffer(({c * plane},), "float32")')
    a(1, f"for image in range({n}):")
    a(2, f"for channel in {_loop(c * oh * ow * kh * kw)}({c}):")
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
    zeros(3, str((pt + h) * width), (rows - pt - h) * width)
    a(3, f"for row in range({oh}):")
    lanes = params.lanes

    def tap(i: int, j: int, offset: str) -> str:
        col = j * dw
        return f"P[{base} + (row * {sh} + {i * dh}) * {width} + {(col % sw) * part + col // sw} + {offset} + v]"

    def store(ind: int, offset: str, count: int) -> None:
        terms = [f"K[channel, {i * kw + j}] * {tap(i, j, offset)}" for i in range(kh) for j in range(kw)]
        value = _epilogue(" + ".join(terms), "B[channel]" if bias is not None else None, act)
        a(ind, f"for v in T.vectorized({count}):")
        a(ind + 1, f"Y[image, channel, row, {offset} + v] = {value}")

    if ow >= lanes:  # whole vectors, then the tail in power-of-two pieces (LLVM splits other widths badly)
        a(4, f"for o in range({ow // lanes}):")
        store(5, f"o * {lanes}", lanes)
    done = ow - ow % lanes
    while done < ow:
        piece = 1 << ((ow - done).bit_length() - 1)
        store(4, str(done), piece)
        done += piece
    src = a.text()
    consts = [np.ascontiguousarray(weight.reshape(c, kh * kw), dtype=np.float32)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(c))
    return Kernel(name, _parse(src, name), consts, src)
