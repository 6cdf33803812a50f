"""spc's hand-written TVM kernels against numpy on awkward shapes (every tail path), and the block sparsifier."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from spc.passes.sparsify import block_mask, sparsify  # noqa: E402
from spc.targets import get_target, kernels  # noqa: E402
from spc.targets.cost import estimate  # noqa: E402
from spc.targets.kernels.source import Clip  # noqa: E402

SPEC = get_target("x86")
PARAMS = SPEC.cpu_kernels
HOST_RUNS = SPEC.runs_here()


def _build(kern):
    return tvm.compile(tvm.IRModule({kern.name: kern.func}), target=SPEC.tvm())


def _run(lib, kern, arrays, out_shape):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in list(arrays) + kern.consts]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib[kern.name](*args, out)
    return out.numpy()


def _sparse(rng, shape, keep=0.3):
    return (rng.standard_normal(shape) * (rng.random(shape) < keep)).astype(np.float32)


pytestmark = pytest.mark.skipif(not HOST_RUNS, reason="x86 AVX-512 kernels need an AVX-512 host")


@pytest.fixture
def direct_forms(monkeypatch):
    """No Winograd: the tests of the direct forms see them on 3x3 stride-1 layers too."""
    monkeypatch.setattr(kernels.conv_winograd, "WINOGRAD", False)


@pytest.mark.parametrize("k,n", [(67, 100), (8, 3), (64, 48), (16, 56)])  # last panels of 4, 3, 16 and 24 columns
def test_dense_matmul_symbolic_rows(k, n):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    kern = kernels.dense_matmul("dense_t", w, b, "relu", PARAMS)
    lib = _build(kern)
    for m in (1, 5, 12, 13, 29):  # full tiles, 4-row and 1-row tails
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = _run(lib, kern, [x], (m, n))
        np.testing.assert_allclose(got, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [7, 24, 1])
def test_dense_matmul_static_rows(m):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((33, 40)).astype(np.float32)
    kern = kernels.dense_matmul("dense_s", w, None, None, PARAMS, m_static=m)
    x = rng.standard_normal((m, 33)).astype(np.float32)
    np.testing.assert_allclose(_run(_build(kern), kern, [x], (m, 40)), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images,parallel", [(None, False), (3, False), (3, True)])
@pytest.mark.parametrize("pixels,k,n", [(49, 40, 24), (13, 20, 70), (196, 96, 16), (196, 32, 48)])
def test_dense_matmul_channels_first(images, parallel, pixels, k, n, monkeypatch):
    """A 1x1 convolution of NCHW images vectorised over output channels (small maps): per image, pixel tiles of
    rows with 4- and 1-row tails, panel tails of output channels; the batch symbolic or static, and a static batch
    in one parallel loop over (image, tile) (forced here: these layers are under the threshold)."""
    if parallel:
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    kern = kernels.dense_matmul("dense_cf", w, b, "relu", PARAMS, None if images is None else images * pixels,
                                channels_first=pixels)
    assert ("T.parallel" in kern.source) == parallel
    lib = _build(kern)
    for count in (1, 3) if images is None else (3,):
        x = rng.standard_normal((count, k, pixels)).astype(np.float32)
        ref = np.maximum(np.einsum("ikp,kn->inp", x, w) + b[None, :, None], 0)
        np.testing.assert_allclose(_run(lib, kern, [x], ref.shape), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,n,block", [(30, 21, (4, 1)), (32, 64, (16, 1)), (33, 10, (2, 2))])
def test_bsr_matmul(k, n, block):
    rng = np.random.default_rng(2)
    w = _sparse(rng, (k, n))
    b = rng.standard_normal(n).astype(np.float32)
    bsr = kernels.to_bsr(w.T, block)
    kern = kernels.bsr_matmul("bsr_t", bsr, b, "relu", PARAMS)
    lib = _build(kern)
    for m in (1, 5, 64, 70, 130):  # tail-only, full tiles, full + tail
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = _run(lib, kern, [x], (m, n))
        np.testing.assert_allclose(got, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-5)


def test_bsr_all_zero_weight():
    w = np.zeros((16, 8), np.float32)
    bsr = kernels.to_bsr(w.T, (4, 1))
    assert bsr.nnz == 0 and bsr.density == 0.0
    kern = kernels.bsr_matmul("bsr_z", bsr, np.ones(8, np.float32), None, PARAMS, m_static=3)
    got = _run(_build(kern), kern, [np.ones((3, 16), np.float32)], (3, 8))
    np.testing.assert_array_equal(got, np.ones((3, 8), np.float32))


CONV_CASES = [
    dict(c_in=3, h=9, w=11, c_out=13, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(c_in=8, h=8, w=8, c_out=16, kh=1, kw=1, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1)),
    dict(c_in=8, h=7, w=7, c_out=20, kh=1, kw=1, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1)),
    dict(c_in=6, h=12, w=10, c_out=8, kh=3, kw=2, stride=(2, 1), pad=(1, 0, 2, 1), dilation=(1, 2)),
    # "same" stride-1 convolutions: asymmetric padding, a kernel wider than the map
    dict(c_in=5, h=6, w=7, c_out=9, kh=2, kw=2, stride=(1, 1), pad=(0, 0, 1, 1), dilation=(1, 1)),
    dict(c_in=4, h=3, w=4, c_out=16, kh=5, kw=5, stride=(1, 1), pad=(2, 2, 2, 2), dilation=(1, 1)),
    # a 4x4 output map (one-vector pixel tiles) with more output channels than one tile of rows
    dict(c_in=6, h=7, w=7, c_out=40, kh=3, kw=3, stride=(2, 2), pad=(1, 1, 1, 1), dilation=(1, 1)),
    # shifted views of padded planes (no im2col): "same", a 3x1 kernel, and unpadded ("valid") geometries
    dict(c_in=16, h=14, w=14, c_out=24, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(c_in=8, h=10, w=12, c_out=12, kh=3, kw=1, stride=(1, 1), pad=(1, 0, 1, 0), dilation=(1, 1)),
    dict(c_in=8, h=12, w=12, c_out=8, kh=3, kw=3, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1)),
    # ... strided (phase planes), dilated, both at once on different axes, asymmetric padding, stride 3
    dict(c_in=8, h=15, w=16, c_out=12, kh=3, kw=3, stride=(2, 2), pad=(1, 1, 0, 1), dilation=(1, 1)),
    dict(c_in=8, h=14, w=14, c_out=8, kh=3, kw=3, stride=(1, 1), pad=(2, 2, 2, 2), dilation=(2, 2)),
    dict(c_in=8, h=20, w=30, c_out=10, kh=3, kw=2, stride=(2, 1), pad=(1, 0, 2, 1), dilation=(1, 2)),
    dict(c_in=4, h=30, w=30, c_out=16, kh=5, kw=5, stride=(3, 3), pad=(2, 2, 2, 2), dilation=(1, 1)),
    # ... 7x7 output maps: one double-width tile per image, a tail of output rows
    dict(c_in=8, h=7, w=7, c_out=14, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(c_in=8, h=14, w=14, c_out=10, kh=3, kw=3, stride=(2, 2), pad=(1, 1, 1, 1), dilation=(1, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch", ["symbolic", "static", "chunked"])
def test_conv2d(case, sparse, batch, monkeypatch):
    """Every image of the batch, whether images go one per launch (symbolic batch), all in one launch (a small
    static batch) or in chunks; serial loops for small convolutions and, forced, the parallel ones."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    g = kernels.ConvGeom(**case)
    n = 2 if batch != "chunked" else 6
    if batch == "chunked":  # room for the buffers of two images: chunks of 2 (the largest divisor of 6 that fits)
        per_image = kernels.conv_buffer_bytes(g, PARAMS, (4, 1) if sparse else None)
        monkeypatch.setattr(kernels.conv_layout, "FOLD_BATCH_BYTES", 2 * per_image + 4)
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_MACS", 0)
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_COPY", 0)
    w = _sparse(rng, (g.c_out, g.c_in, g.kh, g.kw), keep=0.4)
    b = rng.standard_normal(g.c_out).astype(np.float32)
    block = (4, 1) if sparse else None
    bsr = kernels.to_bsr(w.reshape(g.c_out, -1), block) if sparse else None
    kern = kernels.conv2d("conv_t", g, w.reshape(g.c_out, -1), b, "relu", PARAMS, bsr=bsr,
                          n_static=None if batch == "symbolic" else n)
    if batch == "chunked":  # the lowered thresholds reach the generator (they once sat in a default argument)
        assert "T.parallel" in kern.source and (g.direct or f"range({n} // 2)" in kern.source)
    x = rng.standard_normal((n, g.c_in, g.h, g.w)).astype(np.float32)
    flat = kernels.conv2d_takes_flat_input(g, PARAMS, block)
    got = _run(_build(kern), kern, [x.reshape(n, g.c_in, -1) if flat else x], (n, g.c_out, g.pixels))
    tx = torch.nn.functional.pad(torch.tensor(x), (g.pad[1], g.pad[3], g.pad[0], g.pad[2]))
    ref = torch.nn.functional.conv2d(tx, torch.tensor(w), torch.tensor(b), stride=g.stride, dilation=g.dilation)
    # Winograd's errors (the 3x3 stride-1 cases) scale with the sums' magnitude, not each output's
    np.testing.assert_allclose(got.reshape(ref.shape), ref.relu().numpy(), rtol=1e-4, atol=2e-5 * np.sqrt(g.k))


