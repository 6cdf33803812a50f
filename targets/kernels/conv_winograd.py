"""Dense 3x3 convolutions at stride 1 and 2 by Winograd's minimal filtering F(m x m, 3x3) (``_conv2d_winograd``):
F(2x2, 3x3) computes 16 multiplies per 2x2 output tile and input/output channel pair instead of 36 (2.25x fewer),
F(4x4, 3x3) 36 per 4x4 tile instead of 144 (4x fewer). ONNX Runtime's MLAS convolutions compute every product.

Each p x p input patch d (p = m + 2, overlapping by 2) becomes V = B^T d B, each filter g becomes U = G g G^T (once,
when the kernel is built), the p x p elementwise products are summed over input channels, i.e. p * p independent
matrix products M[xi] = V[xi] @ U[xi] over (tiles x input channels) @ (input channels x output channels), and each
tile's output is A^T M A (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The
transforms come from Toom-Cook at small points (``toom_cook``). Precision: F(2x2, 3x3)'s transforms hold 0, +-1
and +-1/2, so float32 results stay within a few ulps of the sums' magnitude; F(4x4, 3x3)'s (points 0, +-1, +-2:
entries up to 8 and down to 1/24) lose about 15x more, errors of about 1e-5 of the sums' magnitude (both measured
against float64 in the tests).

At stride 2 a tile of m outputs reads 2m + 1 inputs: the even ones meet the filter's taps 0 and 2, a 2-tap
correlation (F(m, 2), m + 1 values), the odd ones tap 1 alone (m values), so each dimension has 2m + 1 values and
a tile (2m + 1)^2 products: 25 per 2x2 tile instead of 36, 81 per 4x4 tile instead of 144 (``_strided``; the
sub-convolution split of Yang et al., "Stride 2 1-D, 2-D, and 3-D Winograd for CNNs", 2020, in one transform). The
odd phase's values all meet tap 1, so their products share transformed weights: 36 weight planes for 81 products
(16 for 25), which halves the weights streamed and stored. The
same code runs both strides; only the transforms' shapes and the tiles' step differ. The stride-2 F(4x4)'s F(4, 2)
(points 0, +-1, 2) has entries up to 8 too, and its errors are of F(4x4, 3x3)'s size (tests). Which algorithm
runs, if any, is a per-layer choice by predicted time (``choose_algorithm``).

Layout, chosen so that every stage runs on whole vectors: the input goes once into zero-padded planes transposed to
channels last (XT[row, column, channel], channels rounded up to whole vectors); the input transform then works on
channel vectors, rows first (p small buffers that stay in registers), then columns; the products are the
channel-vector tiles of conv_channels.py (a weight vector per input channel times broadcast values of consecutive
tiles); the output transform reads channel vectors of M and stores the m x m outputs of each tile element by
element into NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .conv_channels import ACCUMULATORS, VECTORS, channel_tile_kinds, inside_products
from .conv_layout import ConvGeom, _images_per_launch, pack_conv_weight
from .source import CpuKernelParams, Kernel, _ceil, _copy_loop, _epilogue, _loop, _parse, _Src, _zero_accumulators

WINOGRAD = True  # False: the direct forms for every convolution (A/B timing)
STRIDED = True  # False: stride-1 layers only (A/B timing of the stride-2 algorithms)


def takes_winograd(g: ConvGeom) -> bool:
    """The geometry these algorithms compute: a 3x3 kernel at stride 1 or 2 without dilation (any padding)."""
    strides = ((1, 1), (2, 2)) if STRIDED else ((1, 1),)
    return WINOGRAD and (g.kh, g.kw) == (3, 3) and g.stride in strides and g.dilation == (1, 1)


def toom_cook(m: int, r: int, points: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m, r), the 1-D correlation of m outputs with an r-tap filter, by Toom-Cook at the finite
    ``points`` (m + r - 2 of them) and infinity: A^T holds the points' powers, G the filter polynomial's values over
    the Lagrange denominators, and B^T is the unique matrix with A^T ((G w) * (B^T d)) = the correlation for every
    w and d (solved, then rounded to the small fractions it is made of)."""
    n = m + r - 1
    assert len(points) == n - 1, "m + r - 2 finite points"
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for j, p in enumerate(points):
        at[:, j] = float(p) ** np.arange(m)
        g[j] = float(p) ** np.arange(r) / np.prod([p - q for q in points if q != p])
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1
    products = np.array([at[i] * g[:, k] for i in range(m) for k in range(r)])
    shifts = np.array([np.eye(n)[i + k] for i in range(m) for k in range(r)])
    bt = np.linalg.lstsq(products, shifts, rcond=None)[0]
    bt = np.vectorize(lambda v: float(Fraction(v).limit_denominator(720)))(bt)
    assert np.allclose(products @ bt, shifts, atol=1e-12), "the points give no exact algorithm"
    return bt, g, at


