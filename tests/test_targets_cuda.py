"""cuda bundles: TVM compiles for sm_80 without a GPU; the CUDA source in the bundle compiles to cubin with nvcc for
sm_80 and sm_90. (No GPU here: the kernels are not run.)"""

from __future__ import annotations

import shutil

import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("torch")

from spc.targets import compile_model, testing  # noqa: E402

if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed (CUDA toolkit)", allow_module_level=True)


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-mlp")
    manifest = compile_model(testing.mlp(d_in=64, hidden=128, d_out=16), "cuda", out, sparsity=0.8)
    return out, manifest


def test_cuda_bundle_layout(cuda_bundle):
    out, manifest = cuda_bundle
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.cu", "model.onnx", "model.so"]
    assert manifest["tvm_target"] == {"kind": "cuda", "arch": "sm_80"}
    assert manifest["files"]["device_source"] == "model.cu"
    assert manifest["inputs"][0]["shape"] == ["batch", 64]
    src = (out / "model.cu").read_text()
    assert src.count("__global__") >= 3
    # no block-sparse kernels on cuda: the request is recorded, the weights stay as they were
    assert any("sparsity 0.8 not applied" in note for note in manifest["notes"])
    assert manifest["sparsify"] is None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_to_cubin(cuda_bundle, arch):
    from tvm.support import nvcc

    out, _ = cuda_bundle
    src = (out / "model.cu").read_text()
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc")
    assert bytes(cubin[:4]) == b"\x7fELF"


def test_cuda_bundle_runs_on_a_gpu_or_says_why(cuda_bundle):
    """With a GPU (and nvcc) the bundle runs in-process and matches ONNX Runtime; without one, a one-line error."""
    import numpy as np

    from spc.errors import SpcError
    from spc.targets import get_target, load_bundle

    out, _ = cuda_bundle
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    if not get_target("cuda").runs_here():
        with pytest.raises(SpcError, match="targets cuda .*cannot run in this process"):
            load_bundle(out)
        return
    got = load_bundle(out).run({"input": x})
    want = testing.ort_run(str(out / "model.onnx"), {"input": x})
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)
