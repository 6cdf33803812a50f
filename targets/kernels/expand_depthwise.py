"""``expand_depthwise``: a 1x1 convolution and the depthwise convolution after it (MobileNet's inverted residual:
expand -> depthwise) in one kernel, so the expanded feature map never goes to memory.

Apart, the 1x1 conv writes its wide output (MobileNetV2's second block: 96 x 112 x 112, 4.8 MB per image, more than
L2) and the depthwise conv reads it back; both were bound by that traffic. Here the output channels go in groups of
``g`` (at most the target's micro-tile height ``mr``): the 1x1 conv fills the group's zero-padded, phase-split
planes (``depthwise.Planes``, one workspace of ``g`` planes that stays in cache), register-blocked over the group's
channels and two vectors of pixels, with its bias and activation applied and, at stride 2, the even and odd columns
separated by vector shuffles; then the depthwise taps read the planes (``depthwise.emit_depthwise_rows``). Pruning
the expanded channels removes work from both halves in proportion.
"""

from __future__ import annotations

import numpy as np

from .depthwise import Planes, emit_depthwise_rows, pieces
from .source import (
    Clip,
    CpuKernelParams,
    Kernel,
    _epilogue,
    _loop,
    _parse,
    _Src,
    _tile_accumulate,
)


def group_size(c: int, params: CpuKernelParams) -> int:
    """Channels per group: the largest divisor of ``c`` up to ``mr`` (no tail group)."""
    return max(d for d in range(1, min(c, params.mr) + 1) if c % d == 0)


def expand_depthwise(name: str, c_in: int, c: int, h: int, w: int, expand_weight: np.ndarray,
                     expand_bias: np.ndarray | None, expand_act: str | Clip | None, weight: np.ndarray,
                     stride: tuple[int, int], pads: tuple[int, int, int, int], dilation: tuple[int, int],
                     bias: np.ndarray | None, act: str | Clip | None, params: CpuKernelParams,
                     n_static: int | None = None) -> Kernel:
    """Y = depthwise(act_e(We @ X + be)) (+ bias) (act): X [N, Ci, H, W], ``expand_weight`` [C, Ci],
    ``weight`` [C, 1, KH, KW]; strides 1 and 2 (pads: top, left, bottom, right)."""
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    geo = Planes(h, w, kh, kw, tuple(stride), tuple(pads), tuple(dilation))
    sw = geo.stride[1]
    if sw not in (1, 2):
        raise ValueError(f"expand_depthwise: column stride {sw} (1 or 2 only)")
    g = group_size(c, params)
    lanes = params.lanes
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    args = ["x: T.handle", "we: T.handle"] + (["be: T.handle"] if expand_bias is not None else [])
    args += ["k: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a.signature(name, args, ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {c_in}, {h}, {w}), "float32")')
    a(1, f'WE = T.match_buffer(we, ({c // g}, {c_in}, {g}), "float32")')
    if expand_bias is not None:
        a(1, f'BE = T.match_buffer(be, ({c},), "float32")')
    a(1, f'K = T.match_buffer(k, ({c}, {kh * kw}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({c},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {c}, {geo.oh}, {geo.ow}), "float32")')
    # the group's planes: zeroed once (the 1x1 conv writes only the image positions, never the padding)
    a(1, f'P = T.alloc_buffer(({g * geo.size},), "float32")')
    total = g * geo.size
    a(1, f"for o in range({total // lanes}):")
    a(2, f"for v in T.vectorized({lanes}):")
    a(3, f"P[o * {lanes} + v] = T.float32(0)")
    if total % lanes:
        a(1, f"for v in range({total % lanes}):")
        a(2, f"P[{total - total % lanes} + v] = T.float32(0)")
    a(1, f"for image in range({n}):")
    a(2, f"for grp in range({c // g}):")
    # parallel (rows, then the group's channels) by the whole kernel's work: per group two launches, each thread
    # writing its rows of the planes that stay in cache (a parallel loop over groups, each with planes of its own,
    # ran 1.5x slower on one thread: the planes of every group went to memory)
    loop = _loop(c * c_in * h * w + c * geo.oh * geo.ow * kh * kw)
    a(3, f"for r in {loop}({h}):")
    chunk = 2 * lanes
    full = w // chunk
    if full:  # whole chunks: one loop
        _expand_piece(a, 4, geo, g, c_in, "xo * " + str(chunk), chunk, expand_bias is not None, expand_act, params,
                      loop=("xo", full))
    for x0, size in pieces(w, chunk)[full:]:
        _expand_piece(a, 4, geo, g, c_in, str(x0), size, expand_bias is not None, expand_act, params)
    a(3, f"for j in {loop}({g}):")
    emit_depthwise_rows(a, 4, geo, f"j * {geo.size}", f"grp * {g} + j", f"Y[image, grp * {g} + j, ",
                        bias is not None, act, params)
    src = a.text()
    packed = np.ascontiguousarray(
        expand_weight.astype(np.float32).reshape(c // g, g, c_in).transpose(0, 2, 1))
    consts = [packed]
    if expand_bias is not None:
        consts.append(np.ascontiguousarray(expand_bias, dtype=np.float32).reshape(c))
    consts.append(np.ascontiguousarray(weight.reshape(c, kh * kw), dtype=np.float32))
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(c))
    return Kernel(name, _parse(src, name), consts, src)


def _expand_piece(a: _Src, ind: int, geo: Planes, g: int, c_in: int, x0: str, size: int, bias: bool,
                  act: str | Clip | None, params: CpuKernelParams, loop: tuple[str, int] | None = None) -> None:
    """The group's 1x1 outputs for image row ``r``, columns x0 .. x0 + size, into the planes; at stride 2 the even
    and odd columns of the piece go to their two phases (x0 is even except for a last piece of one column)."""
    if loop is not None:
        a(ind, f"for {loop[0]} in range({loop[1]}):")
        ind += 1
    acc = _tile_accumulate(a, ind, rows=g, width=size, k_extent=str(c_in), k_static=c_in, ku=params.ku,
                           bcast=lambda i, k: f"WE[grp, {k}, {i}]",
                           vload=lambda k, v: f"X[image, {k}, r, {x0} + {v}]")
    row = f"(r + {geo.pads[0]}) * {geo.width}"
    pl, sw = geo.pads[1], geo.stride[1]
    for i in range(g):
        value = _epilogue(f"{acc}{i}[v]", f"BE[grp * {g} + {i}]" if bias else None, act)
        plane = f"{i * geo.size} + {row}"
        if sw == 1:
            a(ind, f"for v in T.vectorized({size}):")
            a(ind + 1, f"P[{plane} + {geo.column(pl)} + {x0} + v] = {value}")
            continue
        a(ind, f"for v in T.vectorized({size}):")
        a(ind + 1, f"{acc}{i}[v] = {value}")
        # lane t is padded column q = pl + x0 + t: even lanes one phase, odd lanes the other, each contiguous
        for first in (0, 1) if size > 1 else (0,):
            lanes = list(range(first, size, 2))
            start = f"((({pl + first} + {x0}) % 2) * {geo.part} + ({pl + first} + {x0}) // 2)"
            if len(lanes) == 1:
                a(ind, f"P[{plane} + {start}] = {acc}{i}[{first}]")
            else:
                a(ind, f"P[T.ramp({plane} + {start}, 1, {len(lanes)})] = "
                       f"T.Shuffle([{acc}{i}[T.ramp(0, 1, {size})]], {lanes})")