def _strided(m: int, points: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of a 3-tap filter at stride 2 over m outputs (inputs d_0 .. d_2m): the even inputs meet taps
    0 and 2 (F(m, 2) at ``points``), the odd ones tap 1 (one product each), and A^T adds the two phases' outputs.
    (m + 1 + m) values per dimension instead of 3m products."""
    bt2, g2, at2 = toom_cook(m, 2, points)
    n = len(g2)
    bt, g, at = np.zeros((n + m, 2 * m + 1)), np.zeros((n + m, 3)), np.zeros((m, n + m))
    bt[:n, 0::2], g[:n, 0::2], at[:, :n] = bt2, g2, at2
    for i in range(m):
        bt[n + i, 2 * i + 1] = g[n + i, 1] = at[i, n + i] = 1
    return bt, g, at


@dataclass(frozen=True)
class Algorithm:
    """F(m x m, 3x3) at ``stride``: output tiles of m x m from input patches of ``span`` x ``span`` (overlapping
    by span - m * stride), transforms B^T (p x span), G (p x 3), A^T (m x p) with p values per dimension, and its
    time in vector FMAs (fitted: ``choose_algorithm``) per streamed weight vector, per tile and input vector (the
    transposing copy and the input transform), per tile and output vector (the output transform) and per output
    element stored."""

    m: int
    stride: int
    bt: np.ndarray
    g: np.ndarray
    at: np.ndarray
    weight_fmas: float
    input_fmas: float
    output_fmas: float
    store_fmas: float

    @property
    def p(self) -> int:
        """Values per tile and dimension."""
        return len(self.bt)

    @property
    def span(self) -> int:
        """Input rows (and columns) a tile reads."""
        return self.bt.shape[1]

    @property
    def step(self) -> int:
        """Input rows (and columns) from one tile to the next."""
        return self.m * self.stride

    @property
    def planes(self) -> int:
        """Values per tile: p x p independent products."""
        return self.p * self.p

    @property
    def g_rows(self) -> int:
        """Distinct rows of G: at stride 2 the odd phase's m rows are all tap 1 (G's last rows repeat), so the
        products of those values share their transformed weights."""
        k = self.p - 1
        while k > 0 and np.array_equal(self.g[k - 1], self.g[-1]):
            k -= 1
        return k + 1

    @property
    def weight_planes(self) -> int:
        """Distinct planes of transformed weights: 36 of 81 at stride 2 with 4x4 tiles, 16 of 25 with 2x2."""
        return self.g_rows * self.g_rows

    def weight_plane(self, xi: str) -> str:
        """TIR expression: the weight plane of product plane ``xi`` (row and column clamped to G's distinct rows)."""
        if self.g_rows == self.p:
            return xi
        last = self.g_rows - 1
        return f"T.min({xi} // {self.p}, {last}) * {self.g_rows} + T.min({xi} % {self.p}, {last})"


F2 = Algorithm(2, 1, *toom_cook(2, 3, (0, 1, -1)), 0, 92, 43, 0.63)
F4 = Algorithm(4, 1, *toom_cook(4, 3, (0, 1, -1, 2, -2)), 1.0, 396, 125, 0.57)
# stride 2: 25 products per 2x2 tile instead of 36 (1.44x fewer), 81 per 4x4 tile instead of 144 (1.78x)
S2F2 = Algorithm(2, 2, *_strided(2, (0, 1)), 0.13, 225, 72, 0)
S2F4 = Algorithm(4, 2, *_strided(4, (0, 1, -1, 2)), 1.1, 925, 144, 0.5)
# the channel-vector form's time beside them, in vector FMAs per weight vector streamed and per element stored
DIRECT_WEIGHT_FMAS = 0.36
DIRECT_STORE_FMAS = 1.55
ALGORITHMS = (F2, F4, S2F2, S2F4)


@dataclass(frozen=True)
class _Layout:
    """Sizes of the buffers of one launch of ``images`` images."""

    th: int  # tile rows (m output rows each)
    tw: int  # tile columns
    hp: int  # rows of the padded, transposed input: step * th + span - step
    wp: int  # its columns
    cp: int  # input channels rounded up to whole vectors
    cop: int  # output channels rounded up to whole weight tiles
    tiles: int  # tiles of all images of a launch
    rows: int  # tiles rounded up to whole blocks of every kind of product tile
    planes: int  # values per tile

    def buffer_floats(self, images: int = 1) -> int:
        return images * self.hp * self.wp * self.cp + self.planes * self.rows * (self.cp + self.cop)


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
    out = []
    for first, count, v in channel_tile_kinds(c_out, params):
        widest = max(1, min(tiles, ACCUMULATORS // v, params.acc_regs // v))
        positions = min(range(widest, widest // 2, -1), key=lambda p: (_ceil(tiles, p) * p, -p))
        out.append(_Tiles(first, count, v, positions))
    return out


def _layout(g: ConvGeom, params: CpuKernelParams, images: int, alg: Algorithm) -> _Layout:
    th, tw = _ceil(g.oh, alg.m), _ceil(g.ow, alg.m)
    width = min(_ceil(g.c_out, params.lanes), VECTORS) * params.lanes
    tiles = images * th * tw
    rows = max(_ceil(tiles, k.positions) * k.positions for k in _product_tiles(g.c_out, tiles, params))
    overlap = alg.span - alg.step
    return _Layout(th, tw, alg.step * th + overlap, alg.step * tw + overlap,
                   _ceil(g.c_in, params.lanes) * params.lanes, _ceil(g.c_out, width) * width, tiles, rows, alg.planes)


def winograd_buffer_bytes(g: ConvGeom, params: CpuKernelParams, alg: Algorithm | None = None) -> int:
    """Bytes per image of this form's buffers (``alg``, else the one chosen): the transposed planes, V and M."""
    return 4 * _layout(g, params, 1, alg or _chosen(g, params)).buffer_floats()


def _chosen(g: ConvGeom, params: CpuKernelParams) -> Algorithm:
    """The algorithm ``choose_algorithm`` takes, else the smaller one of the layer's stride."""
    return choose_algorithm(g, params)[0] or (F2 if g.stride == (1, 1) else S2F2)


def winograd_speedup(g: ConvGeom, params: CpuKernelParams) -> float:
    """The predicted time of the channel-vector form over the best Winograd algorithm's, 1.0 where none is taken
    (``choose_algorithm``)."""
    return choose_algorithm(g, params)[1]


def choose_algorithm(g: ConvGeom, params: CpuKernelParams) -> tuple[Algorithm | None, float]:
    """(the algorithm predicted fastest, its predicted speed-up over the channel-vector form), or (None, 1.0).
    All in vector FMAs per image: the products (p x p per tile, input channel and output vector; the direct form's
    inside taps, conv_channels.py), the weights streamed once per launch, each transform per tile and channel
    vector, the element stores; odd maps pay for whole tiles. Fitted on 92 lone layers (8-512 channels, 4x4 to
    56x56 maps, one thread, AVX-512; the three forms' timings side by side): on those with at least a vector of
    input channels the choice ran within 5% of the fastest form on every layer. Layers with fewer input channels
    (stems) keep the direct form: the transforms work on whole vectors of channels, and on 8-channel layers the
    rule mispredicted either way (Winograd 0.74-2.4x). The stride-2 algorithms' terms were fitted the same way on
    29 lone layers (16-512 channels, 8x8 to 56x56 input maps; the direct form's per-FMA time as the unit), their
    input terms again after the copy went by blocks (``_transpose_row``); timed again once the products shared
    their weight planes (``Algorithm.weight_plane``), the choice ran within 5% of the fastest form on 25 and 5-9%
    slower on four (14x14 and 7x7 maps where two forms predict alike; 1.0% on average). The stride-1 terms,
    checked on 25 of their layers after the copy change, still choose the fastest form on 24 (9% off on one)."""
    if not takes_winograd(g) or g.c_in < params.lanes:
        return None, 1.0
    lanes = params.lanes
    co_vectors = _ceil(g.c_out, lanes)
    stores = g.pixels * g.c_out
    weights = g.c_in * _layout(g, params, 1, F2).cop // lanes  # vectors per tap of the weights, as packed
    direct = co_vectors * inside_products(g) + DIRECT_WEIGHT_FMAS * 9 * weights + DIRECT_STORE_FMAS * stores
    best, best_cost = None, direct
    for alg in (alg for alg in ALGORITHMS if (alg.stride,) * 2 == g.stride):
        lay = _layout(g, params, 1, alg)
        cost = (alg.planes * lay.rows * g.c_in * lay.cop // lanes + alg.weight_fmas * alg.weight_planes * weights
                + lay.tiles * alg.input_fmas * lay.cp // lanes + lay.tiles * alg.output_fmas * co_vectors
                + alg.store_fmas * stores)
        if cost < best_cost:
            best, best_cost = alg, cost
    return best, direct / best_cost


def winograd_weights(w: np.ndarray, width: int, alg: Algorithm = F2) -> np.ndarray:
    """OIHW 3x3 weights -> U = G w G^T for G's distinct rows, packed [weight planes, Co / width, Ci, width]
    (pack_conv_weight per plane; ``Algorithm.weight_plane`` maps a product plane to its weights)."""
    g = alg.g[:alg.g_rows]
    u = np.einsum("ik,ockl,jl->ijoc", g, w.astype(np.float64), g).reshape(alg.weight_planes, *w.shape[:2])
    return np.ascontiguousarray(np.stack([pack_conv_weight(u[xi].astype(np.float32), width)
                                          for xi in range(alg.weight_planes)]))


def _combination(coefficients: np.ndarray, term) -> str:
    """sum c * term(i) over the nonzero entries of a vector of small exact constants."""
    out = ""
    for i, c in enumerate(coefficients):
        if c:
            factor = term(i) if abs(c) == 1 else f"T.float32({float(abs(c))!r}) * {term(i)}"
            out += (" - " if c < 0 else " + ") + factor if out else ("-" if c < 0 else "") + factor
    return out


def _conv2d_winograd(name: str, g: ConvGeom, w_out_in: np.ndarray, bias: np.ndarray | None, act,
                     params: CpuKernelParams, n_static: int | None, alg: Algorithm | None = None) -> Kernel:
    """Y[n, co, oh * OW + ow] of a 3x3 convolution by F(m x m, 3x3) at its stride (``alg``, else
    ``choose_algorithm``'s, else the smaller one), in four parallel stages per launch: copy (XT), input transform
    (V), p x p products (M), output transform (Y, with the bias and activation)."""
    alg = alg or _chosen(g, params)
    lanes = params.lanes
    images = _images_per_launch(n_static, winograd_buffer_bytes(g, params, alg))
    lay = _layout(g, params, images, alg)
    kinds = _product_tiles(g.c_out, lay.tiles, params)
    width = kinds[0].vectors * lanes
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    a.signature(name, ["x: T.handle", "w: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"],
                ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {g.c_in}, {g.h}, {g.w}), "float32")')
    a(1, f'W = T.match_buffer(w, ({alg.weight_planes}, {lay.cop // width}, {g.c_in}, {width}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({lay.cop},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {g.c_out}, {g.pixels}), "float32")')
    plane = lay.hp * lay.wp * lay.cp
    a(1, f'XT = T.alloc_buffer(({images * plane},), "float32")')
    a(1, f'V = T.alloc_buffer(({alg.planes * lay.rows * lay.cp},), "float32")')
    a(1, f'M = T.alloc_buffer(({alg.planes * lay.rows * lay.cop},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    _copy_transposed(a, g, lay, images, lanes)
    if lay.rows > lay.tiles:  # product rows past the last tile: zeros (their sums are never read)
        a(2, f"for z in range({alg.planes * (lay.rows - lay.tiles)}):")
        a(3, f"for v in T.vectorized({lay.cp}):")
        a(4, f"V[z // {lay.rows - lay.tiles} * {lay.rows * lay.cp} + ({lay.tiles} + z % {lay.rows - lay.tiles})"
             f" * {lay.cp} + v] = T.float32(0)")
    _input_transform(a, lay, alg, images, lanes)
    for kind in kinds:
        _products(a, g, lay, alg, kind, width, lanes)
    _output_transform(a, g, lay, alg, images, bias is not None, act, lanes)
    src = a.text()
    consts = [winograd_weights(w_out_in.reshape(g.c_out, g.c_in, 3, 3), width, alg)]
    if bias is not None:
        padded = np.zeros(lay.cop, np.float32)
        padded[:g.c_out] = bias
        consts.append(padded)
    return Kernel(name, _parse(src, name), consts, src)


def _input_transform(a: _Src, lay: _Layout, alg: Algorithm, images: int, lanes: int) -> None:
    """V = B^T d B per tile and input-channel vector, rows first (into p small buffers, kept in registers), then
    columns; one (parallel) loop over (image, tile row)."""
    p, span, step = alg.p, alg.span, alg.step
    plane = lay.hp * lay.wp * lay.cp
    a(2, f"for q in {_copy_loop(images * plane * 2)}({images * lay.th}):")
    a(3, f"for tj in range({lay.tw}):")
    a(4, f"for cv in range({lay.cp // lanes}):")
    rows = [a.fresh("bd") for _ in range(p)]
    for buf in rows:
        a(5, f'{buf} = T.alloc_buffer(({span * lanes},), "float32")')
    a(5, f"for v in T.vectorized({lanes}):")
    # indices with their constants folded (TVMScript's parser takes its time per node of an expression)
    tile_row = f"q // {lay.th} * {plane} + q % {lay.th} * {step * lay.wp * lay.cp}" if images > 1 else \
        f"q * {step * lay.wp * lay.cp}"
    patch = f"{tile_row} + tj * {step * lay.cp} + cv * {lanes}"
    for i in range(p):
        for c in range(span):
            a(6, f"{rows[i]}[{c * lanes} + v] = "
                 + _combination(alg.bt[i], lambda r, c=c: f"XT[{patch} + {(r * lay.wp + c) * lay.cp} + v]"))
    row = f"q * {lay.tw * lay.cp} + tj * {lay.cp} + cv * {lanes}"
    for i in range(p):
        for j in range(p):
            a(6, f"V[{row} + {(i * p + j) * lay.rows * lay.cp} + v] = "
                 + _combination(alg.bt[j], lambda c, i=i: f"{rows[i]}[{c * lanes} + v]"))


COPY_BLOCK = 4  # input columns per block of the transposing copy (0: element by element, A/B timing)


def _transpose_row(a: _Src, lanes: int, cols: int, channels: int, src, dst) -> None:
    """dst(j, ci) = src(ci, j) for one input row, in blocks of ``lanes`` channels x COPY_BLOCK columns through a
    small buffer: vector loads along the row, vector stores along the channels (the compiler builds each store
    vector from the buffer). 0.26 ns per element against 0.58 element by element (64 x 56 x 56, one thread);
    columns and channels past whole blocks go element by element."""
    bw = COPY_BLOCK
    col_blocks, chan_blocks = (cols // bw, channels // lanes) if bw else (0, 0)
    if col_blocks and chan_blocks:
        a(4, f"for jb in range({col_blocks}):")
        a(5, f"for cb in range({chan_blocks}):")
        tb = a.fresh("tb")
        a(6, f'{tb} = T.alloc_buffer(({lanes * bw},), "float32", scope="local")')
        a(6, f"for cc in range({lanes}):")
        a(7, f"for v in T.vectorized({bw}):")
        a(8, f"{tb}[cc * {bw} + v] = {src(f'cb * {lanes} + cc', f'jb * {bw} + v')}")
        a(6, f"for jj in range({bw}):")
        a(7, f"for v in T.vectorized({lanes}):")
        a(8, f"{dst(f'jb * {bw} + jj', f'cb * {lanes} + v')} = {tb}[v * {bw} + jj]")
    done_cols, done_chans = col_blocks * bw, chan_blocks * lanes
    if done_chans and done_cols < cols:  # the last columns of the whole channel blocks
        a(4, f"for j in range({done_cols}, {cols}):")
        a(5, f"for ci in range({done_chans}):")
        a(6, f"{dst('j', 'ci')} = {src('ci', 'j')}")
    if done_chans < channels:  # the last channels, every column
        a(4, f"for j in range({cols}):")
        a(5, f"for ci in range({done_chans}, {channels}):")
        a(6, f"{dst('j', 'ci')} = {src('ci', 'j')}")


def _copy_transposed(a: _Src, g: ConvGeom, lay: _Layout, images: int, lanes: int) -> None:
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
    cols = min(g.w, lay.wp - pl)  # at stride 2 the last input column may lie past every tile
    _transpose_row(a, lanes, cols, g.c_in, lambda ci, j: f"X[{img}, {ci}, {ih}, {j}]",
                   lambda j, ci: f"XT[{base} + ({pl} + {j}) * {lay.cp} + {ci}]")
    if lay.cp > g.c_in:
        a(4, f"for j in range({cols}):")
        a(5, f"for z in range({lay.cp - g.c_in}):")
        a(6, f"XT[{base} + ({pl} + j) * {lay.cp} + {g.c_in} + z] = T.float32(0)")
    if lay.wp > pl + cols:
        a(4, f"for z in range({(lay.wp - pl - cols) * lay.cp}):")
        a(5, f"XT[{base} + {(pl + cols) * lay.cp} + z] = T.float32(0)")
    a(3, "else:")
    a(4, f"for z in range({row_floats}):")
    a(5, f"XT[{base} + z] = T.float32(0)")


def _products(a: _Src, g: ConvGeom, lay: _Layout, alg: Algorithm, kind: _Tiles, width: int, lanes: int) -> None:
    """M[xi, tile, co] = sum over ci of V[xi, tile, ci] * U[xi, ci, co], in register tiles of ``kind.positions``
    tiles x ``kind.vectors`` channel vectors; one parallel loop over (xi, weight tile, block of tiles), weight tile
    major: a weight tile (Ci x width floats) stays in cache while every block uses it."""
    blocks = lay.rows // kind.positions
    w = kind.vectors * lanes
    per_xi = kind.count * blocks
    a(2, f"for t in {_loop(lay.planes * lay.rows * g.c_in * kind.count * w)}({lay.planes * per_xi}):")
    xi = f"t // {per_xi}"
    ct = f"({kind.first} + t % {per_xi} // {blocks})" if kind.count > 1 else str(kind.first)
    first_row = f"t % {blocks} * {kind.positions}"
    acc = _zero_accumulators(a, 3, kind.positions, w)
    a(3, f"for ci in range({g.c_in}):")
    for r in range(kind.positions):
        a(4, f"for v in T.vectorized({w}):")
        a(5, f"{acc}{r}[v] = {acc}{r}[v] + W[{alg.weight_plane(xi)}, {ct}, ci, v] * "
             f"V[{xi} * {lay.rows * lay.cp} + ({first_row} + {r}) * {lay.cp} + ci]")
    for r in range(kind.positions):
        a(3, f"for v in T.vectorized({w}):")
        a(4, f"M[{xi} * {lay.rows * lay.cop} + ({first_row} + {r}) * {lay.cop} + {ct} * {width} + v] = {acc}{r}[v]")


def _output_transform(a: _Src, g: ConvGeom, lay: _Layout, alg: Algorithm, images: int, bias: bool, act,
                      lanes: int) -> None:
    """Y = A^T M A (+ bias) (activation) per tile and output-channel vector, rows first (into m small buffers),
    stored element by element; one (parallel) loop over (image, tile row). The rows and columns of the last
    tiles past the map's edge are left out."""
    p, m = alg.p, alg.m
    co_vectors = _ceil(g.c_out, lanes)
    a(2, f"for q in {_copy_loop(images * lay.th * lay.tw * co_vectors * lanes * m * m)}({images * lay.th}):")
    img = f"(nc * {images} + q // {lay.th})" if images > 1 else "nc"
    ti = f"q % {lay.th}" if images > 1 else "q"
    a(3, f"for tj in range({lay.tw}):")
    a(4, f"for cv in range({co_vectors}):")
    rows, outs = [a.fresh("am") for _ in range(m)], [a.fresh("out") for _ in range(m)]
    for buf in rows:
        a(5, f'{buf} = T.alloc_buffer(({p * lanes},), "float32")')
    for buf in outs:
        a(5, f'{buf} = T.alloc_buffer(({m * lanes},), "float32")')
    a(5, f"for v in T.vectorized({lanes}):")
    mrow = f"q * {lay.tw * lay.cop} + tj * {lay.cop} + cv * {lanes}"
    for i in range(m):
        for c in range(p):
            a(6, f"{rows[i]}[{c * lanes} + v] = "
                 + _combination(alg.at[i], lambda r, c=c: f"M[{mrow} + {(r * p + c) * lay.rows * lay.cop} + v]"))
    for i in range(m):
        for j in range(m):
            total = _combination(alg.at[j], lambda c, i=i: f"{rows[i]}[{c * lanes} + v]")
            a(6, f"{outs[i]}[{j * lanes} + v] = "
                 + _epilogue(f"({total})", f"B[cv * {lanes} + v]" if bias else None, act))
    for i in range(m):
        for j in range(m):
            ind = 5
            guards = []
            if g.oh % m and i >= g.oh % m:
                guards.append(f"{ti} < {lay.th - 1}")
            if g.ow % m and j >= g.ow % m:
                guards.append(f"tj < {lay.tw - 1}")
            if guards:
                a(ind, f"if {' and '.join(guards)}:")
                ind += 1
            a(ind, f"for e in range({lanes}):")
            ind += 1
            if g.c_out % lanes:
                a(ind, f"if cv * {lanes} + e < {g.c_out}:")
                ind += 1
            a(ind, f"Y[{img}, cv * {lanes} + e, ({ti} * {m} + {i}) * {g.ow} + tj * {m} + {j}] = "
                   f"{outs[i]}[{j * lanes} + e]")