CHANNEL_VECTOR_CASES = CONV_CASES[-9:] + [
    # rows of 15 pixels (tiles of 8 and 7), 40 channels (two vectors, then a last tile of one, half of it valid)
    dict(c_in=16, h=9, w=15, c_out=40, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(c_in=16, h=28, w=28, c_out=64, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)),
    dict(c_in=8, h=27, w=27, c_out=33, kh=3, kw=3, stride=(2, 2), pad=(1, 1, 1, 1), dilation=(1, 1)),
]


@pytest.mark.parametrize("case", CHANNEL_VECTOR_CASES)
@pytest.mark.parametrize("batch", ["symbolic", "chunked"])
def test_conv2d_channel_vectors(case, batch, monkeypatch, direct_forms):
    """The form vectorised over output channels (conv_channels.py), forced on every geometry that reads padded
    planes: row tails, channel counts that end in a narrower tile or in part of a vector, strides and dilations,
    bias and ReLU, images one per launch and in parallel chunks."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(kernels.conv, "channel_vectors_pay", lambda g, planes, params: planes is not None)
    rng = np.random.default_rng(5)
    g = kernels.ConvGeom(**case)
    n = 2 if batch == "symbolic" else 6
    if batch == "chunked":
        monkeypatch.setattr(kernels.conv_layout, "FOLD_BATCH_BYTES", 2 * kernels.conv_buffer_bytes(g, PARAMS, None) + 4)
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_MACS", 0)
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_COPY", 0)
    w = rng.standard_normal((g.c_out, g.c_in, g.kh, g.kw)).astype(np.float32)
    b = rng.standard_normal(g.c_out).astype(np.float32)
    kern = kernels.conv2d("conv_cv", g, w.reshape(g.c_out, -1), b, "relu", PARAMS,
                          n_static=None if batch == "symbolic" else n)
    assert "XP = " in kern.source and "YP = " not in kern.source
    if batch == "chunked":
        assert "T.parallel" in kern.source and f"range({n} // 2)" in kern.source
    x = rng.standard_normal((n, g.c_in, g.h, g.w)).astype(np.float32)
    got = _run(_build(kern), kern, [x], (n, g.c_out, g.pixels))
    tx = torch.nn.functional.pad(torch.tensor(x), (g.pad[1], g.pad[3], g.pad[0], g.pad[2]))
    ref = torch.nn.functional.conv2d(tx, torch.tensor(w), torch.tensor(b), stride=g.stride, dilation=g.dilation)
    np.testing.assert_allclose(got.reshape(ref.shape), ref.relu().numpy(), rtol=1e-4, atol=1e-4)


def test_conv2d_channel_vectors_where_they_cost_less(direct_forms):
    """ResNet's 3x3 convolutions on 28x28 to 7x7 maps (their planes' padding columns are 7-30% of the pixel
    vectors' work) and 3x3 convolutions on 8x8 and 4x4 maps (im2col's copy) take output-channel vectors; 3-channel
    stems and strided 1x1s keep pixel vectors; the tiles: two vectors of 7-10 pixels, the widest that divides the
    row, and an odd last vector alone on up to 20."""
    def geom(c_in, hw, c_out, k=3, stride=1):
        return kernels.ConvGeom(c_in=c_in, h=hw, w=hw, c_out=c_out, kh=k, kw=k, stride=(stride, stride),
                                pad=(k // 2,) * 4, dilation=(1, 1))

    def form(g):
        src = kernels.conv2d("c", g, np.ones((g.c_out, g.k), np.float32), None, None, PARAMS, n_static=1).source
        return "channels" if "XP = " in src and "YP = " not in src else "pixels"  # pixel vectors: YP or XC

    assert [form(geom(c, hw, c)) for c, hw in [(128, 28), (256, 14), (512, 7)]] == ["channels"] * 3
    assert form(geom(128, 28, 256, stride=2)) == "channels"
    assert form(geom(3, 224, 64, k=7, stride=2)) == form(geom(3, 56, 64)) == "pixels"  # stems (im2col: XC)
    assert form(geom(32, 8, 32)) == form(geom(64, 4, 64)) == "channels"  # small maps: no im2col copy
    assert form(geom(64, 56, 128, k=1, stride=2)) == "pixels"
    tiles = [kernels.conv_channels.channel_tiles(geom(64, hw, 64), PARAMS) for hw in (56, 28, 7, 11)]
    assert [[(t.count, t.vectors, t.positions, t.last) for t in kinds] for kinds in tiles] == [
        [(2, 2, 8, 8)], [(2, 2, 7, 7)], [(2, 2, 7, 7)], [(2, 2, 6, 5)]]
    # 80 channels: two tiles of two vectors, then the fifth vector alone with rows of twice the pixels
    kinds = kernels.conv_channels.channel_tiles(geom(80, 28, 80), PARAMS)
    assert [(t.first, t.count, t.vectors, t.positions) for t in kinds] == [(0, 2, 2, 7), (2, 1, 1, 14)]


def _random_geometry(rng) -> kernels.ConvGeom:
    kh, kw, sh, sw, dh, dw = (int(v) for v in (*rng.integers(1, 6, 2), *rng.integers(1, 4, 2), *rng.integers(1, 3, 2)))
    return kernels.ConvGeom(c_in=int(rng.integers(1, 24)), h=int(rng.integers(max(kh * dh, 5), 30)),
                            w=int(rng.integers(max(kw * dw, 5), 30)), c_out=int(rng.integers(1, 30)), kh=kh, kw=kw,
                            stride=(sh, sw), pad=tuple(int(v) for v in rng.integers(0, 3, 4)), dilation=(dh, dw))


def test_conv2d_random_geometries_match_torch():
    """Seeded random kernels, strides, dilations, paddings and channel counts (dense and BSR, static and symbolic
    batch): every form (padded planes, im2col, direct) against torch; about half of them take the planes."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    forms = []
    while len(forms) < 24:
        g = _random_geometry(rng)
        if g.oh < 1 or g.ow < 1:
            continue
        block = (4, 1) if len(forms) % 3 == 0 else None
        n = int(rng.integers(1, 4))
        w = rng.standard_normal((g.c_out, g.k)).astype(np.float32)
        kern = kernels.conv2d("conv_r", g, w, None, None, PARAMS, bsr=kernels.to_bsr(w, block) if block else None,
                              n_static=n if len(forms) % 2 else None)
        forms.append(kernels.conv_planes._shifted_planes(g, PARAMS, block) is not None)
        x = rng.standard_normal((n, g.c_in, g.h, g.w)).astype(np.float32)
        flat = kernels.conv2d_takes_flat_input(g, PARAMS, block)
        got = _run(_build(kern), kern, [x.reshape(n, g.c_in, -1) if flat else x], (n, g.c_out, g.pixels))
        tx = torch.nn.functional.pad(torch.tensor(x), (g.pad[1], g.pad[3], g.pad[0], g.pad[2]))
        ref = torch.nn.functional.conv2d(tx, torch.tensor(w.reshape(g.c_out, g.c_in, g.kh, g.kw)), stride=g.stride,
                                         dilation=g.dilation).numpy()
        np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4, err_msg=str(g))
    assert 6 <= sum(forms) <= 18


