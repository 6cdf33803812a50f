"""The pieces every generated kernel is built from: register-blocking parameters of a target, the TVMScript
source builder and parser, the accumulate-a-tile loop, the epilogue, and when a loop nest goes to the thread pool.

Index expressions are written inline, never let-bound (``n = t // 8`` in TVMScript): let-bound image and tile
indices inside a parallel loop made the convolution about 2x slower, at every size measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVATIONS = (None, "relu")  # and any ``Clip`` (ReLU6 is Clip(0, 6))


@dataclass(frozen=True)
class Clip:
    """A fused clip to [lo, hi] (ONNX Clip with constant bounds: ReLU6 in MobileNet-class models)."""

    lo: float
    hi: float

    def __str__(self) -> str:
        return f"clip({self.lo:g},{self.hi:g})"


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


def window_count(size: int, pad_begin: int, pad_end: int, kernel: int, dilation: int, stride: int) -> int:
    """Output positions of a sliding window along one axis (convolution and pooling, floor mode)."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


# below this a launch on the thread pool costs more than it saves (measured on 2 cores: 1M MACs, ~25 us serial, left
# the digits CNN and the 56x56 CNN as fast as 4M did, and ran MobileNetV2's MACs /2 build 1.1-1.2x faster at batch 1,
# whose pruned layers had fallen under 4M onto one thread)
PARALLEL_MIN_MACS = 1 << 20
# likewise for a copy (im2col, planes, transposes), in elements: two threads, 80%-sparse 3x3 layers on 56x56 to
# 14x14 maps ran 1.46-1.74x faster at 32K than at 256K, where their plane copies and output compaction (100-200K
# floats, as long as a sparse product) were serial (bench_kernel_ab.py --rule parallel_copy)
PARALLEL_MIN_COPY = 1 << 15


def _parallel_pays(work: int | None) -> bool:
    """Whether a loop nest doing ``work`` multiply-adds (None: unknown, symbolic sizes) is worth the thread pool: a
    small model's kernels take a few microseconds each, which waking the pool for every one of them doubled. The
    threshold is read when a kernel is generated (tests lower it to force the parallel form)."""
    return work is None or work >= PARALLEL_MIN_MACS


def _loop(work: int | None) -> str:
    """``T.parallel`` for a loop nest doing ``work`` multiply-adds where that pays (``_parallel_pays``), else serial."""
    return "T.parallel" if _parallel_pays(work) else "T.serial"


def _copy_loop(elements: int | None) -> str:
    """``_loop`` for a copy of ``elements`` floats (im2col, planes, transposes)."""
    return "T.parallel" if elements is None or elements >= PARALLEL_MIN_COPY else "T.serial"


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

    def signature(self, name: str, args: list[str], symbolic: tuple[str, ...] = ()) -> None:
        """A PrimFunc's header: its parameters, the no-alias attribute, an int64 variable per symbolic size."""
        self(0, "@T.prim_func")
        self(0, f"def {name}({', '.join(args)}):")
        self(1, 'T.func_attr({"tir.noalias": True})')
        for sym in symbolic:
            self(1, f"{sym} = T.int64()")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


_PARSED: dict[str, object] = {}  # TVMScript source (name-independent) -> PrimFunc; parsing costs ~0.5 s


def source_key(src: str, name: str) -> str:
    """A kernel's source without its name: equal keys, equal kernels (parsed once, compiled once)."""
    return src.replace(f"def {name}(", "def kernel(", 1)


def _parse(src: str, name: str, attrs: dict | None = None):
    import tvm
    from tvm.script import tirx as T

    key = source_key(src, name)
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


def _epilogue(val: str, bias: str | None, act: str | Clip | None) -> str:
    if bias is not None:
        val = f"{val} + {bias}"
    if act == "relu":
        val = f"T.max({val}, T.float32(0))"
    elif isinstance(act, Clip):
        val = f"T.min(T.max({val}, T.float32({act.lo!r})), T.float32({act.hi!r}))"
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


def _zero_accumulators(a: _Src, ind: int, count: int, width: int) -> str:
    """``count`` accumulator buffers of ``width`` lanes, zeroed; returns their name prefix (``{prefix}{i}``)."""
    tag = a.fresh("acc")
    for i in range(count):
        a(ind, f'{tag}{i} = T.alloc_buffer(({width},), "float32")')
    for i in range(count):
        a(ind, f"for v in T.vectorized({width}):")
        a(ind + 1, f"{tag}{i}[v] = T.float32(0)")
    return tag


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
    tag = _zero_accumulators(a, ind, rows, width)

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


@dataclass
class Kernel:
    """A generated PrimFunc and the constant arrays (already laid out) it takes after the activation input."""

    name: str
    func: object
    consts: list[np.ndarray]
    source: str


def _choose_mr(params: CpuKernelParams, m_static: int | None, mr: int | None = None) -> int:
    mr = mr or params.mr
    if m_static is None or m_static % mr == 0:
        return mr
    # A static row count: prefer a tile height that divides it (no tail) if one is at least two thirds of mr.
    for cand in range(mr, max(4, (2 * mr) // 3) - 1, -1):
        if m_static % cand == 0:
            return cand
    return mr
