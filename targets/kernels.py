"""Hand-written CPU kernels, generated as TVMScript text and parsed into TIR PrimFuncs.

TVM 0.27's default CPU pipeline leaves matmuls and convolutions as scalar loops and its sparse operators are gone,
so spc writes the compute-heavy kernels itself. Every kernel is an explicit register-blocked loop nest: a tile of
accumulators (one small buffer per row, under TVM's 1024-byte stack-alloca limit, so LLVM keeps them in vector
registers) is updated by ``broadcast(row operand) * vector load(column operand)`` fused multiply-adds over the
reduction axis, then written once with the epilogue (bias, ReLU) fused in.

Kernels (all float32):

* ``dense_matmul``   Y[m, n] = X[m, k] @ W[k, n] (+ bias, relu) with a constant W packed to [N/NR, K, NR]:
                     rows of X are broadcast, packed weight panels are vector loads. m may be symbolic.
* ``bsr_matmul``     the same product with W in block-sparse rows (BSR) over W^T [N, K]; it works on X^T (a
                     transposed, padded copy made inside the kernel) so it is vectorised over tokens, blocks of
                     ``br`` output rows x ``bc`` inputs are broadcast, and results are scattered into Y.
* ``conv2d``         NCHW convolution as W[co, (ci, kh, kw)] @ im2col[(ci, kh, kw), pixels] per image, dense
                     (packed W broadcast) or BSR (blocks broadcast), vectorised over output pixels.
* ``batch_matmul``   A[b, m, k] @ B[b, k, n] for two activations (attention), like ``dense_matmul`` with B
                     packed per call when n is symbolic or not a multiple of the panel width.
* ``layer_norm``, ``softmax``  over the last axis with vectorised reductions (TVM's legalized reductions are serial
                     scalar chains) and a polynomial exp.

Tails are handled inside each kernel (clamped/predicated tiles), so no shape restriction reaches the user.
Index expressions are written inline, never let-bound (``n = t // 8`` in TVMScript): let-bound image and tile
indices inside a parallel loop made the convolution about 2x slower, at every size measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVATIONS = (None, "relu")


@dataclass(frozen=True)
class CpuKernelParams:
    """Register blocking of one CPU target, derived from its vector width and register file."""

    lanes: int  # float32 lanes in one vector register
    mr: int  # rows of a dense micro-tile (broadcast operand)
    nr: int  # columns of a dense micro-tile (vector operand), a multiple of lanes
    ku: int  # unroll of the reduction loop
    acc_regs: int  # vector registers a BSR tile may use for accumulators

    def __post_init__(self):
        if self.nr % self.lanes or (self.nr // self.lanes) & (self.nr // self.lanes - 1):
            raise ValueError(f"nr={self.nr} must be a power-of-two multiple of lanes={self.lanes}")

    def bsr_tile(self, br: int) -> int:
        """Tokens (pixels) per BSR tile for blocks of ``br`` output rows: fills up to ``acc_regs`` registers."""
        return self.lanes * max(1, min(8, self.acc_regs // max(br, 1)))

    def bsr_chunk(self, br: int) -> int:
        """Accumulator buffers hold this many lanes (a power of two vectors: LLVM scalarises odd vector widths,
        a 96-lane vector ran 30x slower than three of 32); also the width of BSR tail tiles."""
        tile = self.bsr_tile(br)
        return 2 * self.lanes if tile % (2 * self.lanes) == 0 else self.lanes


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


PARALLEL_MIN_MACS = 1 << 22  # below this a launch on the thread pool costs more than it saves (measured on 2 cores)
PARALLEL_MIN_COPY = 1 << 18  # likewise for a copy (im2col, transposes), in elements


def _loop(work: int | None, threshold: int = PARALLEL_MIN_MACS) -> str:
    """``T.parallel`` for a loop nest doing ``work`` (None: unknown, symbolic sizes), else a serial loop: a small
    model's kernels take a few microseconds each, which waking the thread pool for every one of them doubled."""
    return "T.parallel" if work is None or work >= threshold else "T.serial"


