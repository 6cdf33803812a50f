#!/bin/sh
# Fetch TVM's aarch64 runtime (pip download of the apache-tvm / apache-tvm-ffi aarch64 wheels matching the installed
# versions) into the cache and build the C++ runner, so that tests can run ARM bundles under qemu-aarch64.
# Needs: pip access to PyPI, g++-aarch64-linux-gnu, qemu-user. Cache: $SPC_ARM_RUNTIME or ~/.cache/spc/arm-runtime.
set -e
here=$(cd "$(dirname "$0")" && pwd)
exec python "$here/arm_runtime.py" fetch
