"""``conv2d``: NCHW convolution (OIHW weights, groups == 1) as W[co, (ci, kh, kw)] @ im2col[(ci, kh, kw), pixels]
per image, dense (packed W broadcast) or BSR (blocks broadcast), vectorised over output pixels; or, where it costs
less, over shifted views of padded planes (conv_planes.py), vectorised over output channels (conv_channels.py), or
by Winograd's F(4x4, 3x3) or F(2x2, 3x3) (conv_winograd.py, dense 3x3 at stride 1 or 2)."""

from __future__ import annotations

import numpy as np

from .bsr import BSR, SCALED_INDICES, _bsr_accumulate, scaled_indices
from .conv_layout import ConvGeom, _bsr_conv_chunk, _conv_head, _conv_tile, _images_per_launch, pack_conv_weight
from .conv_channels import _conv2d_channel_vectors, channel_buffer_bytes, channel_vectors_pay
from .conv_planes import _conv2d_shifted, _shifted_planes
from . import conv_winograd
from .conv_winograd import _conv2d_winograd, winograd_buffer_bytes
from .source import (
    CpuKernelParams, Kernel, _ceil, _choose_mr, _copy_loop, _epilogue, _loop, _parse, _spill, _Src, _tile_accumulate,
)


def _im2col(a: _Src, g: ConvGeom, tile: int, images: int, ind: int = 2, flat: bool = False) -> None:
    """XC[slot, k, p] for the ``images`` images of chunk ``nc`` (image ``nc * images + slot``), pixels padded to a
    multiple of ``tile`` with zeros; one parallel loop over (image, input channel).

    The valid output-column range of each kernel column is computed here (static geometry), so the copy loops have
    no per-element bounds checks (contiguous, vectorisable copies for stride 1)."""
    pp = _ceil(g.pixels, tile) * tile
    loop = _copy_loop(images * g.k * pp)

    def xc(k: str, p: str) -> str:
        return f"XC[{slot} * {g.k * pp} + ({k}) * {pp} + {p}]" if flat else f"XC[{slot}, {k}, {p}]"
    sh, sw = g.stride
    dh, dw = g.dilation
    pt, pl = g.pad[0], g.pad[1]
    if images > 1:
        a(ind, f"for q in {loop}({images * g.c_in}):")
        slot, ci, n = f"(q // {g.c_in})", f"(q % {g.c_in})", f"(nc * {images} + q // {g.c_in})"
    else:
        a(ind, f"for ci in {loop}({g.c_in}):")
        slot, ci, n = "0", "ci", "nc"
    a(ind + 1, f"for khi in range({g.kh}):")
    for kwi in range(g.kw):
        off = kwi * dw - pl  # iw = ow * sw + off
        lo = max(0, -(off // sw) if off < 0 else 0)
        while lo * sw + off < 0:
            lo += 1
        hi = g.ow
        while hi > lo and (hi - 1) * sw + off > g.w - 1:
            hi -= 1
        hi = max(hi, lo)
        kk = f"{ci} * {g.kh * g.kw} + khi * {g.kw} + {kwi}"
        ih = f"oh * {sh} + khi * {dh} - {pt}"
        a(ind + 2, f"for oh in range({g.oh}):")
        a(ind + 3, f"if {ih} >= 0 and {ih} < {g.h}:")
        if lo > 0:
            a(ind + 4, f"for ow in range({lo}):")
            a(ind + 5, f"{xc(kk, f'oh * {g.ow} + ow')} = T.float32(0)")
        if hi > lo:
            a(ind + 4, f"for ow in range({hi - lo}):")
            a(ind + 5, f"{xc(kk, f'oh * {g.ow} + {lo} + ow')} = X[{n}, {ci}, {ih}, (ow + {lo}) * {sw} + {off}]")
        if hi < g.ow:
            a(ind + 4, f"for ow in range({g.ow - hi}):")
            a(ind + 5, f"{xc(kk, f'oh * {g.ow} + {hi} + ow')} = T.float32(0)")
        a(ind + 3, "else:")
        a(ind + 4, f"for ow in range({g.ow}):")
        a(ind + 5, f"{xc(kk, f'oh * {g.ow} + ow')} = T.float32(0)")
        if pp > g.pixels:
            a(ind + 2, f"for q2 in range({pp - g.pixels}):")
            a(ind + 3, f"{xc(kk, f'{g.pixels} + q2')} = T.float32(0)")


def conv2d_takes_flat_input(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None) -> bool:
    return g.direct and g.pixels % _conv_tile(g, params, block) == 0


def _form(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None) -> tuple[object, bool]:
    """(the pixel-vector form's shifted planes, or None for im2col; whether the dense channel-vector form runs
    instead): one choice for both the kernel and its buffers."""
    planes = _shifted_planes(g, params, block)
    return planes, block is None and channel_vectors_pay(g, planes, params)


def _winograd(g: ConvGeom, params: CpuKernelParams, allowed: bool):
    """The Winograd algorithm a dense layer runs by (conv_winograd.choose_algorithm), None for the other forms."""
    return conv_winograd.choose_algorithm(g, params)[0] if allowed else None


def conv_buffer_bytes(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None,
                      winograd: bool = True) -> int:
    """Bytes of the per-image buffers a convolution fills before or after its product: the padded planes (and, with
    pixel vectors, the output with its extra columns), the im2col matrix, Winograd's transposed planes and
    transformed operands, or nothing (1x1 on whole tiles)."""
    algorithm = _winograd(g, params, winograd) if block is None else None
    if algorithm is not None:
        return winograd_buffer_bytes(g, params, algorithm)
    planes, channel_vectors = _form(g, params, block)
    if channel_vectors:
        return channel_buffer_bytes(g)
    if planes is not None:
        return planes.buffer_bytes(g)
    if conv2d_takes_flat_input(g, params, block):
        return 0
    tile = _conv_tile(g, params, block)
    return 4 * g.k * _ceil(g.pixels, tile) * tile


def bsr_extra_copy(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int]) -> int:
    """Elements per image that the BSR form copies beyond the direct dense forms: an im2col matrix (K x pixels)
    where those read planes (small maps), the output's compaction; what ``cost.estimate(copy_elements=)`` charges."""
    extra = conv_buffer_bytes(g, params, block) - conv_buffer_bytes(g, params, None, winograd=False)
    return max(extra // 4, 0)


def conv2d(
    name: str,
    g: ConvGeom,
    w_out_in: np.ndarray,
    bias: np.ndarray | None,
    act: str | None,
    params: CpuKernelParams,
    bsr: BSR | None = None,
    n_static: int | None = None,
    winograd: bool = True,
) -> Kernel:
    """Y[n, co, oh * OW + ow] = sum W[co, ci, kh, kw] X[n, ci, ...] (+ bias) (relu); dense if bsr is None.

    The output is flat over pixels ([N, Co, OH*OW]); for a direct (1x1, stride 1, unpadded) convolution whose
    pixel count fills whole tiles the input is flat too ([N, Ci, H*W]), otherwise it is [N, Ci, H, W]. The
    caller reshapes (free in Relax). ``conv2d_takes_flat_input`` says which. The right operand is shifted views
    of padded planes where they cost less than im2col (``_shifted_planes``), else an im2col matrix, or the input
    itself; a dense layer reads the planes vectorised over output channels instead where that costs less
    (conv_channels.py), and a 3x3 one at stride 1 or 2 by Winograd's F(4x4, 3x3) or F(2x2, 3x3) where that costs less
    (conv_winograd.py) unless ``winograd`` is False (every product computed as given, like ONNX Runtime).
    Images go in chunks (all of a static batch when their buffers are small): one parallel
    copy and one parallel product per chunk.
    """
    sparse = bsr is not None
    algorithm = _winograd(g, params, winograd) if not sparse else None
    if algorithm is not None:
        return _conv2d_winograd(name, g, w_out_in, bias, act, params, n_static, algorithm)
    planes, channel_vectors = _form(g, params, bsr.block if sparse else None)
    if channel_vectors:
        return _conv2d_channel_vectors(name, g, w_out_in, bias, act, params, n_static)
    if planes is not None:
        return _conv2d_shifted(name, g, planes, w_out_in, bias, act, params, n_static, bsr)
    tile_w = _conv_tile(g, params, bsr.block if sparse else None)
    if sparse:
        br, bc = bsr.block
        rows = br
        n_row_tiles = _ceil(g.c_out, br)
    else:
        # a narrower pixel tile gets more output rows: the same number of accumulator registers
        rows = min(g.c_out, _choose_mr(params, g.c_out, params.mr * (params.nr // tile_w)))
        n_row_tiles = _ceil(g.c_out, rows)
    p = g.pixels
    n_ptiles = _ceil(p, tile_w)
    pp = n_ptiles * tile_w
    full_ptiles = p // tile_w
    a = _Src()
    use_direct = g.direct and p % tile_w == 0
    images = _images_per_launch(n_static, conv_buffer_bytes(g, params, bsr.block if sparse else None, winograd))
    n = _conv_head(a, name, g, n_static, use_direct, bsr, n_row_tiles, rows, bias is not None)
    flat_xc = sparse and not use_direct and SCALED_INDICES  # BSR reads rows at pre-multiplied offsets
    if not use_direct:
        a(1, f'XC = T.alloc_buffer(({images * g.k * pp if flat_xc else f"{images}, {g.k}, {pp}"},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    if use_direct:

        def vload(k: str, v: str, tile: str) -> str:
            return f"X[{img}, {k}, {tile} * {tile_w} + {v}]"

    else:
        _im2col(a, g, tile_w, images, flat=flat_xc)

        def vload(k: str, v: str, tile: str) -> str:
            if flat_xc:
                return f"XC[{slot} * {g.k * pp} + {k} + {tile} * {tile_w} + {v}]"
            return f"XC[{slot}, {k}, {tile} * {tile_w} + {v}]"

    # pixel-tile major: one pixel tile of XC stays in cache while all output-channel tiles use it
    per_image = n_row_tiles * n_ptiles
    work = images * p * (bsr.nnz * br * bc if sparse else g.c_out * g.k)
    a(2, f"for t in {_loop(work)}({images * per_image}):")
    row_tile = f"(t % {n_row_tiles})"
    if images > 1:
        slot, img = f"(t // {per_image})", f"(nc * {images} + t // {per_image})"
        ptile = f"(t % {per_image} // {n_row_tiles})"
    else:
        slot, img, ptile = "0", "nc", f"(t // {n_row_tiles})"
    if sparse:
        chunk = _bsr_conv_chunk(params, br, tile_w)
        acc, offsets = _bsr_accumulate(
            a,
            3,
            br=br,
            bc=bc,
            vt=tile_w,
            chunk=chunk,
            block_row=row_tile,
            vload=lambda k, v: vload(k, v, ptile),
            row_stride=pp if flat_xc else None,
        )
        bufs = [[(f"{acc}{r}_{c}", off, chunk) for c, off in enumerate(offsets)] for r in range(rows)]
    else:
        acc = _tile_accumulate(
            a,
            3,
            rows=rows,
            width=tile_w,
            k_extent=str(g.k),
            k_static=g.k,
            ku=params.ku,
            bcast=lambda i, k: f"W[{row_tile}, {k}, {i}]",
            vload=lambda k, v: vload(k, v, ptile),
        )
        bufs = [[(f"{acc}{r}", 0, tile_w)] for r in range(rows)]

    def store(ind: int, vec: bool) -> None:
        for r in range(rows):
            ind2 = ind
            co = f"{row_tile} * {rows} + {r}"
            if g.c_out % rows:
                a(ind2, f"if {co} < {g.c_out}:")
                ind2 += 1
            for buf, off, size in bufs[r]:
                if vec:
                    a(ind2, f"for v in T.vectorized({size}):")
                    val = _epilogue(f"{buf}[v]", f"B[{co}]" if bias is not None else None, act)
                else:
                    rest = p - full_ptiles * tile_w - off
                    if rest <= 0:
                        continue
                    scratch = _spill(a, ind2, buf, size)
                    a(ind2, f"for v in range({min(rest, size)}):")
                    val = _epilogue(f"{scratch}[v]", f"B[{co}]" if bias is not None else None, act)
                a(ind2 + 1, f"Y[{img}, {co}, {ptile} * {tile_w} + {off} + v] = {val}")

    if p % tile_w == 0:
        store(3, True)
    elif full_ptiles:
        a(3, f"if {ptile} < {full_ptiles}:")
        store(4, True)
        a(3, "else:")
        store(4, False)
    else:
        store(3, False)
    src = a.text()
    if sparse:
        consts = [bsr.data, scaled_indices(bsr, pp) if flat_xc else bsr.indices, bsr.indptr]
    else:
        consts = [pack_conv_weight(w_out_in, rows)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(g.c_out))
    return Kernel(name, _parse(src, name), consts, src)