def test_conv2d_channel_vectors_random_geometries_match_torch(monkeypatch, direct_forms):
    """Seeded random kernels, strides (up to 3), dilations, paddings and channel counts, the channel-vector form
    forced on every one but the direct 1x1s (the cost rule picks it on few of these small layers), against torch."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(kernels.conv, "channel_vectors_pay", lambda g, planes, params: not g.direct)
    rng = np.random.default_rng(11)
    checked = 0
    while checked < 16:
        g = _random_geometry(rng)
        if g.oh < 1 or g.ow < 1 or g.direct:
            continue
        n = int(rng.integers(1, 4))
        w = rng.standard_normal((g.c_out, g.k)).astype(np.float32)
        kern = kernels.conv2d("conv_cr", g, w, None, None, PARAMS, n_static=n if checked % 2 else None)
        assert "YP = " not in kern.source
        x = rng.standard_normal((n, g.c_in, g.h, g.w)).astype(np.float32)
        got = _run(_build(kern), kern, [x], (n, g.c_out, g.pixels))
        tx = torch.nn.functional.pad(torch.tensor(x), (g.pad[1], g.pad[3], g.pad[0], g.pad[2]))
        ref = torch.nn.functional.conv2d(tx, torch.tensor(w.reshape(g.c_out, g.c_in, g.kh, g.kw)), stride=g.stride,
                                         dilation=g.dilation).numpy()
        np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4, err_msg=str(g))
        checked += 1


def test_conv2d_channel_vectors_leave_out_taps_that_read_padding(monkeypatch, direct_forms):
    """Border rows and border tiles compute only the taps inside the map: the products counted by the cost rule
    are those of a brute-force count (rows where a loop can skip them), the unrolled source holds fewer FMAs,
    and a layer whose border pixels read nothing but padding (1x1 with padding 2) gives the bias there, as torch
    does."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for _ in range(20):
        g = _random_geometry(rng)
        if g.oh < 1 or g.ow < 1:
            continue
        ih = np.arange(g.oh)[:, None] * g.stride[0] - g.pad[0] + np.arange(g.kh)[None] * g.dilation[0]
        iw = np.arange(g.ow)[:, None] * g.stride[1] - g.pad[1] + np.arange(g.kw)[None] * g.dilation[1]
        rows = ((ih >= 0) & (ih < g.h)).sum() if kernels.conv_channels._rows_by_loop(g) else ih.size
        cols = ((iw >= 0) & (iw < g.w)).sum()
        assert kernels.conv_channels.inside_products(g) == g.c_in * rows * cols, g

    def fmas(g):
        w = np.ones((g.c_out, g.k), np.float32)
        return kernels.conv2d("c", g, w, None, None, PARAMS, n_static=1).source.count(" * XP[")

    g = kernels.ConvGeom(c_in=32, h=8, w=8, c_out=32, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1))
    skipped = fmas(g)
    monkeypatch.setattr(kernels.conv_channels, "SKIP_PADDING", False)
    every = fmas(g)
    monkeypatch.setattr(kernels.conv_channels, "SKIP_PADDING", True)
    # every tap: 9 taps x the row's one tile of 8 pixels, unrolled; inside taps: the kernel rows in a loop bounded
    # to the map, each with 2 + 6 * 3 + 2 = 22 kernel columns of the 8 pixels inside it
    assert (every, skipped) == (9 * 8, 22)
    assert "for kh in range(T.max(1 - " in kernels.conv2d("c", g, np.ones((32, g.k), np.float32), None, None, PARAMS,
                                                          n_static=1).source

    monkeypatch.setattr(kernels.conv, "channel_vectors_pay", lambda g, planes, params: not g.direct)
    g = kernels.ConvGeom(c_in=16, h=6, w=9, c_out=20, kh=1, kw=1, stride=(1, 1), pad=(2, 2, 1, 2), dilation=(1, 1))
    w = rng.standard_normal((g.c_out, g.k)).astype(np.float32)
    b = rng.standard_normal(g.c_out).astype(np.float32)
    kern = kernels.conv2d("conv_pad", g, w, b, None, PARAMS, n_static=2)
    assert "YP = " not in kern.source
    x = rng.standard_normal((2, g.c_in, g.h, g.w)).astype(np.float32)
    got = _run(_build(kern), kern, [x], (2, g.c_out, g.pixels))
    tx = torch.nn.functional.pad(torch.tensor(x), (g.pad[1], g.pad[3], g.pad[0], g.pad[2]))
    ref = torch.nn.functional.conv2d(tx, torch.tensor(w.reshape(g.c_out, g.c_in, 1, 1)), torch.tensor(b)).numpy()
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)


