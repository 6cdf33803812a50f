"""``dense_matmul``: Y[m, n] = X[m, k] @ W[k, n] (+ bias, relu) with a constant W packed to [N/NR, K, NR]; rows
of X are broadcast, packed weight panels are vector loads. m may be symbolic."""

from __future__ import annotations

import numpy as np

from .source import CpuKernelParams, Kernel, _ceil, _choose_mr, _epilogue, _loop, _parse, _spill, _Src, _tile_accumulate


def pack_dense_weight(w_kn: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> [ceil(N/nr), K, nr], zero padded."""
    k, n = w_kn.shape
    np_ = _ceil(n, nr)
    padded = np.zeros((k, np_ * nr), dtype=np.float32)
    padded[:, :n] = w_kn
    return np.ascontiguousarray(padded.reshape(k, np_, nr).transpose(1, 0, 2))


def _row_tiles(
    a: _Src,
    ind: int,
    *,
    m: str,
    m_static: int | None,
    mr: int,
    tile: str,
    emit_tile,
) -> None:
    """Dispatch tile index ``tile`` (0 .. ceil(m/mr)-1): full tiles of mr rows, the last one split into 4s and 1s.

    ``emit_tile(ind, rows, row0)`` writes one micro-kernel for ``rows`` rows starting at the row expression row0.
    """
    if m_static is not None and m_static % mr == 0:
        emit_tile(ind, mr, f"{tile} * {mr}")
        return
    if m_static is not None and m_static < mr:
        tail = m_static
        a(ind, "if True:")
    else:
        a(ind, f"if {tile} < {m} // {mr}:")
        emit_tile(ind + 1, mr, f"{tile} * {mr}")
        a(ind, "else:")
        tail = None
    base = f"{m} // {mr} * {mr}"
    if tail is not None:  # static tail, fully known
        row = 0
        for rows in (4, 1):
            while tail - row >= rows and (rows == 1 or mr > 4):
                emit_tile(ind + 1, rows, f"{base} + {row}")
                row += rows
        return
    rest = f"({m} - {base})"
    if mr > 4:
        a(ind + 1, f"for q in range({rest} // 4):")
        emit_tile(ind + 2, 4, f"{base} + q * 4")
        a(ind + 1, f"for q in range({rest} % 4):")
        emit_tile(ind + 2, 1, f"{base} + {rest} // 4 * 4 + q")
    else:
        a(ind + 1, f"for q in range({rest}):")
        emit_tile(ind + 2, 1, f"{base} + q")


def dense_matmul(
    name: str,
    w_kn: np.ndarray,
    bias: np.ndarray | None,
    act: str | None,
    params: CpuKernelParams,
    m_static: int | None = None,
    channels_first: int | None = None,
) -> Kernel:
    """Y[m, N] = X[m, K] @ W[K, N] (+ bias) (relu). m is symbolic unless m_static is given.

    ``channels_first`` = P reads X as [m / P, K, P] and writes Y as [m / P, N, P]: a 1x1 convolution of NCHW
    images of P pixels, vectorised over output channels (row m is pixel m % P of image m // P), for small maps
    whose pixel count fills vectors badly (``conv2d`` vectorises over pixels)."""
    k_dim, n_dim = (int(d) for d in w_kn.shape)
    nr, ku = params.nr, params.ku
    mr = _choose_mr(params, channels_first or m_static)  # channels_first: tiles of one image's pixels
    np_ = _ceil(n_dim, nr)
    full_panels = n_dim // nr
    m = "m" if m_static is None else str(m_static)
    mt = f"(({m} + {mr - 1}) // {mr})"
    a = _Src()
    args = ["x: T.handle", "w: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    if channels_first:  # symbolic: the number of images
        px = channels_first
        a.signature(name, args, ("n_images",) if m_static is None else ())
        images = "n_images" if m_static is None else str(m_static // px)
        a(1, f'X = T.match_buffer(x, ({images}, {k_dim}, {px}), "float32")')
    else:
        a.signature(name, args, ("m",) if m_static is None else ())
        a(1, f'X = T.match_buffer(x, ({m}, {k_dim}), "float32")')
    a(1, f'W = T.match_buffer(w, ({np_}, {k_dim}, {nr}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({n_dim},), "float32")')
    if channels_first:
        a(1, f'Y = T.match_buffer(y, ({images}, {n_dim}, {px}), "float32")')
    else:
        a(1, f'Y = T.match_buffer(y, ({m}, {n_dim}), "float32")')

    def x_at(row: str, k: str) -> str:
        return f"X[{image}, {k}, {row}]" if channels_first else f"X[{row}, {k}]"

    def y_at(row: str, col: str) -> str:
        return f"Y[{image}, {col}, {row}]" if channels_first else f"Y[{row}, {col}]"

    ind, rows_static, image, t = 1, m_static, "image", "t"
    if channels_first:  # tiles of pixels within each image
        m, rows_static = str(px), px
        mt = f"(({m} + {mr - 1}) // {mr})"
    tasks = f"{np_} * {mt}"
    work = rows_static * k_dim * n_dim if rows_static is not None else None
    if channels_first and m_static is None:  # a symbolic batch: images one after another, each parallel if it pays
        a(1, f"for image in range({images}):")
        ind = 2
    elif channels_first:  # one parallel loop over (image, tile) by the whole batch's work: a layer pruned under the
        # threshold per image left a batch of 8 on one thread (MobileNetV2's pruned projections ran slower than dense)
        work *= m_static // px
        image, t = f"(t // ({tasks}))", f"(t % ({tasks}))"
        tasks = f"{images} * {tasks}"
    a(ind, f"for t in {_loop(work)}({tasks}):")
    panel = f"({t} // {mt})"
    tile = f"({t} % {mt})"

    rest = n_dim - full_panels * nr  # columns of the last, partial panel
    # its tile computes only the vectors it needs (a power of two of them: LLVM scalarises odd vector widths), so
    # 48 columns cost 32 + 16, not 64: a 1x1 pruned from 64 to 48 outputs ran no faster before
    narrow = params.lanes
    while narrow < rest:
        narrow *= 2

    def emit_tile(ind: int, rows: int, row0: str) -> None:
        if not rest:
            tile_of(ind, rows, row0, nr, nr)
        elif not full_panels:
            tile_of(ind, rows, row0, narrow, rest)
        else:
            a(ind, f"if {panel} < {full_panels}:")
            tile_of(ind + 1, rows, row0, nr, nr)
            a(ind, "else:")
            tile_of(ind + 1, rows, row0, narrow, rest)

    def tile_of(ind: int, rows: int, row0: str, width: int, stored: int) -> None:
        """A tile of ``width`` lanes, of which the first ``stored`` columns are written."""
        acc = _tile_accumulate(
            a,
            ind,
            rows=rows,
            width=width,
            k_extent=str(k_dim),
            k_static=k_dim,
            ku=ku,
            bcast=lambda i, k: x_at(f"{row0} + {i}", k),
            vload=lambda k, v: f"W[{panel}, {k}, {v}]",
        )
        for i in range(rows):
            col = f"{panel} * {nr} + v"
            if stored == width:
                val = _epilogue(f"{acc}{i}[v]", f"B[{col}]" if bias is not None else None, act)
                a(ind, f"for v in T.vectorized({width}):")
                a(ind + 1, f"{y_at(f'{row0} + {i}', col)} = {val}")
            else:
                scratch = _spill(a, ind, f"{acc}{i}", width)
                val = _epilogue(f"{scratch}[v]", f"B[{col}]" if bias is not None else None, act)
                a(ind, f"for v in range({stored}):")
                a(ind + 1, f"{y_at(f'{row0} + {i}', col)} = {val}")

    _row_tiles(a, ind + 1, m=m, m_static=rows_static, mr=mr, tile=tile, emit_tile=emit_tile)
    src = a.text()
    consts = [pack_dense_weight(w_kn, nr)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(n_dim))
    return Kernel(name, _parse(src, name), consts, src)