class _Src:
    """Indented TVMScript source builder."""

    def __init__(self):
        self.lines: list[str] = []
        self._count = 0

    def fresh(self, prefix: str) -> str:
        """A new identifier (TVMScript forbids redefining a buffer in one scope)."""
        self._count += 1
        return f"{prefix}{self._count}_"

    def __call__(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


_PARSED: dict[str, object] = {}  # TVMScript source (name-independent) -> PrimFunc; parsing costs ~0.5 s


def _parse(src: str, name: str, attrs: dict | None = None):
    import tvm
    from tvm.script import tirx as T

    key = src.replace(f"def {name}(", "def kernel(", 1)
    func = _PARSED.get(key)
    if func is None:
        try:
            func = tvm.script.from_source(key, extra_vars={"T": T})
        except Exception as exc:  # pragma: no cover - a generator bug, show the source
            raise RuntimeError(f"spc kernel generator produced invalid TVMScript for {name}:\n{src}") from exc
        if len(_PARSED) > 256:
            _PARSED.clear()
        _PARSED[key] = func
    func = func.with_attr("global_symbol", name)
    func = func.with_attr("tirx.is_scheduled", True)
    for key, value in (attrs or {}).items():
        func = func.with_attr(key, value)
    return func


def _epilogue(val: str, bias: str | None, act: str | None) -> str:
    if bias is not None:
        val = f"{val} + {bias}"
    if act == "relu":
        val = f"T.max({val}, T.float32(0))"
    elif act is not None:
        raise ValueError(f"unsupported fused activation {act!r}")
    return val


def _dim(value) -> str:
    """A static int or the name of a symbolic int64 variable."""
    return str(value)


def _spill(a: _Src, ind: int, acc: str, width: int) -> str:
    """Copy accumulator ``acc`` (registers) to a stack scratch so that a guarded, non-unrolled loop can read it.

    Indexing the accumulators themselves with a loop variable would force them into memory for the whole
    reduction; unrolling guarded stores instead makes LLVM very slow."""
    scratch = a.fresh("sp")
    a(ind, f'{scratch} = T.alloc_buffer(({width},), "float32")')
    a(ind, f"for v in T.vectorized({width}):")
    a(ind + 1, f"{scratch}[v] = {acc}[v]")
    return scratch


def _tile_accumulate(
    a: _Src,
    ind: int,
    *,
    rows: int,
    width: int,
    k_extent: str,
    k_static: int | None,
    ku: int,
    bcast,
    vload,
) -> str:
    """Zero ``rows`` accumulators of ``width`` lanes, then acc[i] += bcast(i, k) * vload(k) over k.

    Returns the accumulator name prefix: buffers are ``{prefix}{i}``.
    """
    tag = a.fresh("acc")
    for i in range(rows):
        a(ind, f'{tag}{i} = T.alloc_buffer(({width},), "float32")')
    for i in range(rows):
        a(ind, f"for v in T.vectorized({width}):")
        a(ind + 1, f"{tag}{i}[v] = T.float32(0)")

    def body(ind2: int, k: str) -> None:
        for i in range(rows):
            a(ind2, f"for v in T.vectorized({width}):")
            a(ind2 + 1, f"{tag}{i}[v] = {tag}{i}[v] + {bcast(i, k)} * {vload(k, 'v')}")

    if k_static is not None:
        full, rest = divmod(k_static, ku)
        if full:
            a(ind, f"for ko in range({full}):")
            a(ind + 1, f"for ku in T.unroll({ku}):")
            body(ind + 2, f"ko * {ku} + ku")
        if rest:
            a(ind, f"for kt in T.unroll({rest}):")
            body(ind + 1, f"{full * ku} + kt")
    else:
        a(ind, f"for ko in range({k_extent} // {ku}):")
        a(ind + 1, f"for ku in T.unroll({ku}):")
        body(ind + 2, f"ko * {ku} + ku")
        a(ind, f"for kt in range({k_extent} % {ku}):")
        body(ind + 1, f"{k_extent} // {ku} * {ku} + kt")
    return tag


# --------------------------------------------------------------------------------------------------------------
# dense matmul with a constant weight
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    """A generated PrimFunc and the constant arrays (already laid out) it takes after the activation input."""

    name: str
    func: object
    consts: list[np.ndarray]
    source: str


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
) -> Kernel:
    """Y[m, N] = X[m, K] @ W[K, N] (+ bias) (relu). m is symbolic unless m_static is given."""
    k_dim, n_dim = (int(d) for d in w_kn.shape)
    nr, ku = params.nr, params.ku
    mr = _choose_mr(params, m_static)
    np_ = _ceil(n_dim, nr)
    full_panels = n_dim // nr
    m = "m" if m_static is None else str(m_static)
    mt = f"(({m} + {mr - 1}) // {mr})"
    a = _Src()
    args = ["x: T.handle", "w: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a(0, "@T.prim_func")
    a(0, f"def {name}({', '.join(args)}):")
    a(1, 'T.func_attr({"tir.noalias": True})')
    if m_static is None:
        a(1, "m = T.int64()")
    a(1, f'X = T.match_buffer(x, ({m}, {k_dim}), "float32")')
    a(1, f'W = T.match_buffer(w, ({np_}, {k_dim}, {nr}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({n_dim},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({m}, {n_dim}), "float32")')
    a(1, f"for t in {_loop(m_static * k_dim * n_dim if m_static is not None else None)}({np_} * {mt}):")
    panel = f"(t // {mt})"
    tile = f"(t % {mt})"

    def emit_tile(ind: int, rows: int, row0: str) -> None:
        acc = _tile_accumulate(
            a,
            ind,
            rows=rows,
            width=nr,
            k_extent=str(k_dim),
            k_static=k_dim,
            ku=ku,
            bcast=lambda i, k: f"X[{row0} + {i}, {k}]",
            vload=lambda k, v: f"W[{panel}, {k}, {v}]",
        )

        def store(ind2: int, width_expr: str, vec: bool) -> None:
            for i in range(rows):
                col = f"{panel} * {nr} + v"
                val = _epilogue(f"{acc}{i}[v]", f"B[{col}]" if bias is not None else None, act)
                if vec:
                    a(ind2, f"for v in T.vectorized({nr}):")
                    a(ind2 + 1, f"Y[{row0} + {i}, {col}] = {val}")
                else:
                    scratch = _spill(a, ind2, f"{acc}{i}", nr)
                    val = _epilogue(f"{scratch}[v]", f"B[{col}]" if bias is not None else None, act)
                    a(ind2, f"for v in range({width_expr}):")
                    a(ind2 + 1, f"Y[{row0} + {i}, {col}] = {val}")

        if n_dim % nr == 0:
            store(ind, "", True)
        else:
            if full_panels:
                a(ind, f"if {panel} < {full_panels}:")
                store(ind + 1, "", True)
                a(ind, "else:")
                store(ind + 1, str(n_dim - full_panels * nr), False)
            else:
                store(ind, str(n_dim), False)

    _row_tiles(a, 2, m=m, m_static=m_static, mr=mr, tile=tile, emit_tile=emit_tile)
    src = a.text()
    consts = [pack_dense_weight(w_kn, nr)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(n_dim))
    return Kernel(name, _parse(src, name), consts, src)


def _choose_mr(params: CpuKernelParams, m_static: int | None, mr: int | None = None) -> int:
    mr = mr or params.mr
    if m_static is None or m_static % mr == 0:
        return mr
    # A static row count: prefer a tile height that divides it (no tail) if one is at least two thirds of mr.
    for cand in range(mr, max(4, (2 * mr) // 3) - 1, -1):
        if m_static % cand == 0:
            return cand
    return mr


# --------------------------------------------------------------------------------------------------------------
# block-sparse (BSR) weights
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BSR:
    """Block-sparse rows of a weight viewed as [out, in]: blocks of br outputs x bc inputs."""

    data: np.ndarray  # [nnz, br, bc]
    indices: np.ndarray  # [nnz] block column (input) index, int32
    indptr: np.ndarray  # [n_block_rows + 1], int32
    shape: tuple[int, int]  # (out, in) of the unpadded weight
    block: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        out, inp = self.shape
        br, bc = self.block
        total = _ceil(out, br) * _ceil(inp, bc)
        return self.nnz / total if total else 0.0


def to_bsr(w_out_in: np.ndarray, block: tuple[int, int]) -> BSR:
    """Convert a dense [out, in] weight to BSR with blocks (br, bc); zero blocks are dropped, tails zero padded."""
    out, inp = (int(d) for d in w_out_in.shape)
    br, bc = block
    nbr, nbc = _ceil(out, br), _ceil(inp, bc)
    padded = np.zeros((nbr * br, nbc * bc), dtype=np.float32)
    padded[:out, :inp] = w_out_in
    blocks = padded.reshape(nbr, br, nbc, bc).transpose(0, 2, 1, 3)  # [nbr, nbc, br, bc]
    nonzero = np.any(blocks != 0, axis=(2, 3))
    rows, cols = np.nonzero(nonzero)
    data = blocks[rows, cols]
    indptr = np.zeros(nbr + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=nbr), out=indptr[1:])
    if data.shape[0] == 0:  # keep buffers non-empty; indptr says there is nothing to read
        data = np.zeros((1, br, bc), dtype=np.float32)
        cols = np.zeros(1, dtype=np.int64)
    return BSR(
        np.ascontiguousarray(data, dtype=np.float32),
        np.ascontiguousarray(cols, dtype=np.int32),
        indptr,
        (out, inp),
        (br, bc),
    )


TILE_MAJOR = True  # tasks ordered token tile first: one tile of XT is shared by consecutive block rows (~8% faster)
SCALED_INDICES = True  # pre-multiply block indices into row offsets where the activation layout is static
BSR_UNROLL = 1  # blocks per iteration of the block loop (2 and 4 measured no faster on AVX-512)


def _bsr_accumulate(
    a: _Src,
    ind: int,
    *,
    br: int,
    bc: int,
    vt: int,
    chunk: int,
    block_row: str,
    vload,
    row_stride: int | None = None,
) -> tuple[str, list[int]]:
    """acc{r}_{c}[chunk] (r < br, c < vt / chunk) += D[j, r, :] * vload(k, c * chunk + v) over the blocks j of
    ``block_row``. Returns the buffer prefix and the chunk offsets.

    With ``row_stride`` the indices I are pre-multiplied by bc * row_stride (see ``scaled_indices``) and vload
    receives the element offset of the row instead of its index (saves the multiply per block)."""
    tag = a.fresh("acc")
    offsets = list(range(0, vt, chunk))
    # int64 loop bounds: an int32 loop variable costs a sign extension per block in the address arithmetic
    start, stop = f'T.Cast("int64", P[{block_row}])', f'T.Cast("int64", P[{block_row} + 1])'
    for r in range(br):
        for c, _ in enumerate(offsets):
            a(ind, f'{tag}{r}_{c} = T.alloc_buffer(({chunk},), "float32")')
    for r in range(br):
        for c, _ in enumerate(offsets):
            a(ind, f"for v in T.vectorized({chunk}):")
            a(ind + 1, f"{tag}{r}_{c}[v] = T.float32(0)")

    def body(ind2: int, j: str) -> None:
        for cc in range(bc):
            if row_stride is not None:
                kexpr = f"I[{j}] + {cc * row_stride}" if cc else f"I[{j}]"
            else:
                kexpr = f"I[{j}] * {bc} + {cc}" if bc > 1 else f"I[{j}]"
            for r in range(br):
                for c, off in enumerate(offsets):
                    a(ind2, f"for v in T.vectorized({chunk}):")
                    a(ind2 + 1, f"{tag}{r}_{c}[v] = {tag}{r}_{c}[v] + D[{j}, {r}, {cc}] * {vload(kexpr, f'{off} + v')}")

    u = BSR_UNROLL
    if u <= 1:
        a(ind, f"for j in range({start}, {stop}):")
        body(ind + 1, "j")
    else:
        a(ind, f"for jj in range(({stop} - {start}) // {u}):")
        for q in range(u):
            body(ind + 1, f"{start} + jj * {u} + {q}")
        a(ind, f"for jt in range(({stop} - {start}) % {u}):")
        body(ind + 1, f"{start} + ({stop} - {start}) // {u} * {u} + jt")
    return tag, offsets


def scaled_indices(bsr: BSR, row_stride: int) -> np.ndarray:
    """Block column indices as element offsets of the first input row of each block (int32)."""
    scaled = bsr.indices.astype(np.int64) * bsr.block[1] * row_stride
    if scaled.size and scaled.max() >= 2**31:
        raise ValueError("activation buffer too large for int32 offsets")
    return scaled.astype(np.int32)


def _bsr_buffers(a: _Src, bsr: BSR) -> None:
    br, bc = bsr.block
    a(1, f'D = T.match_buffer(d, ({bsr.data.shape[0]}, {br}, {bc}), "float32")')
    a(1, f'I = T.match_buffer(i, ({bsr.indices.shape[0]},), "int32")')
    a(1, f'P = T.match_buffer(p, ({bsr.indptr.shape[0]},), "int32")')


def _token_tile(params: CpuKernelParams, br: int, m_static: int | None) -> int:
    """Tokens per full BSR tile: the widest register tile, unless a narrower one (down to 4 vectors) divides a static
    token count (128 tokens: 2 x 64 beats 96 + a half-efficient 32-token tail)."""
    full = params.bsr_tile(br)
    if m_static is None or m_static % full == 0:
        return full
    chunk = params.bsr_chunk(br)
    for cand in range(full - chunk, 4 * params.lanes - 1, -chunk):
        if m_static % cand == 0:
            return cand
    return full


def bsr_matmul(
    name: str,
    bsr: BSR,
    bias: np.ndarray | None,
    act: str | None,
    params: CpuKernelParams,
    m_static: int | None = None,
) -> Kernel:
    """Y[m, N] = X[m, K] @ W[K, N] with W^T = bsr ([N, K]); vectorised over m through a transposed copy of X."""
    n_dim, k_dim = bsr.shape
    br, bc = bsr.block
    vt = _token_tile(params, br, m_static)
    nbr = _ceil(n_dim, br)
    kp = _ceil(k_dim, bc) * bc
    m = "m" if m_static is None else str(m_static)
    mtv = f"(({m} + {vt - 1}) // {vt})"
    chunk = params.bsr_chunk(br)
    # XT is flat when m is static (row offsets are then pre-multiplied into the block indices)
    flat = m_static is not None and SCALED_INDICES
    mp = _ceil(m_static, vt) * vt if flat else None
    a = _Src()
    args = ["x: T.handle", "d: T.handle", "i: T.handle", "p: T.handle"]
    args += (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a(0, "@T.prim_func")
    a(0, f"def {name}({', '.join(args)}):")
    a(1, 'T.func_attr({"tir.noalias": True})')
    if m_static is None:
        a(1, "m = T.int64()")
    a(1, f'X = T.match_buffer(x, ({m}, {k_dim}), "float32")')
    _bsr_buffers(a, bsr)
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({n_dim},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({m}, {n_dim}), "float32")')
    # stage 1: XT[k, token] (tokens padded to the tile, padded K rows and tokens are zero)
    if flat:
        a(1, f'XT = T.alloc_buffer(({kp * mp},), "float32")')
    else:
        a(1, f'XT = T.alloc_buffer(({kp}, {mtv} * {vt}), "float32")')
    a(1, f"for tt in {_loop(kp * m_static if m_static is not None else None, PARALLEL_MIN_COPY)}({mtv}):")
    a(2, f"for kk in range({kp}):")
    a(3, f"for v in T.vectorized({vt}):")
    dst = f"XT[kk * {mp} + tt * {vt} + v]" if flat else f"XT[kk, tt * {vt} + v]"
    a(
        4,
        f"{dst} = T.if_then_else(tt * {vt} + v < {m} and kk < {k_dim}, "
        f"X[T.min(tt * {vt} + v, {m} - 1), T.min(kk, {k_dim - 1})], T.float32(0))",
    )
    # stage 2: tiles of (block row, tokens): full tiles of vt tokens, then the tail in tiles of one chunk
    if m_static is not None:
        n_full, n_tail = m_static // vt, _ceil(m_static % vt, chunk)
        n_tiles = str(n_full + n_tail)
    else:
        n_full = n_tail = None
        n_tiles = f"({m} // {vt} + ({m} % {vt} + {chunk - 1}) // {chunk})"
    work = bsr.nnz * br * bc * m_static if m_static is not None else None
    a(1, f"for t in {_loop(work)}({nbr} * {n_tiles}):")
    if TILE_MAJOR:
        block_row = f"(t % {nbr})"
        tile = f"(t // {nbr})"
    else:
        block_row = f"(t // {n_tiles})"
        tile = f"(t % {n_tiles})"

    def emit(ind: int, width: int, tok0: str, guard: bool) -> None:
        acc, offsets = _bsr_accumulate(
            a,
            ind,
            br=br,
            bc=bc,
            vt=width,
            chunk=chunk,
            block_row=block_row,
            vload=(lambda k, v: f"XT[{k} + {tok0} + {v}]") if flat else (lambda k, v: f"XT[{k}, {tok0} + {v}]"),
            row_stride=mp,
        )

        def store_scalar(ind: int) -> None:
            """One float per store (tails), read back from a stack copy of the accumulators."""
            for r in range(br):
                ind2 = ind
                col = f"{block_row} * {br} + {r}"
                if n_dim % br:
                    a(ind2, f"if {col} < {n_dim}:")
                    ind2 += 1
                for c, off in enumerate(offsets):
                    scratch = _spill(a, ind2, f"{acc}{r}_{c}", chunk)
                    val = _epilogue(f"{scratch}[v]", f"B[{col}]" if bias is not None else None, act)
                    count = f"T.max(T.min({m} - ({tok0}) - {off}, {chunk}), 0)" if guard else str(chunk)
                    a(ind2, f"for v in range({count}):")
                    a(ind2 + 1, f"Y[{tok0} + {off} + v, {col}] = {val}")

        def store_rows(ind: int) -> None:
            """Transpose through a small stack scratch so that each token writes its br outputs at once."""
            for c, off in enumerate(offsets):
                scratch = a.fresh("tr")
                a(ind, f'{scratch} = T.alloc_buffer(({br}, {chunk}), "float32")')
                for r in range(br):
                    a(ind, f"for v in T.vectorized({chunk}):")
                    a(ind + 1, f"{scratch}[{r}, v] = {acc}{r}_{c}[v]")
                a(ind, f"for v in range({chunk}):")
                col = f"{block_row} * {br} + r"
                val = _epilogue(f"{scratch}[r, v]", f"B[{col}]" if bias is not None else None, act)
                a(ind + 1, f"for r in T.vectorized({br}):")
                a(ind + 2, f"Y[{tok0} + {off} + v, {col}] = {val}")

        store_full = store_rows
        if guard or n_dim % br and nbr == 1:
            store_scalar(ind)
        elif n_dim % br == 0:
            store_full(ind)
        else:
            a(ind, f"if {block_row} < {nbr - 1}:")
            store_full(ind + 1)
            a(ind, "else:")
            store_scalar(ind + 1)

    full = (vt, f"{tile} * {vt}", False)
    tail = (chunk, f"{m} // {vt} * {vt} + ({tile} - {m} // {vt}) * {chunk}", True)
    if n_full is not None and n_tail == 0:
        emit(2, *full)
    elif n_full == 0:
        emit(2, *tail)
    else:
        a(2, f"if {tile} < {m} // {vt}:")
        emit(3, *full)
        a(2, "else:")
        emit(3, *tail)
    src = a.text()
    consts = [bsr.data, scaled_indices(bsr, mp) if flat else bsr.indices, bsr.indptr]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(n_dim))
    return Kernel(name, _parse(src, name), consts, src)


# --------------------------------------------------------------------------------------------------------------
# conv2d (NCHW / OIHW, groups == 1) through im2col, dense or BSR weights
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeom:
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]

    @property
    def oh(self) -> int:
        return (self.h + self.pad[0] + self.pad[2] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.w + self.pad[1] + self.pad[3] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def k(self) -> int:
        return self.c_in * self.kh * self.kw

    @property
    def pixels(self) -> int:
        return self.oh * self.ow

    @property
    def direct(self) -> bool:
        """1x1, stride 1, no padding: the input already is the im2col matrix."""
        return (
            self.kh == 1
            and self.kw == 1
            and self.stride == (1, 1)
            and self.pad == (0, 0, 0, 0)
        )


def pack_conv_weight(w_out_in: np.ndarray, mr: int) -> np.ndarray:
    """[Co, K] -> [ceil(Co/mr), K, mr] so that the mr output channels of one k are adjacent (broadcasts)."""
    co, k = w_out_in.shape
    cot = _ceil(co, mr)
    padded = np.zeros((cot * mr, k), dtype=np.float32)
    padded[:co] = w_out_in
    return np.ascontiguousarray(padded.reshape(cot, mr, k).transpose(0, 2, 1))


FOLD_BATCH_BYTES = 4 << 20  # buffers of a chunk of images: small convolutions run all images in one launch


def _im2col(a: _Src, g: ConvGeom, tile: int, images: int, ind: int = 2, flat: bool = False) -> None:
    """XC[slot, k, p] for the ``images`` images of chunk ``nc`` (image ``nc * images + slot``), pixels padded to a
    multiple of ``tile`` with zeros; one parallel loop over (image, input channel).

    The valid output-column range of each kernel column is computed here (static geometry), so the copy loops have
    no per-element bounds checks (contiguous, vectorisable copies for stride 1)."""
    pp = _ceil(g.pixels, tile) * tile
    loop = _loop(images * g.k * pp, PARALLEL_MIN_COPY)

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


def _conv_tile(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None) -> int:
    """Pixels per tile. Dense: nr, or one vector when an image has fewer pixels than nr (a 4x4 map in a 32-wide
    tile wastes half of every FMA). BSR: ``bsr_conv_tile``."""
    if block is None:
        return params.lanes if g.pixels < params.nr else params.nr
    return bsr_conv_tile(params, block[0], g.pixels)


def bsr_conv_tile(params: CpuKernelParams, br: int, positions: int) -> int:
    """Positions per BSR tile: the widest of (full BSR tile, 4, 2 vectors) dividing ``positions`` (no tail tile);
    else, for fewer positions than a full tile, the narrowest of those and one vector that holds them all (a 4x4
    map in the full 96-wide tile ran BSR at 0.67x of dense at 70% sparsity); else the full tile."""
    full = params.bsr_tile(br)
    for cand in (full, 4 * params.lanes, 2 * params.lanes):
        if cand <= full and positions % cand == 0:
            return cand
    if positions < full:
        return min(c for c in (full, 4 * params.lanes, 2 * params.lanes, params.lanes) if positions <= c <= full)
    return full


def _bsr_conv_chunk(params: CpuKernelParams, br: int, tile: int) -> int:
    """Lanes per BSR accumulator buffer in a tile of ``tile`` positions."""
    chunk = params.bsr_chunk(br)
    return chunk if tile % chunk == 0 else params.lanes


def _images_per_launch(n_static: int | None, per_image: int) -> int:
    """Images computed by one pair of parallel loops: the largest divisor of a static batch whose buffers
    (``per_image`` bytes each, ``conv_buffer_bytes``) stay under FOLD_BATCH_BYTES (small feature maps: one launch
    instead of two per image); 1 for a symbolic batch."""
    if n_static is None or n_static <= 1:
        return 1
    for images in range(n_static, 0, -1):
        if n_static % images == 0 and images * per_image <= FOLD_BATCH_BYTES:
            return images
    return 1


def conv2d_takes_flat_input(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None) -> bool:
    return g.direct and g.pixels % _conv_tile(g, params, block) == 0


def _conv_head(a: _Src, name: str, g: ConvGeom, n_static: int | None, flat: bool, bsr: BSR | None,
               row_tiles: int, rows: int, bias: bool) -> str:
    """The PrimFunc's signature and buffers: X (flat over pixels or not), the weights (packed dense or BSR), the
    bias, Y [N, Co, OH * OW]. Returns the batch extent."""
    n = "n_batch" if n_static is None else str(n_static)
    args = ["x: T.handle"] + (["d: T.handle", "i: T.handle", "p: T.handle"] if bsr is not None else ["w: T.handle"])
    args += (["b: T.handle"] if bias else []) + ["y: T.handle"]
    a(0, "@T.prim_func")
    a(0, f"def {name}({', '.join(args)}):")
    a(1, 'T.func_attr({"tir.noalias": True})')
    if n_static is None:
        a(1, "n_batch = T.int64()")
    if flat:
        a(1, f'X = T.match_buffer(x, ({n}, {g.c_in}, {g.h * g.w}), "float32")')
    else:
        a(1, f'X = T.match_buffer(x, ({n}, {g.c_in}, {g.h}, {g.w}), "float32")')
    if bsr is not None:
        _bsr_buffers(a, bsr)
    else:
        a(1, f'W = T.match_buffer(w, ({row_tiles}, {g.k}, {rows}), "float32")')
    if bias:
        a(1, f'B = T.match_buffer(b, ({g.c_out},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {g.c_out}, {g.pixels}), "float32")')
    return n


SHIFTED_MAX_WORK = 1.15  # product positions of the shifted form (padding columns included) over im2col's, at most
SHIFTED = True  # False: im2col for every convolution (A/B timing of the two forms)


@dataclass(frozen=True)
class _Planes:
    """How a convolution reads its input as shifted views of padded planes (``_conv2d_shifted``)."""

    hq: int  # rows of a plane
    wq: int  # width of a plane's rows: also the row stride of the product's output positions
    tile: int  # output positions per product tile
    phases: tuple[tuple[int, int], ...]  # (row, column) phases that some tap reads (stride s: up to s * s planes)
    pp: int  # product positions per image: OH * wq rounded up to whole tiles
    length: int  # floats per plane: its rows, and room for every tap's view of every tile

    @property
    def per_channel(self) -> int:
        """Floats of one input channel's planes."""
        return len(self.phases) * self.length

    def buffer_bytes(self, g: ConvGeom) -> int:
        """Bytes per image of the planes and of the product's output (with its extra columns)."""
        return 4 * (g.c_in * self.per_channel + g.c_out * self.pp)

    def tap(self, g: ConvGeom, kh: int, kw: int) -> tuple[int, int]:
        """(plane, offset in it) that tap (kh, kw) reads for output position 0."""
        (sh, sw), (dh, dw) = g.stride, g.dilation
        return (self.phases.index((kh * dh % sh, kw * dw % sw)),
                (kh * dh // sh) * self.wq + kw * dw // sw)


def _shifted_planes(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None = None) -> _Planes | None:
    """The planes a convolution (dense, or BSR with one input channel per block) reads when shifted views cost
    less than an im2col matrix: little more product work (im2col pads pixels to whole tiles; the shifted form
    computes (KW - 1) / stride extra columns per row, so 7x7 maps lose nothing and 8x8 ones 50%) and less to copy
    (the planes and the output less its extra columns, against im2col's K x pixels). Measured 1.05-1.6x faster
    than im2col on 14x14 to 56x56 maps (a 7x7/2 stem 1.3x), 0.8-0.9x on 8x8 ones."""
    if not SHIFTED or g.direct or (block is not None and block[1] != 1):
        return None
    positions = g.oh * _plane_width(g)
    tile = params.nr if block is None else bsr_conv_tile(params, block[0], positions)
    if block is None and params.nr < positions <= 2 * params.nr:
        tile = 2 * params.nr  # a 7x7 map: one tile per image (see _conv2d_shifted)
    planes = _planes(g, tile)
    im2col_tile = _conv_tile(g, params, block)
    if planes.pp > SHIFTED_MAX_WORK * _ceil(g.pixels, im2col_tile) * im2col_tile:
        return None
    if g.c_in * len(planes.phases) * planes.hq * planes.wq + g.c_out * g.pixels >= g.k * g.pixels:
        return None  # few input channels, or a strided 1x1: the planes and the compaction outweigh im2col
    return planes


def _plane_width(g: ConvGeom) -> int:
    """Columns of a plane: the padded width over the column stride (also the product's output row stride)."""
    return _ceil(g.w + g.pad[1] + g.pad[3], g.stride[1])


def _planes(g: ConvGeom, tile: int) -> _Planes:
    """The plane layout of ``g`` for product tiles of ``tile`` positions."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    hq, wq = _ceil(g.h + g.pad[0] + g.pad[2], sh), _plane_width(g)
    phases = tuple(sorted({(kh * dh % sh, kw * dw % sw) for kh in range(g.kh) for kw in range(g.kw)}))
    pp = _ceil(g.oh * wq, tile) * tile
    reach = ((g.kh - 1) * dh // sh) * wq + (g.kw - 1) * dw // sw
    return _Planes(hq, wq, tile, phases, pp, max(pp + reach, hq * wq))


def plane_offsets(g: ConvGeom, planes: _Planes, columns: np.ndarray) -> np.ndarray:
    """Element offsets in one image's planes of the views that im2col columns k = (ci, kh, kw) read (int32)."""
    per_channel = planes.per_channel
    taps = [plane * planes.length + offset
            for plane, offset in (planes.tap(g, kh, kw) for kh in range(g.kh) for kw in range(g.kw))]
    offsets = (np.arange(g.c_in, dtype=np.int64)[:, None] * per_channel + np.array(taps)).reshape(-1)[columns]
    if offsets.size and offsets.max() >= 2**31:
        raise ValueError("activation buffer too large for int32 offsets")
    return offsets.astype(np.int32)


def conv_buffer_bytes(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None) -> int:
    """Bytes of the per-image buffers a convolution fills before or after its product: the padded planes and the
    output with its extra columns (shifted form), the im2col matrix, or nothing (1x1 on whole tiles)."""
    planes = _shifted_planes(g, params, block)
    if planes is not None:
        return planes.buffer_bytes(g)
    if conv2d_takes_flat_input(g, params, block):
        return 0
    tile = _conv_tile(g, params, block)
    return 4 * g.k * _ceil(g.pixels, tile) * tile


def _copy_planes(a: _Src, g: ConvGeom, planes: _Planes, images: int) -> None:
    """XP[image, ci, phase] = the zero-padded input at rows ``i * sh + a``, columns ``j * sw + b``, flat with row
    width wq, zeros up to the plane's length; one (parallel) loop over (image, input channel). The valid rows and
    columns of each phase are resolved here, so the copy loops have no bounds checks."""
    (sh, sw), (pt, pl) = g.stride, g.pad[:2]
    length, wq = planes.length, planes.wq
    a(2, f"for q in {_loop(images * g.c_in * planes.per_channel, PARALLEL_MIN_COPY)}({images * g.c_in}):")
    img = f"(nc * {images} + q // {g.c_in})" if images > 1 else "nc"

    def valid(phase: int, pad: int, step: int, size: int, count: int) -> tuple[int, int]:
        """The plane indices i in [lo, hi) whose input index i * step + phase - pad lies in [0, size)."""
        lo = max(0, _ceil(pad - phase, step))
        return lo, max(lo, min(count, (size - 1 + pad - phase) // step + 1))

    for ph, (ra, cb) in enumerate(planes.phases):
        base = f"q * {planes.per_channel} + {ph * length}"
        i_lo, i_hi = valid(ra, pt, sh, g.h, planes.hq)
        j_lo, j_hi = valid(cb, pl, sw, g.w, wq)

        def zeros(start: int, count: int, ind: int, row: str = "") -> None:
            if count > 0:
                a(ind, f"for z in range({count}):")
                a(ind + 1, f"XP[{base} + {row}{start} + z] = T.float32(0)")

        zeros(0, i_lo * wq, 3)
        if i_hi > i_lo:
            a(3, f"for i in range({i_hi - i_lo}):")
            row = f"(i + {i_lo}) * {wq} + "
            zeros(0, j_lo, 4, row)
            if j_hi > j_lo:
                a(4, f"for j in range({j_hi - j_lo}):")
                src = f"X[{img}, q % {g.c_in}, (i + {i_lo}) * {sh} + {ra - pt}, (j + {j_lo}) * {sw} + {cb - pl}]"
                a(5, f"XP[{base} + {row}{j_lo} + j] = {src}")
            zeros(j_hi, wq - j_hi, 4, row)
        zeros(i_hi * wq, length - i_hi * wq, 3)


def _drop_extra_columns(a: _Src, g: ConvGeom, planes: _Planes, images: int) -> None:
    """Y[image, c, oh * OW + ow] = YP[image, c, oh * wq + ow]: contiguous row copies."""
    a(2, f"for q in {_loop(images * g.c_out * g.pixels, PARALLEL_MIN_COPY)}({images * g.c_out}):")
    img = f"(nc * {images} + q // {g.c_out})" if images > 1 else "nc"
    a(3, f"for oh in range({g.oh}):")
    a(4, f"for ow in range({g.ow}):")
    a(5, f"Y[{img}, q % {g.c_out}, oh * {g.ow} + ow] = YP[q * {planes.pp} + oh * {planes.wq} + ow]")


def _conv2d_shifted(name: str, g: ConvGeom, planes: _Planes, w_out_in: np.ndarray, bias: np.ndarray | None,
                    act: str | None, params: CpuKernelParams, n_static: int | None, bsr: BSR | None) -> Kernel:
    """A convolution without im2col. Each image is copied once into zero-padded planes, one per input channel and
    stride phase (a stride-2 kernel reads 4: even/odd rows x even/odd columns), flat with row width wq. Output
    position q = oh * wq + ow of tap (kh, kw) reads its plane at q + (kh * dh // sh) * wq + kw * dw // sw, so every
    row of the virtual im2col matrix is a contiguous view (9x less copying for a 3x3 kernel). The product (dense,
    or BSR through a table of view offsets) runs over OH * wq positions into YP; the extra columns of each row are
    dropped when YP is copied to Y. A dense layer on a map of 33-64 positions (7x7) takes them all in one tile of
    twice the width and half the rows: its weights (2.4-9.4 MB on ResNet's last stage, coming from memory in a
    model run) are then read once per image instead of once per 32-position tile; ResNet-18's 7x7 convolutions
    4.0 -> 2.8 ms in the model (no change timed alone, where the weights stay in cache)."""
    sparse = bsr is not None
    tile_w = planes.tile
    if sparse:
        rows = bsr.block[0]
    elif tile_w > params.nr:  # one double-width tile per image: half the rows, each weight read once per run
        rows = min(g.c_out, params.mr * params.nr // tile_w)
    else:
        rows = min(g.c_out, _choose_mr(params, g.c_out))
    n_row_tiles = _ceil(g.c_out, rows)
    pp, n_ptiles = planes.pp, planes.pp // tile_w
    per_channel = planes.per_channel
    images = _images_per_launch(n_static, planes.buffer_bytes(g))
    a = _Src()
    n = _conv_head(a, name, g, n_static, False, bsr, n_row_tiles, rows, bias is not None)
    a(1, f'XP = T.alloc_buffer(({images * g.c_in * per_channel},), "float32")')
    a(1, f'YP = T.alloc_buffer(({images * g.c_out * pp},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    _copy_planes(a, g, planes, images)
    # the product: pixel-tile major, output-channel tiles inner (one tile of plane views stays in cache)
    per_image = n_row_tiles * n_ptiles
    work = images * g.pixels * (bsr.nnz * rows if sparse else g.c_out * g.k)
    a(2, f"for t in {_loop(work)}({images * per_image}):")
    row_tile = f"(t % {n_row_tiles})"
    ptile = f"(t % {per_image} // {n_row_tiles})"
    slot = f"(t // {per_image})" if images > 1 else "0"
    image_planes = f"{slot} * {g.c_in * per_channel}"
    if sparse:  # I holds each block's view offset (plane_offsets)
        chunk = _bsr_conv_chunk(params, rows, tile_w)
        acc, offsets = _bsr_accumulate(a, 3, br=rows, bc=1, vt=tile_w, chunk=chunk, block_row=row_tile,
                                       vload=lambda k, v: f"XP[{image_planes} + {k} + {ptile} * {tile_w} + {v}]",
                                       row_stride=1)
        chunks = [[(f"{acc}{r}_{c}", off, chunk) for c, off in enumerate(offsets)] for r in range(rows)]
    else:
        acc = a.fresh("acc")
        for i in range(rows):
            a(3, f'{acc}{i} = T.alloc_buffer(({tile_w},), "float32")')
        for i in range(rows):
            a(3, f"for v in T.vectorized({tile_w}):")
            a(4, f"{acc}{i}[v] = T.float32(0)")
        a(3, f"for ci in range({g.c_in}):")
        for kh in range(g.kh):
            for kw in range(g.kw):
                plane, offset = planes.tap(g, kh, kw)
                view = (f"XP[{image_planes} + ci * {per_channel} + {plane * planes.length + offset}"
                        f" + {ptile} * {tile_w} + v]")
                k = f"ci * {g.kh * g.kw} + {kh * g.kw + kw}"
                for i in range(rows):
                    a(4, f"for v in T.vectorized({tile_w}):")
                    a(5, f"{acc}{i}[v] = {acc}{i}[v] + W[{row_tile}, {k}, {i}] * {view}")
        chunks = [[(f"{acc}{r}", 0, tile_w)] for r in range(rows)]
    for r in range(rows):
        ind = 3
        co = f"{row_tile} * {rows} + {r}"
        if g.c_out % rows:
            a(ind, f"if {co} < {g.c_out}:")
            ind += 1
        for buf, off, size in chunks[r]:
            a(ind, f"for v in T.vectorized({size}):")
            val = _epilogue(f"{buf}[v]", f"B[{co}]" if bias is not None else None, act)
            a(ind + 1, f"YP[{slot} * {g.c_out * pp} + ({co}) * {pp} + {ptile} * {tile_w} + {off} + v] = {val}")
    _drop_extra_columns(a, g, planes, images)
    src = a.text()
    if sparse:
        consts = [bsr.data, plane_offsets(g, planes, bsr.indices), bsr.indptr]
    else:
        consts = [pack_conv_weight(w_out_in, rows)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(g.c_out))
    return Kernel(name, _parse(src, name), consts, src)


def conv2d(
    name: str,
    g: ConvGeom,
    w_out_in: np.ndarray,
    bias: np.ndarray | None,
    act: str | None,
    params: CpuKernelParams,
    bsr: BSR | None = None,
    n_static: int | None = None,
) -> Kernel:
    """Y[n, co, oh * OW + ow] = sum W[co, ci, kh, kw] X[n, ci, ...] (+ bias) (relu); dense if bsr is None.

    The output is flat over pixels ([N, Co, OH*OW]); for a direct (1x1, stride 1, unpadded) convolution whose
    pixel count fills whole tiles the input is flat too ([N, Ci, H*W]), otherwise it is [N, Ci, H, W]. The
    caller reshapes (free in Relax). ``conv2d_takes_flat_input`` says which. The right operand is shifted views
    of padded planes where they cost less than im2col (``_shifted_planes``), else an im2col matrix, or the input
    itself. Images go in chunks (all of a static batch when their buffers are small): one parallel copy and one
    parallel product per chunk.
    """
    sparse = bsr is not None
    planes = _shifted_planes(g, params, bsr.block if sparse else None)
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
    images = _images_per_launch(n_static, conv_buffer_bytes(g, params, bsr.block if sparse else None))
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


# --------------------------------------------------------------------------------------------------------------
# batch matmul of two activations
# --------------------------------------------------------------------------------------------------------------


def batch_matmul(
    name: str,
    params: CpuKernelParams,
    batch: int | None,
    m_static: int | None,
    k_static: int | None,
    n_static: int | None,
) -> Kernel:
    """C[b, m, n] = A[b, m, k] @ B[b, k, n]; any of b, m, k, n may be symbolic (None)."""
    nr, ku = params.nr, params.ku
    mr = _choose_mr(params, m_static)
    bs = "bb" if batch is None else str(batch)
    m = "m" if m_static is None else str(m_static)
    k = "kd" if k_static is None else str(k_static)
    n = "nd" if n_static is None else str(n_static)
    pack = n_static is None or n_static % nr != 0
    np_ = f"(({n} + {nr - 1}) // {nr})"
    mt = f"(({m} + {mr - 1}) // {mr})"
    a = _Src()
    a(0, "@T.prim_func")
    a(0, f"def {name}(a: T.handle, b: T.handle, c: T.handle):")
    a(1, 'T.func_attr({"tir.noalias": True})')
    for sym, static in (("bb", batch), ("m", m_static), ("kd", k_static), ("nd", n_static)):
        if static is None:
            a(1, f"{sym} = T.int64()")
    a(1, f'A = T.match_buffer(a, ({bs}, {m}, {k}), "float32")')
    a(1, f'B = T.match_buffer(b, ({bs}, {k}, {n}), "float32")')
    a(1, f'C = T.match_buffer(c, ({bs}, {m}, {n}), "float32")')
    if pack:
        a(1, f'BP = T.alloc_buffer(({bs}, {np_}, {k}, {nr}), "float32")')
        a(1, f"for t in T.parallel({bs} * {np_}):")
        a(2, f"for kk in range({k}):")
        a(3, f"for v in T.vectorized({nr}):")
        col = f"t % {np_} * {nr} + v"
        a(
            4,
            f"BP[t // {np_}, t % {np_}, kk, v] = T.if_then_else({col} < {n}, "
            f"B[t // {np_}, kk, T.min({col}, {n} - 1)], T.float32(0))",
        )
    a(1, f"for t in T.parallel({bs} * {np_} * {mt}):")
    bidx = f"(t // ({np_} * {mt}))"
    panel = f"(t % ({np_} * {mt}) // {mt})"
    tile = f"(t % {mt})"
    full_panels = None if n_static is None else n_static // nr

    def vload(kx: str, v: str) -> str:
        if pack:
            return f"BP[{bidx}, {panel}, {kx}, {v}]"
        return f"B[{bidx}, {kx}, {panel} * {nr} + {v}]"

    def emit_tile(ind: int, rows: int, row0: str) -> None:
        acc = _tile_accumulate(
            a,
            ind,
            rows=rows,
            width=nr,
            k_extent=k,
            k_static=k_static,
            ku=ku,
            bcast=lambda i, kx: f"A[{bidx}, {row0} + {i}, {kx}]",
            vload=vload,
        )

        def store(ind2: int, vec: bool) -> None:
            for i in range(rows):
                if vec:
                    a(ind2, f"for v in T.vectorized({nr}):")
                    a(ind2 + 1, f"C[{bidx}, {row0} + {i}, {panel} * {nr} + v] = {acc}{i}[v]")
                else:
                    scratch = _spill(a, ind2, f"{acc}{i}", nr)
                    a(ind2, f"for v in range(T.min({n} - {panel} * {nr}, {nr})):")
                    a(ind2 + 1, f"C[{bidx}, {row0} + {i}, {panel} * {nr} + v] = {scratch}[v]")

        if not pack:
            store(ind, True)
        else:
            cond = f"{panel} < {n} // {nr}" if full_panels is None else f"{panel} < {full_panels}"
            a(ind, f"if {cond}:")
            store(ind + 1, True)
            a(ind, "else:")
            store(ind + 1, False)

    _row_tiles(a, 2, m=m, m_static=m_static, mr=mr, tile=tile, emit_tile=emit_tile)
    src = a.text()
    return Kernel(name, _parse(src, name), [], src)


# --------------------------------------------------------------------------------------------------------------
# row-wise normalisations (vectorised reductions: TVM's legalized reductions are serial scalar chains)
# --------------------------------------------------------------------------------------------------------------


def _fast_exp(x: str) -> str:
    """exp(x) as a vectorisable polynomial (the scheme of TVM's topi.fast_exp; max rel. error ~3e-7)."""
    xc = f"T.max(T.min({x}, T.float32(88.3762626647949)), T.float32(-88.3762626647949))"
    n = f"T.floor({xc} * T.float32(1.44269504088896341) + T.float32(0.5))"
    r = f"({xc} - {n} * T.float32(0.693147180559945))"
    p = "T.float32(1.9875691500e-4)"
    for c in ("1.3981999507e-3", "8.3334519073e-3", "4.1665795894e-2", "1.6666665459e-1", "5.0000001201e-1"):
        p = f"({p} * {r} + T.float32({c}))"
    poly = f"({p} * {r} * {r} + {r} + T.float32(1))"
    two_n = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {n}) + 127, 23))'
    return f"({poly} * {two_n})"


def _row_head(a: _Src, name: str, args: list[str], rows_static: int | None, d: int, bufs: list[tuple[str, str]]):
    rows = "rows" if rows_static is None else str(rows_static)
    a(0, "@T.prim_func")
    a(0, f"def {name}({', '.join(args)}):")
    a(1, 'T.func_attr({"tir.noalias": True})')
    if rows_static is None:
        a(1, "rows = T.int64()")
    for var, decl in bufs:
        a(1, f"{var} = T.match_buffer({decl.format(rows=rows, d=d)})")
    return rows


def _lane_sum(a: _Src, ind: int, acc: str, out: str, lanes: int, op: str = "+") -> None:
    a(ind, f"{out}[0] = {acc}[0]")
    a(ind, f"for v in T.unroll({lanes - 1}):")
    if op == "+":
        a(ind + 1, f"{out}[0] = {out}[0] + {acc}[v + 1]")
    else:
        a(ind + 1, f"{out}[0] = T.max({out}[0], {acc}[v + 1])")


def layer_norm(
    name: str, d: int, eps: float, gamma: np.ndarray | None, beta: np.ndarray | None, params: CpuKernelParams,
    rows_static: int | None = None,
) -> Kernel:
    """Y[r, :] = (X[r, :] - mean) / sqrt(var + eps) * gamma + beta over the last axis (length d)."""
    lanes = params.lanes
    full, rest = divmod(d, lanes)
    if gamma is None and beta is None:  # see softmax: keep a second input
        gamma = np.ones(d, np.float32)
    args = ["x: T.handle"] + (["g: T.handle"] if gamma is not None else []) + (["b: T.handle"] if beta is not None else [])
    args.append("y: T.handle")
    bufs = [("X", 'x, ({rows}, {d}), "float32"')]
    if gamma is not None:
        bufs.append(("G", 'g, ({d},), "float32"'))
    if beta is not None:
        bufs.append(("Bt", 'b, ({d},), "float32"'))
    bufs.append(("Y", 'y, ({rows}, {d}), "float32"'))
    a = _Src()
    rows = _row_head(a, name, args, rows_static, d, bufs)
    a(1, f"for r in T.parallel({rows}):")
    a(2, f'acc = T.alloc_buffer(({lanes},), "float32")')
    a(2, 'tot = T.alloc_buffer((1,), "float32")')
    a(2, 'mean = T.alloc_buffer((1,), "float32")')
    a(2, 'rstd = T.alloc_buffer((1,), "float32")')
    for phase in ("sum", "var"):
        a(2, f"for v in T.vectorized({lanes}):")
        a(3, "acc[v] = T.float32(0)")
        term = (lambda i: f"X[r, {i}]") if phase == "sum" else (lambda i: f"(X[r, {i}] - mean[0]) * (X[r, {i}] - mean[0])")
        if full:
            a(2, f"for q in range({full}):")
            a(3, f"for v in T.vectorized({lanes}):")
            a(4, f"acc[v] = acc[v] + {term(f'q * {lanes} + v')}")
        _lane_sum(a, 2, "acc", "tot", lanes)
        for i in range(rest):
            a(2, f"tot[0] = tot[0] + {term(str(full * lanes + i))}")
        if phase == "sum":
            a(2, f"mean[0] = tot[0] * T.float32({1.0 / d!r})")
        else:
            a(2, f"rstd[0] = T.rsqrt(tot[0] * T.float32({1.0 / d!r}) + T.float32({float(eps)!r}))")

    def norm(i: str) -> str:
        val = f"(X[r, {i}] - mean[0]) * rstd[0]"
        if gamma is not None:
            val = f"{val} * G[{i}]"
        if beta is not None:
            val = f"{val} + Bt[{i}]"
        return val

    _store_row(a, full, rest, lanes, norm)
    src = a.text()
    consts = [np.ascontiguousarray(c, dtype=np.float32).reshape(d) for c in (gamma, beta) if c is not None]
    return Kernel(name, _parse(src, name), consts, src)


def _store_row(a: _Src, full: int, rest: int, lanes: int, value) -> None:
    """Y[r, i] = value(i) over a row: ``full`` vectorised chunks of ``lanes``, then ``rest`` scalar columns."""
    if full:
        a(2, f"for q in range({full}):")
        a(3, f"for v in T.vectorized({lanes}):")
        a(4, f"Y[r, q * {lanes} + v] = {value(f'q * {lanes} + v')}")
    if rest:
        a(2, f"for v in range({rest}):")
        a(3, f"Y[r, {full * lanes} + v] = {value(f'{full * lanes} + v')}")


def softmax(name: str, d: int, params: CpuKernelParams, rows_static: int | None = None) -> Kernel:
    """Y[r, :] = softmax(X[r, :]) over the last axis (length d), with a polynomial exp."""
    lanes = params.lanes
    full, rest = divmod(d, lanes)
    a = _Src()
    # S (a constant 1.0) is a second input only because TVM's reshape detection (RewriteDataflowReshape) asserts
    # block-form TIR on any function with exactly one input and one output of the same size.
    rows = _row_head(
        a, name, ["x: T.handle", "s: T.handle", "y: T.handle"], rows_static, d,
        [("X", 'x, ({rows}, {d}), "float32"'), ("S", 's, (1,), "float32"'), ("Y", 'y, ({rows}, {d}), "float32"')],
    )
    a(1, f"for r in T.parallel({rows}):")
    a(2, f'acc = T.alloc_buffer(({lanes},), "float32")')
    a(2, 'mx = T.alloc_buffer((1,), "float32")')
    a(2, 'tot = T.alloc_buffer((1,), "float32")')
    # max
    a(2, f"for v in T.vectorized({lanes}):")
    a(3, "acc[v] = T.float32(-3.4028234663852886e38)")
    if full:
        a(2, f"for q in range({full}):")
        a(3, f"for v in T.vectorized({lanes}):")
        a(4, f"acc[v] = T.max(acc[v], X[r, q * {lanes} + v])")
    _lane_sum(a, 2, "acc", "mx", lanes, op="max")
    for i in range(rest):
        a(2, f"mx[0] = T.max(mx[0], X[r, {full * lanes + i}])")
    # exp and sum (exp written to Y)
    a(2, f"for v in T.vectorized({lanes}):")
    a(3, "acc[v] = T.float32(0)")
    if full:
        a(2, f"for q in range({full}):")
        a(3, f"for v in T.vectorized({lanes}):")
        a(4, f"Y[r, q * {lanes} + v] = {_fast_exp(f'X[r, q * {lanes} + v] - mx[0]')}")
        a(4, f"acc[v] = acc[v] + Y[r, q * {lanes} + v]")
    _lane_sum(a, 2, "acc", "tot", lanes)
    for i in range(rest):
        j = full * lanes + i
        a(2, f"Y[r, {j}] = {_fast_exp(f'X[r, {j}] - mx[0]')}")
        a(2, f"tot[0] = tot[0] + Y[r, {j}]")
    a(2, "tot[0] = S[0] / tot[0]")
    _store_row(a, full, rest, lanes, lambda i: f"Y[r, {i}] * tot[0]")
    src = a.text()
    return Kernel(name, _parse(src, name), [np.ones(1, np.float32)], src)
