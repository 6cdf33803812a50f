"""Dense 3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (``_conv2d_winograd``): 16
multiplies per 2x2 output tile and input/output channel pair instead of 36, 2.25x fewer. ONNX Runtime's MLAS
convolutions compute every product directly.

Each 4x4 input patch d (overlapping by 2) becomes V = B^T d B, each filter g becomes U = G g G^T (once, when the
kernel is built), the 16 elementwise products are summed over input channels, i.e. 16 independent matrix products
M[xi] = V[xi] @ U[xi] over (tiles x input channels) @ (input channels x output channels), and each tile's output
is A^T M A (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The transforms' entries are
0, +-1 and +-1/2, so float32 results stay within a few ulps of the sums' magnitude (measured against torch in the
tests).

Layout, chosen so that every stage runs on whole vectors: the input goes once into zero-padded planes transposed to
channels last (XT[row, column, channel], channels rounded up to whole vectors); the input transform then works on
channel vectors; the products are the channel-vector tiles of conv_channels.py (a weight vector per input channel
times broadcast values of consecutive tiles); the output transform reads channel vectors of M and stores the 2x2
outputs of each tile element by element into NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_channels import ACCUMULATORS, STORE_VECTOR_FMAS, VECTORS, inside_products
from .conv_layout import ConvGeom, _images_per_launch, pack_conv_weight
from .source import CpuKernelParams, Kernel, _ceil, _copy_loop, _epilogue, _loop, _parse, _Src, _zero_accumulators

WINOGRAD = True  # False: the direct forms for every convolution (A/B timing)
# the time of each transform, per channel vector of a tile, in vector FMAs (fitted: winograd_pays); the input's
# includes the transposing copy
INPUT_TRANSFORM_FMAS = 118
OUTPUT_TRANSFORM_FMAS = 38

_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def takes_winograd(g: ConvGeom) -> bool:
    """The geometry F(2x2, 3x3) computes: a 3x3 kernel at stride 1 without dilation (any padding)."""
    return WINOGRAD and (g.kh, g.kw) == (3, 3) and g.stride == (1, 1) and g.dilation == (1, 1)


@dataclass(frozen=True)
class _Layout:
    """Sizes of the buffers of one launch of ``images`` images."""

    th: int  # tile rows (2 output rows each)
    tw: int  # tile columns
    hp: int  # rows of the padded, transposed input: 2 * th + 2
    wp: int  # its columns
    cp: int  # input channels rounded up to whole vectors
    cop: int  # output channels rounded up to whole weight tiles
    tiles: int  # tiles of all images of a launch
    rows: int  # tiles rounded up to whole blocks of every kind of product tile

    def buffer_floats(self, images: int = 1) -> int:
        return images * self.hp * self.wp * self.cp + 16 * self.rows * (self.cp + self.cop)


@dataclass(frozen=True)
class _Tiles:
    """Product tiles of ``vectors`` output-channel vectors times ``positions`` consecutive tiles, for ``count``
    weight tiles from ``first``."""

    first: int
    count: int
    vectors: int
    positions: int


def _product_tiles(c_out: int, tiles: int, params: CpuKernelParams) -> list[_Tiles]:
    """Two vectors of output channels times up to 10 tiles (conv_channels.py's register tile), the widest count
    that divides the tiles, else the one that leaves the fewest padding rows; an odd last vector gets a kind of
    its own with up to twice the positions."""
    total = _ceil(c_out, params.lanes)
    vectors = min(total, VECTORS)
    full, rest = divmod(total, vectors)
    kinds = [(0, full, vectors)] + ([(full, 1, rest)] if rest else [])
    out = []
    for first, count, v in kinds:
        widest = max(1, min(tiles, ACCUMULATORS // v, params.acc_regs // v))
        positions = min(range(widest, widest // 2, -1), key=lambda p: (_ceil(tiles, p) * p, -p))
        out.append(_Tiles(first, count, v, positions))
    return out


def _layout(g: ConvGeom, params: CpuKernelParams, images: int) -> _Layout:
    th, tw = _ceil(g.oh, 2), _ceil(g.ow, 2)
    width = min(_ceil(g.c_out, params.lanes), VECTORS) * params.lanes
    tiles = images * th * tw
    rows = max(_ceil(tiles, k.positions) * k.positions for k in _product_tiles(g.c_out, tiles, params))
    return _Layout(th, tw, 2 * th + 2, 2 * tw + 2, _ceil(g.c_in, params.lanes) * params.lanes,
                   _ceil(g.c_out, width) * width, tiles, rows)


def winograd_buffer_bytes(g: ConvGeom, params: CpuKernelParams) -> int:
    """Bytes per image of this form's buffers: the transposed planes, V and M."""
    return 4 * _layout(g, params, 1).buffer_floats()


def winograd_pays(g: ConvGeom, params: CpuKernelParams) -> bool:
    """Whether F(2x2, 3x3) costs less than the channel-vector form (conv_channels.py, which skips the taps that read
    padding): ``winograd_speedup`` above 1."""
    return winograd_speedup(g, params) > 1


def winograd_speedup(g: ConvGeom, params: CpuKernelParams) -> float:
    """The predicted time of the channel-vector form over this one's, 1.0 where this form is not taken. Both in
    vector FMAs per image: the products (16 per tile, input channel and output vector) and each transform
    (INPUT_TRANSFORM_FMAS per tile and input vector, the transposing copy included; OUTPUT_TRANSFORM_FMAS per tile
    and output vector), plus the element stores both forms make; odd maps pay for whole tiles. Fitted on 86 lone
    layers (8-256 channels, 4x4 to 56x56 maps, one thread, AVX-512): within 5% at the median, 16% at the 90th
    percentile; it declines 11 layers where this form was 1.03-1.6x faster (8-48 channels on 4x4 to 8x8 maps,
    where the direct forms cost more than the products and stores counted) and takes one where it was 0.94x."""
    if not takes_winograd(g) or g.c_in < params.lanes:
        return 1.0
    lanes = params.lanes
    lay = _layout(g, params, 1)
    co_vectors = _ceil(g.c_out, lanes)
    stores = g.pixels * g.c_out * STORE_VECTOR_FMAS
    direct = co_vectors * inside_products(g) + stores
    mine = (16 * lay.rows * g.c_in * lay.cop // lanes + lay.tiles * INPUT_TRANSFORM_FMAS * lay.cp // lanes
            + lay.tiles * OUTPUT_TRANSFORM_FMAS * co_vectors + stores)
    return max(direct / mine, 1.0)


def winograd_weights(w: np.ndarray, width: int) -> np.ndarray:
    """OIHW 3x3 weights -> U = G w G^T packed [16, Co / width, Ci, width] (pack_conv_weight per position)."""
    u = np.einsum("ik,ockl,jl->ijoc", _G, w.astype(np.float64), _G).reshape(16, w.shape[0], w.shape[1])
    return np.ascontiguousarray(np.stack([pack_conv_weight(u[xi].astype(np.float32), width) for xi in range(16)]))


def _combination(coefficients: np.ndarray, term) -> str:
    """sum c * term(i, j) over the nonzero entries of a matrix of +-1 (+-1/2 never occurs here)."""
    out = ""
    for (i, j), c in np.ndenumerate(coefficients):
        if c:
            sign = "-" if c < 0 else ("+" if out else "")
            out += f" {sign} {term(i, j)}" if out else f"{sign}{term(i, j)}"
    return out.strip()


def _conv2d_winograd(name: str, g: ConvGeom, w_out_in: np.ndarray, bias: np.ndarray | None, act,
                     params: CpuKernelParams, n_static: int | None) -> Kernel:
    """Y[n, co, oh * OW + ow] of a 3x3 stride-1 convolution by F(2x2, 3x3), in four parallel stages per launch:
    copy (XT), input transform (V), 16 products (M), output transform (Y, with the bias and activation)."""
    lanes = params.lanes
    images = _images_per_launch(n_static, winograd_buffer_bytes(g, params))
    lay = _layout(g, params, images)
    kinds = _product_tiles(g.c_out, lay.tiles, params)
    width = kinds[0].vectors * lanes
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    a.signature(name, ["x: T.handle", "w: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"],
                ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {g.c_in}, {g.h}, {g.w}), "float32")')
    a(1, f'W = T.match_buffer(w, (16, {lay.cop // width}, {g.c_in}, {width}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({lay.cop},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {g.c_out}, {g.pixels}), "float32")')
    plane = lay.hp * lay.wp * lay.cp
    a(1, f'XT = T.alloc_buffer(({images * plane},), "float32")')
    a(1, f'V = T.alloc_buffer(({16 * lay.rows * lay.cp},), "float32")')
    a(1, f'M = T.alloc_buffer(({16 * lay.rows * lay.cop},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    _copy_transposed(a, g, lay, images)
    if lay.rows > lay.tiles:  # product rows past the last tile: zeros (their sums are never read)
        a(2, f"for z in range({16 * (lay.rows - lay.tiles)}):")
        a(3, f"for v in T.vectorized({lay.cp}):")
        a(4, f"V[z // {lay.rows - lay.tiles} * {lay.rows * lay.cp} + ({lay.tiles} + z % {lay.rows - lay.tiles})"
             f" * {lay.cp} + v] = T.float32(0)")
    a(2, f"for q in {_copy_loop(images * plane * 2)}({images * lay.th}):")  # input transform, per tile row
    xt = (f"q // {lay.th} * {plane} + ((q % {lay.th} * 2 + {{r}}) * {lay.wp} + tj * 2 + {{c}}) * {lay.cp}"
          f" + cv * {lanes} + v")
    a(3, f"for tj in range({lay.tw}):")
    a(4, f"for cv in range({lay.cp // lanes}):")
    a(5, f"for v in T.vectorized({lanes}):")
    row = f"(q * {lay.tw} + tj) * {lay.cp} + cv * {lanes} + v"
    for xi in range(16):
        r, c = divmod(xi, 4)
        term = np.outer(_BT[r], _BT[c])
        a(6, f"V[{xi * lay.rows * lay.cp} + {row}] = "
             + _combination(term, lambda i, j: f"XT[{xt.format(r=i, c=j)}]"))
    for kind in kinds:
        _products(a, g, lay, kind, width, lanes)
    _output_transform(a, g, lay, images, bias is not None, act, lanes)
    src = a.text()
    consts = [winograd_weights(w_out_in.reshape(g.c_out, g.c_in, 3, 3), width)]
    if bias is not None:
        padded = np.zeros(lay.cop, np.float32)
        padded[:g.c_out] = bias
        consts.append(padded)
    return Kernel(name, _parse(src, name), consts, src)


def _copy_transposed(a: _Src, g: ConvGeom, lay: _Layout, images: int) -> None:
    """XT[slot, row, column, ci] = the zero-padded input (zeros past the last channel too); one (parallel) loop
    over (image, padded row). The valid rows and columns are resolved here: no per-element bounds checks."""
    pt, pl = g.pad[0], g.pad[1]
    row_floats = lay.wp * lay.cp
    a(2, f"for q in {_copy_loop(images * lay.hp * row_floats)}({images * lay.hp}):")
    img = f"(nc * {images} + q // {lay.hp})" if images > 1 else "nc"
    ih = f"q % {lay.hp} - {pt}" if pt else f"q % {lay.hp}"
    base = f"q * {row_floats}"
    a(3, f"if {ih} >= 0 and {ih} < {g.h}:" if pt else f"if {ih} < {g.h}:")
    if pl:
        a(4, f"for z in range({pl * lay.cp}):")
        a(5, f"XT[{base} + z] = T.float32(0)")
    a(4, f"for j in range({g.w}):")
    a(5, f"for ci in range({g.c_in}):")
    a(6, f"XT[{base} + ({pl} + j) * {lay.cp} + ci] = X[{img}, ci, {ih}, j]")
    if lay.cp > g.c_in:
        a(4, f"for j in range({g.w}):")
        a(5, f"for z in range({lay.cp - g.c_in}):")
        a(6, f"XT[{base} + ({pl} + j) * {lay.cp} + {g.c_in} + z] = T.float32(0)")
    if lay.wp > pl + g.w:
        a(4, f"for z in range({(lay.wp - pl - g.w) * lay.cp}):")
        a(5, f"XT[{base} + {(pl + g.w) * lay.cp} + z] = T.float32(0)")
    a(3, "else:")
    a(4, f"for z in range({row_floats}):")
    a(5, f"XT[{base} + z] = T.float32(0)")


def _products(a: _Src, g: ConvGeom, lay: _Layout, kind: _Tiles, width: int, lanes: int) -> None:
    """M[xi, tile, co] = sum over ci of V[xi, tile, ci] * U[xi, ci, co], in register tiles of ``kind.positions``
    tiles x ``kind.vectors`` channel vectors; one parallel loop over (xi, weight tile, block of tiles), weight tile
    major: a weight tile (Ci x width floats) stays in cache while every block uses it."""
    blocks = lay.rows // kind.positions
    w = kind.vectors * lanes
    per_xi = kind.count * blocks
    a(2, f"for t in {_loop(16 * lay.rows * g.c_in * kind.count * w)}({16 * per_xi}):")
    xi = f"t // {per_xi}"
    ct = f"({kind.first} + t % {per_xi} // {blocks})" if kind.count > 1 else str(kind.first)
    first_row = f"t % {blocks} * {kind.positions}"
    acc = _zero_accumulators(a, 3, kind.positions, w)
    a(3, f"for ci in range({g.c_in}):")
    for r in range(kind.positions):
        a(4, f"for v in T.vectorized({w}):")
        a(5, f"{acc}{r}[v] = {acc}{r}[v] + W[{xi}, {ct}, ci, v] * "
             f"V[{xi} * {lay.rows * lay.cp} + ({first_row} + {r}) * {lay.cp} + ci]")
    for r in range(kind.positions):
        a(3, f"for v in T.vectorized({w}):")
        a(4, f"M[{xi} * {lay.rows * lay.cop} + ({first_row} + {r}) * {lay.cop} + {ct} * {width} + v] = {acc}{r}[v]")


def _output_transform(a: _Src, g: ConvGeom, lay: _Layout, images: int, bias: bool, act, lanes: int) -> None:
    """Y = A^T M A (+ bias) (activation) per tile and output-channel vector, stored element by element; one
    (parallel) loop over (image, tile row). A tile's second row or column past an odd map's edge is left out."""
    co_vectors = _ceil(g.c_out, lanes)
    a(2, f"for q in {_copy_loop(images * lay.th * lay.tw * co_vectors * lanes * 4)}({images * lay.th}):")
    img = f"(nc * {images} + q // {lay.th})" if images > 1 else "nc"
    ti = f"q % {lay.th}" if images > 1 else "q"
    a(3, f"for tj in range({lay.tw}):")
    a(4, f"for cv in range({co_vectors}):")
    out = a.fresh("out")
    a(5, f'{out} = T.alloc_buffer(({4 * lanes},), "float32")')
    a(5, f"for v in T.vectorized({lanes}):")
    m = f"(q * {lay.tw} + tj) * {lay.cop} + cv * {lanes} + v"
    for ya in range(2):
        for yb in range(2):
            total = _combination(np.outer(_AT[ya], _AT[yb]),
                                 lambda i, j: f"M[{(i * 4 + j) * lay.rows * lay.cop} + {m}]")
            val = _epilogue(f"({total})", f"B[cv * {lanes} + v]" if bias else None, act)
            a(6, f"{out}[{(ya * 2 + yb) * lanes} + v] = {val}")
    channels = g.c_out % lanes
    for ya in range(2):
        for yb in range(2):
            ind = 5
            guards = []
            if g.oh % 2 and ya:
                guards.append(f"{ti} < {lay.th - 1}")
            if g.ow % 2 and yb:
                guards.append(f"tj < {lay.tw - 1}")
            if guards:
                a(ind, f"if {' and '.join(guards)}:")
                ind += 1
            a(ind, f"for j in range({lanes}):")
            ind += 1
            if channels:
                a(ind, f"if cv * {lanes} + j < {g.c_out}:")
                ind += 1
            a(ind, f"Y[{img}, cv * {lanes} + j, ({ti} * 2 + {ya}) * {g.ow} + tj * 2 + {yb}] = "
                   f"{out}[{(ya * 2 + yb) * lanes} + j]")