def test_conv2d_reads_shifted_views_where_they_cost_less_than_im2col(direct_forms):
    """Convolutions on maps of 7x7 and up read padded planes (stride 2: four phase planes), a 7x7/2 stem too; an
    8x8 map (its extra columns would add 50% to the product), a 3x3 stem on 3 channels and a strided 1x1 (more to
    copy than their im2col) and BSR blocks over two input channels use im2col."""
    def geom(c_in, hw, c_out, k=3, stride=1):
        return kernels.ConvGeom(c_in=c_in, h=hw, w=hw, c_out=c_out, kh=k, kw=k, stride=(stride, stride),
                                pad=(k // 2,) * 4, dilation=(1, 1))

    def buffer(g, block=None):
        w = np.ones((g.c_out, g.k), np.float32)
        bsr = kernels.to_bsr(w, block) if block else None
        src = kernels.conv2d("c", g, w, None, None, PARAMS, bsr=bsr, n_static=1).source
        return "XP" if "XP = " in src else "XC" if "XC = " in src else None

    assert [buffer(geom(c, hw, c)) for c, hw in [(64, 56), (128, 28), (256, 14), (512, 7)]] == ["XP"] * 4  # planes
    assert buffer(geom(64, 56, 128, stride=2)) == buffer(geom(3, 224, 64, k=7, stride=2)) == "XP"
    planes = kernels.conv_planes._shifted_planes
    assert planes(geom(64, 56, 128, stride=2), PARAMS).phases == ((0, 0), (0, 1), (1, 0), (1, 1))
    assert buffer(geom(3, 56, 64)) == buffer(geom(64, 56, 128, k=1, stride=2)) == "XC"
    assert planes(geom(32, 8, 32), PARAMS) is None  # (dense, it takes output-channel vectors on its planes)
    assert buffer(geom(64, 28, 64), block=(4, 1)) == "XP"  # BSR reads the views through a table of offsets
    assert buffer(geom(64, 28, 64), block=(2, 2)) == "XC"  # ... one input channel per block only
    assert [planes(kernels.ConvGeom(**case), PARAMS) is not None for case in CONV_CASES[-9:]] == [True] * 9
    tiles = [planes(geom(c, hw, c), PARAMS).tile for c, hw in [(512, 7), (64, 56)]]
    assert tiles == [2 * PARAMS.nr, PARAMS.nr]  # a 7x7 map in one tile per image: its weights read once


WINOGRAD_CASES = [
    # even and odd maps (a tile's second row / column past the edge), channels that end in part of a vector and
    # in a one-vector tile of their own, "same" and asymmetric padding, unpadded, a map of one output pixel
    dict(c_in=16, h=8, w=8, c_out=32, pad=(1, 1, 1, 1)),
    dict(c_in=5, h=7, w=9, c_out=21, pad=(1, 0, 2, 1)),
    dict(c_in=20, h=14, w=13, c_out=40, pad=(1, 1, 1, 1)),
    dict(c_in=3, h=5, w=6, c_out=48, pad=(0, 0, 0, 0)),
    dict(c_in=17, h=3, w=3, c_out=7, pad=(0, 0, 0, 0)),
    dict(c_in=32, h=4, w=4, c_out=64, pad=(2, 1, 0, 2)),
    # stride 2: even and odd maps and padding, an output of 1x2
    dict(c_in=16, h=16, w=16, c_out=32, pad=(1, 1, 1, 1), stride=(2, 2)),
    dict(c_in=20, h=15, w=13, c_out=40, pad=(1, 0, 2, 1), stride=(2, 2)),
    dict(c_in=5, h=9, w=8, c_out=21, pad=(0, 0, 0, 0), stride=(2, 2)),
    dict(c_in=17, h=3, w=4, c_out=7, pad=(0, 0, 0, 1), stride=(2, 2)),
    dict(c_in=16, h=18, w=18, c_out=16, pad=(0, 0, 0, 0), stride=(2, 2)),  # the last row and column unread
]


@pytest.mark.parametrize("name", ["F2", "F4", "S2F2", "S2F4"])
def test_winograd_transforms_compute_the_strided_correlation(name):
    """Each algorithm's transforms, from Toom-Cook (and the even/odd split at stride 2), compute m outputs of a
    3-tap correlation at its stride exactly in float64: A^T ((G w) * (B^T d)) = sum_k w_k d[stride * i + k]; in 2-D
    (the kernel's use) the same with the transforms on both sides."""
    alg = getattr(kernels.conv_winograd, name)
    rng = np.random.default_rng(5)
    d, w = rng.standard_normal(alg.span), rng.standard_normal(3)
    want = [w @ d[alg.stride * i:alg.stride * i + 3] for i in range(alg.m)]
    np.testing.assert_allclose(alg.at @ ((alg.g @ w) * (alg.bt @ d)), want, rtol=0, atol=1e-12)
    d2, w2 = rng.standard_normal((alg.span, alg.span)), rng.standard_normal((3, 3))
    s = alg.stride
    want2 = [[np.sum(w2 * d2[s * i:s * i + 3, s * j:s * j + 3]) for j in range(alg.m)] for i in range(alg.m)]
    got2 = alg.at @ ((alg.g @ w2 @ alg.g.T) * (alg.bt @ d2 @ alg.bt.T)) @ alg.at.T
    np.testing.assert_allclose(got2, want2, rtol=0, atol=1e-11)
    span = alg.m + 2 if s == 1 else 2 * alg.m + 1
    assert (alg.span, alg.planes) == (span, span * span)


@pytest.mark.parametrize("case", WINOGRAD_CASES)
@pytest.mark.parametrize("batch", ["symbolic", "chunked"])
@pytest.mark.parametrize("algorithm", ["F2", "F4"])
def test_conv2d_winograd(case, batch, algorithm, monkeypatch):
    """Winograd's F(2x2, 3x3) and F(4x4, 3x3) (conv_winograd.py), at stride 1 or their stride-2 forms, forced on
    every geometry above, against torch in float64: bias and ReLU or a clip, the batch symbolic (one image per
    launch) or static in parallel chunks of images."""
    torch = pytest.importorskip("torch")
    case = {"stride": (1, 1), **case}
    alg = getattr(kernels.conv_winograd, algorithm if case["stride"] == (1, 1) else "S2" + algorithm)
    assert (alg.stride,) * 2 == case["stride"]
    monkeypatch.setattr(kernels.conv_winograd, "choose_algorithm", lambda g, params: (alg, 2.0))
    rng = np.random.default_rng(13)
    g = kernels.ConvGeom(kh=3, kw=3, dilation=(1, 1), **case)
    n = 2 if batch == "symbolic" else 6
    if batch == "chunked":
        monkeypatch.setattr(kernels.conv_layout, "FOLD_BATCH_BYTES", 2 * kernels.conv_buffer_bytes(g, PARAMS, None) + 4)
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_MACS", 0)
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_COPY", 0)
    w = rng.standard_normal((g.c_out, g.c_in, 3, 3)).astype(np.float32)
    b = rng.standard_normal(g.c_out).astype(np.float32)
    act = "relu" if batch == "symbolic" else Clip(-1.0, 2.5)
    kern = kernels.conv2d("conv_wg", g, w.reshape(g.c_out, -1), b, act, PARAMS,
                          n_static=None if batch == "symbolic" else n)
    assert f'W = T.match_buffer(w, ({alg.weight_planes}, ' in kern.source
    if batch == "chunked":
        assert "T.parallel" in kern.source and f"range({n} // 2)" in kern.source
    x = rng.standard_normal((n, g.c_in, g.h, g.w)).astype(np.float32)
    got = _run(_build(kern), kern, [x], (n, g.c_out, g.pixels))
    tx = torch.nn.functional.pad(torch.tensor(x, dtype=torch.float64), (g.pad[1], g.pad[3], g.pad[0], g.pad[2]))
    ref = torch.nn.functional.conv2d(tx, torch.tensor(w, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                     stride=g.stride)
    ref = ref.relu() if act == "relu" else ref.clamp(-1.0, 2.5)
    # the outputs' scale: sums of 9 * c_in products of unit normals; F(4x4, 3x3)'s transforms (entries up to 8 and
    # down to 1/24) lose about 15x more of float32's precision than F(2x2, 3x3)'s (0, +-1, +-1/2)
    scale = np.sqrt(9 * g.c_in)
    np.testing.assert_allclose(got.reshape(ref.shape), ref.numpy(), rtol=0,
                               atol=(2e-6 if algorithm == "F2" else 3e-5) * scale)


def test_conv2d_winograd_where_it_pays():
    """The dense 3x3 stride-1 layers of ResNet-class models (16-512 channels, 56x56 to 7x7 maps) take F(4x4, 3x3),
    those on 4x4 maps F(2x2, 3x3) (one 6x6 tile would compute 16 outputs for 16 but stream 36 planes of weights),
    predicted 1.4-3.4x faster than the channel-vector form; ResNet's stride-2 3x3 layers on 56x56 maps take the
    stride-2 F(4x4, 3x3) (81 planes), on 28x28 maps F(2x2, 3x3) (25), the 512-channel one on 7x7 none (one tile:
    its transformed weights, 4x the direct form's, stream for one tile's products), nor a 64-channel one on 14x14;
    3-channel stems, 8-channel layers, a 3x3 map, stride 3, dilated, 1x1 and 5x5 layers and block-sparse weights
    keep the direct forms; and the sparsity plan
    counts Winograd's speed in the dense time a block-sparse kernel must beat."""
    def geom(c_in, hw, c_out, k=3, stride=1, dilation=1):
        return kernels.ConvGeom(c_in=c_in, h=hw, w=hw, c_out=c_out, kh=k, kw=k, stride=(stride, stride),
                                pad=(dilation * (k // 2),) * 4, dilation=(dilation, dilation))

    def planes(g, block=None):
        w = np.ones((g.c_out, g.k), np.float32)
        bsr = kernels.to_bsr(w, block) if block else None
        src = kernels.conv2d("c", g, w, None, None, PARAMS, bsr=bsr, n_static=1).source
        if "V = T.alloc_buffer" not in src:  # no Winograd (its transformed input)
            return None
        return kernels.conv_winograd.choose_algorithm(g, PARAMS)[0].planes  # the algorithm the kernel ran

    f4 = [(64, 56), (128, 28), (256, 14), (512, 7), (32, 8), (16, 28), (32, 14)]
    f2 = [(64, 4), (128, 4)]
    assert [planes(geom(c, hw, c)) for c, hw in f4 + f2] == [36] * len(f4) + [16] * len(f2)
    speedups = [kernels.winograd_speedup(geom(c, hw, c), PARAMS) for c, hw in f4 + f2]
    assert 1.4 < min(speedups) and max(speedups) < 3.5, speedups
    strided = [geom(64, 56, 128, stride=2), geom(128, 28, 256, stride=2)]
    assert [planes(g) for g in strided] == [81, 25]
    assert 1.2 < min(kernels.winograd_speedup(g, PARAMS) for g in strided) < 1.6
    declines = [geom(3, 56, 64), geom(8, 28, 8), geom(128, 3, 128), geom(64, 14, 64, stride=2),
                geom(512, 7, 512, stride=2), geom(64, 28, 64, stride=3), geom(64, 28, 64, dilation=2),
                geom(64, 28, 64, k=1), geom(64, 28, 64, k=5)]
    assert [planes(g) for g in declines] == [None] * len(declines)
    assert kernels.winograd_speedup(geom(512, 7, 512, stride=2), PARAMS) == 1.0
    assert planes(geom(64, 28, 64), block=(4, 1)) is None
    g = geom(128, 28, 128)
    plain = estimate(g.pixels, g.k, g.c_out, 0.5, (4, 1), PARAMS, SPEC.bsr_efficiency, conv=True)
    counted = estimate(g.pixels, g.k, g.c_out, 0.5, (4, 1), PARAMS, SPEC.bsr_efficiency, conv=True,
                       dense_speedup=kernels.winograd_speedup(g, PARAMS))
    assert counted.speedup == pytest.approx(plain.speedup / kernels.winograd_speedup(g, PARAMS))


def test_bsr_conv_estimate_charges_its_extra_copy():
    """A BSR convolution on a small map copies an im2col matrix where the dense forms read planes: on a 32-channel
    3x3 layer on 8x8 that copy is as long as the products, and BSR ran 0.56-0.74x Winograd's dense time at 70-80%
    block sparsity (one thread); the estimate now keeps it dense there, and still takes BSR where it was measured
    1.2-1.6x faster (80% on 4x4, 28x28 and 14x14 maps) or 2.0-2.5x (the strided 8x8 -> 4x4 layer, 70-80%)."""
    def bsr_speedup(c_in, hw, c_out, density, stride=1):
        g = kernels.ConvGeom(c_in=c_in, h=hw, w=hw, c_out=c_out, kh=3, kw=3, stride=(stride, stride),
                             pad=(1, 1, 1, 1), dilation=(1, 1))
        assert kernels.bsr_extra_copy(g, PARAMS, (4, 1)) >= 0
        return estimate(g.pixels, g.k, g.c_out, density, (4, 1), PARAMS, SPEC.bsr_efficiency, conv=True,
                        dense_speedup=kernels.winograd_speedup(g, PARAMS),
                        copy_elements=kernels.bsr_extra_copy(g, PARAMS, (4, 1))).speedup
    from spc.targets.cost import MIN_SPEEDUP

    assert bsr_speedup(32, 8, 32, 0.3) < bsr_speedup(32, 8, 32, 0.2) < MIN_SPEEDUP
    assert min(bsr_speedup(64, 4, 64, 0.2), bsr_speedup(64, 28, 64, 0.2), bsr_speedup(128, 14, 128, 0.2),
               bsr_speedup(32, 8, 64, 0.3, stride=2)) >= MIN_SPEEDUP


def test_bsr_conv_tiles_fit_small_maps():
    """A BSR tile divides the map when it can; a small map gets the narrowest tile holding it, not 96 positions."""
    full, lanes = PARAMS.bsr_tile(4), PARAMS.lanes
    tiles = {p: kernels.bsr_conv_tile(PARAMS, 4, p) for p in (16, 9, 49, 64, 784, 3136, full * 3)}
    assert tiles == {16: lanes, 9: lanes, 49: 4 * lanes, 64: 4 * lanes, 784: full, 3136: 4 * lanes, full * 3: full}


def test_conv2d_small_maps_use_one_vector_tiles_and_serial_loops():
    """A 4x4 map fills one vector, not half of a two-vector tile; a convolution this small runs without waking the
    thread pool; a large one is parallel."""
    small = kernels.ConvGeom(c_in=64, h=4, w=4, c_out=64, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1),
                             dilation=(1, 1))
    assert kernels.conv_layout._conv_tile(small, PARAMS, None) == PARAMS.lanes
    w = np.ones((64, small.k), np.float32)
    src = kernels.conv2d("c_small", small, w, None, None, PARAMS, n_static=1).source
    assert "T.parallel" not in src
    big = kernels.ConvGeom(c_in=64, h=28, w=28, c_out=64, kh=3, kw=3, stride=(1, 1), pad=(1, 1, 1, 1),
                           dilation=(1, 1))
    assert "T.parallel" in kernels.conv2d("c_big", big, w, None, None, PARAMS, n_static=1).source


@pytest.mark.parametrize("static", [True, False], ids=["static", "symbolic"])
def test_batch_matmul(static):
    rng = np.random.default_rng(4)
    b, m, k, n = 3, 17, 9, 37
    kern = kernels.batch_matmul("bmm_t", PARAMS, b if static else None, None, k if static else None, n if static else None)
    a_ = rng.standard_normal((b, m, k)).astype(np.float32)
    b_ = rng.standard_normal((b, k, n)).astype(np.float32)
    np.testing.assert_allclose(_run(_build(kern), kern, [a_, b_], (b, m, n)), a_ @ b_, rtol=1e-5, atol=1e-5)


def test_bsr_accumulators_are_power_of_two_vectors():
    for name in ("x86", "x86-avx2", "arm"):
        p = get_target(name).cpu_kernels
        for br in (1, 2, 3, 4, 8, 16):
            vecs = p.bsr_chunk(br) // p.lanes
            assert vecs & (vecs - 1) == 0
            assert p.bsr_tile(br) % p.bsr_chunk(br) == 0


def test_cost_model_prefers_bsr_only_when_it_pays():
    est = lambda m, d: estimate(m, 768, 3072, d, (4, 1), PARAMS, SPEC.bsr_efficiency).speedup  # noqa: E731
    assert est(128, 0.2) > 2.5  # 80% sparse BERT FFN
    assert est(128, 0.95) < 1.1  # nearly dense: stay dense
    assert est(1, 0.2) < est(128, 0.2)  # one token wastes the token-vectorised tile


# ---- sparsify ----------------------------------------------------------------------------------------------------


def _model(w_mm, w_gemm, w_conv):
    nodes = [
        helper.make_node("Conv", ["img", "Wc"], ["c"], name="conv"),
        helper.make_node("MatMul", ["x", "Wm"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "Wg"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w_mm.shape[0]]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, w_conv.shape[1], 5, 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, w_gemm.shape[0]]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, w_conv.shape[0], 3, 3]),
        ],
        [numpy_helper.from_array(w_mm, "Wm"), numpy_helper.from_array(w_gemm, "Wg"), numpy_helper.from_array(w_conv, "Wc")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sparsify_zeroes_lowest_blocks_per_layer():
    rng = np.random.default_rng(5)
    w_mm = rng.standard_normal((64, 130)).astype(np.float32)  # [K, N]: N not a multiple of 4
    w_gemm = rng.standard_normal((40, 130)).astype(np.float32)  # [N, K] (transB)
    w_conv = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    model = _model(w_mm, w_gemm, w_conv)
    before = model.SerializeToString()
    out, report = sparsify(model, 0.75, (4, 1), min_size=1000)
    assert model.SerializeToString() == before  # input untouched
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    by_name = {layer.weight: layer for layer in report.layers}
    for name, view in (("Wm", inits["Wm"].T), ("Wg", inits["Wg"]), ("Wc", inits["Wc"].reshape(24, -1))):
        layer = by_name[name]
        assert not layer.skipped
        blocks = kernels.to_bsr(view, (4, 1))
        assert abs(1 - blocks.density - 0.75) < 0.01
        assert abs(layer.sparsity - 0.75) < 0.01
    # the kept blocks are the largest: every kept block's RMS >= every zeroed block's RMS (MatMul, W^T view)
    orig = w_mm.T
    mask = block_mask(orig, 0.75, (4, 1))
    kept = np.abs(orig[mask]).size
    assert kept == np.count_nonzero(inits["Wm"])
    onnx.checker.check_model(out)


def test_sparsify_skips_small_and_grouped():
    rng = np.random.default_rng(6)
    model = _model(
        rng.standard_normal((8, 8)).astype(np.float32),
        rng.standard_normal((8, 8)).astype(np.float32),
        rng.standard_normal((4, 2, 1, 1)).astype(np.float32),
    )
    out, report = sparsify(model, 0.5, (4, 1))
    assert all(layer.skipped for layer in report.layers)
    assert report.overall_sparsity == 0.0
    with pytest.raises(ValueError):
        sparsify(model, 1.0)


@pytest.mark.parametrize("d", [768, 37])
@pytest.mark.parametrize("rows_static", [None, 7])
def test_layer_norm_and_softmax(d, rows_static):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((7, d)) * 3 + 1).astype(np.float32)
    g = rng.standard_normal(d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    kern = kernels.layer_norm("ln_t", d, 1e-5, g, b, PARAMS, rows_static)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(_run(_build(kern), kern, [x], x.shape), ref, rtol=1e-4, atol=1e-5)
    kern = kernels.softmax("sm_t", d, PARAMS, rows_static)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(_run(_build(kern), kern, [x], x.shape), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", [
    dict(c=8, h=112, w=112, kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),  # ResNet's pool
    dict(c=5, h=7, w=9, kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),  # odd sizes: the last window is cut
    dict(c=3, h=8, w=8, kernel=(2, 2), stride=(2, 2), pads=(0, 0, 0, 0)),
    dict(c=4, h=10, w=11, kernel=(3, 2), stride=(1, 2), pads=(1, 0, 1, 1)),  # asymmetric window, stride, pads
])
@pytest.mark.parametrize("n_static", [None, 3])
def test_max_pool2d_matches_torch(case, n_static):
    torch = pytest.importorskip("torch")
    kern = kernels.max_pool2d("pool_t", **case, n_static=n_static)
    x = np.random.default_rng(5).standard_normal((3, case["c"], case["h"], case["w"])).astype(np.float32)
    top, left, bottom, right = case["pads"]
    padded = torch.nn.functional.pad(torch.tensor(x), (left, right, top, bottom), value=-np.inf)
    ref = torch.nn.functional.max_pool2d(padded, case["kernel"], case["stride"]).numpy()
    np.testing.assert_array_equal(_run(_build(kern), kern, [x], ref.shape), ref)


@pytest.mark.parametrize("case", [
    dict(c=6, h=12, w=19, kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1)),  # a 16-lane + 3 tail
    dict(c=5, h=15, w=17, kernel=(5, 5), stride=(2, 2), pads=(2, 1, 2, 3), dilation=(1, 1)),  # asymmetric pads
    dict(c=4, h=7, w=7, kernel=(3, 3), stride=(1, 1), pads=(2, 2, 2, 2), dilation=(2, 2)),
    dict(c=3, h=9, w=20, kernel=(3, 1), stride=(1, 2), pads=(0, 0, 0, 0), dilation=(1, 1)),
    dict(c=3, h=4, w=32, kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1)),  # rows of whole vectors
    # rows four at a time (ROW_BLOCK), then the last three one at a time; two whole vectors and a 3-column tail
    dict(c=3, h=7, w=35, kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1)),
    dict(c=2, h=7, w=7, kernel=(5, 5), stride=(1, 1), pads=(2, 2, 2, 2), dilation=(1, 1)),  # EfficientNet's 7x7
])
@pytest.mark.parametrize("n_static", [None, 2, "parallel per image", "parallel per batch"])
@pytest.mark.parametrize("epilogue", [(False, None), (True, "relu"), (True, Clip(-0.5, 0.5))])
def test_depthwise_conv2d_matches_torch(case, n_static, epilogue, monkeypatch):
    """Both forms (kernels/depthwise.py): rows of vectors for the 32-wide map, flat for the others. Parallel loops
    forced by the threshold: over channels within each image, or (work over the threshold only for the whole
    batch) over channels outermost, each task taking every image through its plane."""
    torch = pytest.importorskip("torch")
    forced = isinstance(n_static, str)
    if forced:
        oh, ow = (kernels.source.window_count(case[s], case["pads"][i], case["pads"][i + 2], case["kernel"][i],
                                              case["dilation"][i], case["stride"][i]) for i, s in enumerate("hw"))
        per_image = case["c"] * oh * ow * case["kernel"][0] * case["kernel"][1] * kernels.depthwise.DEPTHWISE_MAC_COST
        per_batch = n_static == "parallel per batch"
        monkeypatch.setattr(kernels.source, "PARALLEL_MIN_MACS", per_image + 1 if per_batch else 0)
        n_static = 2
    rng = np.random.default_rng(6)
    with_bias, act = epilogue
    c, (kh, kw) = case["c"], case["kernel"]
    weight = rng.standard_normal((c, 1, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32) if with_bias else None
    kern = kernels.depthwise_conv2d("dw_t", c, case["h"], case["w"], weight, case["stride"], case["pads"],
                                    case["dilation"], bias, act, PARAMS, n_static=n_static)
    assert ("T.parallel" in kern.source) == forced  # these maps are under the threshold unless forced
    if forced:
        assert (kern.source.index("for channel") < kern.source.index("for image")) == per_batch
    x = rng.standard_normal((2, c, case["h"], case["w"])).astype(np.float32)
    top, left, bottom, right = case["pads"]
    padded = torch.nn.functional.pad(torch.tensor(x), (left, right, top, bottom))
    ref = torch.nn.functional.conv2d(padded, torch.tensor(weight), None if bias is None else torch.tensor(bias),
                                     case["stride"], 0, case["dilation"], groups=c)
    if act == "relu":
        ref = torch.relu(ref)
    elif act is not None:  # a clip both of whose bounds cut (ReLU6 is Clip(0, 6))
        assert (ref < act.lo).any() and (ref > act.hi).any()
        ref = ref.clamp(act.lo, act.hi)
    ref = ref.numpy()
    np.testing.assert_allclose(_run(_build(kern), kern, [x], ref.shape), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [
    dict(c_in=5, c=12, h=9, w=45, kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),  # chunk + 8 + 4 + 1 columns
    dict(c_in=3, c=10, h=8, w=38, kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1)),  # groups of 5 channels
    dict(c_in=4, c=8, h=11, w=34, kernel=(5, 5), stride=(2, 2), pads=(2, 1, 2, 3)),  # odd left pad: phases swap
    dict(c_in=6, c=7, h=6, w=33, kernel=(3, 3), stride=(1, 2), pads=(0, 0, 1, 1)),  # groups of 7, no top/left pad
    dict(c_in=9, c=4, h=6, w=35, kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1)),  # 4 rows + 2, 2 vectors + 3
])
@pytest.mark.parametrize("n_static", [None, 2])
@pytest.mark.parametrize("epilogues", [((False, None), (False, None)), ((True, Clip(0.0, 6.0)), (True, "relu"))])
def test_expand_depthwise_matches_torch(case, n_static, epilogues):
    """The fused 1x1 + depthwise kernel equals the two convolutions one after the other (MobileNet's expand and
    depthwise), with and without their epilogues, at strides 1 and 2, asymmetric pads and odd widths."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    (e_bias, e_act), (d_bias, d_act) = epilogues
    c_in, c, (kh, kw) = case["c_in"], case["c"], case["kernel"]
    we = rng.standard_normal((c, c_in)).astype(np.float32)
    be = rng.standard_normal(c).astype(np.float32) if e_bias else None
    wd = rng.standard_normal((c, 1, kh, kw)).astype(np.float32)
    bd = rng.standard_normal(c).astype(np.float32) if d_bias else None
    kern = kernels.expand_depthwise("ed_t", c_in, c, case["h"], case["w"], we, be, e_act, wd, case["stride"],
                                    case["pads"], (1, 1), bd, d_act, PARAMS, n_static=n_static)
    x = rng.standard_normal((2, c_in, case["h"], case["w"])).astype(np.float32)
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    e = F.conv2d(torch.tensor(x), torch.tensor(we[:, :, None, None]), t(be))
    if e_act is not None:
        assert (e < 0).any() and (e > 6).any()
        e = e.clamp(0.0, 6.0)
    top, left, bottom, right = case["pads"]
    ref = F.conv2d(F.pad(e, (left, right, top, bottom)), torch.tensor(wd), t(bd), case["stride"], groups=c)
    ref = (torch.relu(ref) if d_act == "relu" else ref).numpy()
    np.testing.assert_allclose(_run(_build(kern), kern, [x], ref.shape), ref, rtol=1e-4, atol=1e-4)
