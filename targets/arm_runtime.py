"""Run AArch64 bundles on an x86 host: TVM's aarch64 runtime + a small C++ runner under qemu-aarch64.

    python -m spc.targets.arm_runtime fetch     # (CI, once) pip-download the aarch64 wheels, build the runner
    python -m spc.targets.arm_runtime status    # say whether ARM bundles can run here, and why not

``fetch`` downloads the manylinux aarch64 wheels of the *installed* ``apache-tvm`` and ``apache-tvm-ffi`` versions
with pip (no dependencies, binary only), extracts ``libtvm_runtime.so`` and ``libtvm_ffi.so``, and builds
``arm_runner.cc`` with ``aarch64-linux-gnu-g++`` against them. Everything lives in the cache directory
(``$SPC_ARM_RUNTIME`` or ``~/.cache/spc/arm-runtime/<tvm>-<ffi>``). ``run_bundle`` then executes a bundle's
``model.so`` under ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` (or natively on an AArch64 host).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

RUNNER_SRC = Path(__file__).with_name("arm_runner.cc")
SYSROOT = "/usr/aarch64-linux-gnu"
CXX = "aarch64-linux-gnu-g++"
LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}


class ArmRuntimeUnavailable(RuntimeError):
    """The aarch64 runtime (wheels, cross compiler or qemu) is not available; the message says what is missing."""


def versions() -> dict[str, str]:
    return {pkg: importlib.metadata.version(pkg) for pkg in LIBS}


def cache_dir() -> Path:
    env = os.environ.get("SPC_ARM_RUNTIME")
    if env:
        return Path(env)
    v = versions()
    return Path.home() / ".cache" / "spc" / "arm-runtime" / f"tvm-{v['apache-tvm']}-ffi-{v['apache-tvm-ffi']}"


def runner_path() -> Path:
    return cache_dir() / "spc_arm_runner"


def lib_dir() -> Path:
    return cache_dir() / "lib"


def _native() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def fetch(verbose: bool = True) -> Path:
    """Download the aarch64 wheels (pip), extract the two runtime libraries and build the runner. Idempotent."""
    root = cache_dir()
    libdir = lib_dir()
    libdir.mkdir(parents=True, exist_ok=True)
    wheels = root / "wheels"
    wheels.mkdir(exist_ok=True)
    for pkg, member in LIBS.items():
        target = libdir / Path(member).name
        if target.exists():
            continue
        version = versions()[pkg]
        found = sorted(wheels.glob(f"{pkg.replace('-', '_')}-{version}-*aarch64*.whl"))
        if not found:
            cmd = [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                "--platform", "manylinux_2_28_aarch64", "-d", str(wheels), f"{pkg}=={version}",
            ]  # fmt: skip
            if verbose:
                print("+", " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ArmRuntimeUnavailable(f"pip could not download {pkg}=={version} for aarch64: "
                                            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
            found = sorted(wheels.glob(f"{pkg.replace('-', '_')}-{version}-*aarch64*.whl"))
            if not found:
                raise ArmRuntimeUnavailable(f"no aarch64 wheel of {pkg}=={version} after pip download")
        with zipfile.ZipFile(found[-1]) as zf:
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    build_runner(verbose=verbose)
    return root


def build_runner(verbose: bool = True) -> Path:
    out = runner_path()
    if out.exists() and out.stat().st_mtime >= RUNNER_SRC.stat().st_mtime:
        return out
    import tvm_ffi

    ffi_root = Path(tvm_ffi.__file__).parent
    includes = [ffi_root / "include", ffi_root / "include" / "dlpack"]
    dlpack = list(ffi_root.glob("3rdparty/dlpack/include")) + list(ffi_root.glob("include/dlpack/include"))
    includes += dlpack
    cxx = "g++" if _native() else CXX
    if shutil.which(cxx) is None:
        raise ArmRuntimeUnavailable(f"{cxx} is not installed (Debian: g++-aarch64-linux-gnu)")
    cmd = [cxx, "-std=c++17", "-O2", str(RUNNER_SRC), "-o", str(out)]
    cmd += [f"-I{p}" for p in includes if p.exists()]
    cmd += [f"-L{lib_dir()}", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib", "-lpthread"]
    if verbose:
        print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArmRuntimeUnavailable(f"building the aarch64 runner failed: {proc.stderr.strip()[-2000:]}")
    return out


def status() -> tuple[bool, str]:
    """(usable, reason): whether ARM bundles can be run here with what is already in the cache."""
    if not _native() and shutil.which("qemu-aarch64") is None:
        return False, "qemu-aarch64 is not installed (Debian: qemu-user)"
    if not _native() and not Path(SYSROOT).exists():
        return False, f"{SYSROOT} is missing (Debian: libc6-arm64-cross, libstdc++6-arm64-cross)"
    for member in LIBS.values():
        if not (lib_dir() / Path(member).name).exists():
            return False, f"{lib_dir() / Path(member).name} is missing: run `python -m spc.targets.arm_runtime fetch`"
    if not runner_path().exists():
        return False, f"{runner_path()} is missing: run `python -m spc.targets.arm_runtime fetch`"
    return True, f"aarch64 runtime in {cache_dir()}"


def ensure(allow_download: bool = True) -> None:
    """Make the runtime usable (fetching it if allowed); raises ArmRuntimeUnavailable with the reason."""
    ok, reason = status()
    if ok:
        return
    if not allow_download:
        raise ArmRuntimeUnavailable(reason)
    try:
        fetch(verbose=False)
    except ArmRuntimeUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - network, disk, zip errors
        raise ArmRuntimeUnavailable(f"fetching the aarch64 runtime failed: {exc}") from exc
    ok, reason = status()
    if not ok:
        raise ArmRuntimeUnavailable(reason)


def command(bundle: str | Path) -> list[str]:
    lib = str(Path(bundle) / "model.so")
    if _native():
        return [str(runner_path()), lib]
    return ["qemu-aarch64", "-L", SYSROOT, str(runner_path()), lib]


def run_bundle(
    bundle: str | Path,
    inputs: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    repeat: int = 0,
    timeout: float = 600,
) -> tuple[dict[str, np.ndarray], float | None]:
    """Run an ARM bundle; returns ({output name: array}, mean ms per run if repeat > 0 else None)."""
    from .bundle import read_manifest

    ok, reason = status()
    if not ok:
        raise ArmRuntimeUnavailable(reason)
    manifest = read_manifest(bundle)
    with tempfile.TemporaryDirectory(prefix="spc-arm-") as tmp:
        paths = []
        for i, io in enumerate(manifest["inputs"]):
            arr = np.ascontiguousarray(inputs[io["name"]], dtype=io["dtype"])
            p = Path(tmp) / f"in{i}.npy"
            np.save(p, arr)
            paths.append(str(p))
        cmd = command(bundle)
        cmd.append(tmp)
        if repeat:
            cmd += ["--repeat", str(repeat)]
        cmd += paths
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(lib_dir()) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        if threads:
            env["TVM_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"arm runner failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        ms = None
        for line in proc.stdout.splitlines():
            if line.startswith("time_ms:"):
                ms = float(line.split(":", 1)[1])
        outs = {}
        for i, io in enumerate(manifest["outputs"]):
            outs[io["name"]] = np.load(Path(tmp) / f"out{i}.npy")
        return outs, ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spc.targets.arm_runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["fetch", "status", "path"])
    args = parser.parse_args(argv)
    if args.action == "fetch":
        try:
            fetch()
        except ArmRuntimeUnavailable as exc:
            print(f"arm runtime unavailable: {exc}", file=sys.stderr)
            return 1
    ok, reason = status()
    if args.action == "path":
        print(cache_dir())
    else:
        print(("ok: " if ok else "unavailable: ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
