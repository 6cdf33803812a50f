"""load_bundle: run a compiled bundle in this process (bundles whose target runs on this machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .compile import FORMAT, LIBRARY, MANIFEST
from .errors import SpcError
from .registry import get_target


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def use_all_cores() -> None:
    """TVM's runtime defaults to half the hardware threads on x86 (it assumes hyper-threading); spc bundles use all
    cores unless TVM_NUM_THREADS (or OMP_NUM_THREADS) says otherwise. Must run before TVM's thread pool starts."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(default_threads())


class Bundle:
    """A loaded bundle: ``run({"input": array}) -> {output_name: array}``."""

    def __init__(self, path: Path, manifest: dict, vm, device):
        self.path = path
        self.manifest = manifest
        self._vm = vm
        self._device = device
        self.input_names = [io["name"] for io in manifest["inputs"]]
        self.output_names = [io["name"] for io in manifest["outputs"]]

    def _args(self, inputs: dict[str, np.ndarray]):
        import tvm

        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise SpcError(
                f"bundle {self.path} takes inputs {self.input_names}; missing {missing}, unexpected {extra}"
            )
        args = []
        for io in self.manifest["inputs"]:
            arr = np.ascontiguousarray(inputs[io["name"]], dtype=io["dtype"])
            shape = io["shape"]
            if arr.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, arr.shape)):
                raise SpcError(f"input {io['name']!r} has shape {list(arr.shape)}, the bundle expects {shape}")
            args.append(tvm.runtime.tensor(arr, self._device))
        return args

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._vm["main"](*self._args(inputs))
        outs = _flatten(out)
        return {name: o.numpy() for name, o in zip(self.output_names, outs)}

    def benchmark(self, inputs: dict[str, np.ndarray], number: int = 20, repeat: int = 10) -> list[float]:
        """Seconds per run, one figure per repeat, timed by TVM's evaluator (synchronised with a GPU device)."""
        timer = self._vm.time_evaluator("main", self._device, number=number, repeat=repeat, min_repeat_ms=50)
        return list(timer(*self._args(inputs)).results)

    def timer(self, inputs: dict[str, np.ndarray]):
        """A zero-argument callable that runs the bundle once on prepared inputs (benchmarks)."""
        args = self._args(inputs)
        fn = self._vm["main"]
        return lambda: fn(*args)


def _flatten(out):
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return [out]
    res = []
    for item in out:
        res.extend(_flatten(item))
    return res


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SpcError(f"{path} is not an spc bundle: no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise SpcError(f"{path / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise SpcError(f"{path / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    manifest = read_manifest(path)
    spec = get_target(manifest["target"])
    if not spec.runs_here():
        hint = " (run it with spc.targets.arm_runtime.run_bundle, under qemu-aarch64)" if spec.name == "arm" else ""
        raise SpcError(
            f"bundle {path} targets {spec.name} ({spec.description}), which cannot run in this process{hint}"
        )
    use_all_cores()
    import tvm
    from tvm.runtime.vm import VirtualMachine

    if spec.runtime_device == "cuda":
        from .cuda_runtime import ensure_cuda_runtime

        device = ensure_cuda_runtime()
    else:
        device = tvm.cpu()
    lib = tvm.runtime.load_module(str(path / manifest["files"].get("library", LIBRARY)))
    vm = VirtualMachine(lib, device)
    return Bundle(path, manifest, vm, device)
