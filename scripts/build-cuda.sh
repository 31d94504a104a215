#!/usr/bin/env bash
# build-cuda.sh ARCH [cargo args...]: the server with llama.cpp's CUDA backend compiled
# in for GPU architecture ARCH (CMAKE_CUDA_ARCHITECTURES), in release. Installs Debian's
# CUDA toolkit when no nvcc is found (scripts/install-cuda-toolkit.sh).
#
# Two things Debian's toolkit (CUDA 11.8, libraries in /usr/lib/x86_64-linux-gnu) needs:
# - ggml uses two Hopper device functions CUDA 11.8's headers do not declare: a header
#   of ours declares them (scripts/cuda/cuda11-pdl.cuh; it does nothing on CUDA 12+);
# - llama-cpp-sys-2 links CUDA's static libraries from the directories find_cuda_helper
#   finds, which must be `<root>/lib64`: a root whose lib64 is Debian's library
#   directory is made under .tools/ (CUDA_PATH then makes its build script look again).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$root"
arch=${1:-90}
shift || true
scripts/install-cuda-toolkit.sh
if [ -z "${CUDA_PATH:-}" ] && [ -f /usr/lib/x86_64-linux-gnu/libcudart_static.a ]; then
    mkdir -p .tools/cuda-debian
    ln -sfn /usr/lib/x86_64-linux-gnu .tools/cuda-debian/lib64
    export CUDA_PATH=$root/.tools/cuda-debian CUDA_LIBRARY_PATH=$root/.tools/cuda-debian
fi
export CMAKE_CUDA_ARCHITECTURES=$arch
export CMAKE_CUDA_FLAGS="${CMAKE_CUDA_FLAGS:+$CMAKE_CUDA_FLAGS }-include $root/scripts/cuda/cuda11-pdl.cuh"
exec scripts/cargo.sh build --release --bin modelpool --features modelpool-cli/cuda "$@"
