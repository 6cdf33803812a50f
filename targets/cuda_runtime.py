"""Running cuda bundles with TVM's runtime alone.

A cuda bundle's model.so holds the kernels as CUDA source; TVM's runtime compiles them when the library is loaded,
through the global function ``tvm_callback_cuda_compile``. TVM registers that function only when its compiler
package (``tvm.support.nvcc``) is imported, and by default it needs NVRTC's Python bindings. Deployment machines
often have neither (``TVM_USE_RUNTIME_LIB=1``, no libtvm_compiler), so spc registers its own callback when none is
there: nvcc builds a fatbin for the GPU actually present. With TVM's runtime only, nothing loads TVM's CUDA device
API either; ``ensure_cuda_runtime`` loads it (it needs libcudart and the driver's libcuda on the loader path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import SpcError


def ensure_cuda_runtime():
    """Returns TVM's ``cuda:0`` device, ready to load cuda bundles; SpcError when there is no usable GPU."""
    import tvm
    from tvm import libinfo
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=libinfo.package_lib_paths())
        except (OSError, RuntimeError) as error:
            raise SpcError(f"cannot load TVM's CUDA runtime (libcudart / libcuda on the loader path?): {error}") \
                from None
    device = tvm.cuda(0)
    if not device.exist:
        raise SpcError("no CUDA GPU is visible to TVM on this machine")
    _register_compiler(device.compute_version.replace(".", ""))
    return device


def _tvm_compiles_cuda() -> bool:
    """TVM's own callback works with its compiler library and either NVRTC's bindings or TVM_CUDA_COMPILE_MODE=nvcc."""
    from tvm import base

    if base._RUNTIME_ONLY:
        return False
    return importlib.util.find_spec("cuda") is not None or os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc"


def _register_compiler(arch: str) -> None:
    import tvm_ffi

    if _tvm_compiles_cuda():
        import tvm.support.nvcc  # noqa: F401 - registers TVM's callback

        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SpcError("running a cuda bundle compiles its kernels when it is loaded: nvcc is not on PATH "
                       "(install the CUDA toolkit, or TVM with NVRTC's bindings: pip install cuda-bindings)")

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_unused):
        with tempfile.TemporaryDirectory() as tmp:
            source, binary = Path(tmp, "kernels.cu"), Path(tmp, "kernels.fatbin")
            source.write_text(code)
            subprocess.run([nvcc, "--fatbin", "-O3", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                            "-o", str(binary), str(source)], check=True, capture_output=True)
            return bytearray(binary.read_bytes())
