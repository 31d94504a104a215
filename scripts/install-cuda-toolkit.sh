#!/usr/bin/env bash
# Installs Debian's CUDA toolkit (nvcc, cudart, cuBLAS; 11.8 on bookworm, sm_90 included)
# when no nvcc is on PATH. Debian ships it in non-free, so non-free is added to apt's
# sources in a file of its own first. Needs root (or sudo) and the Debian mirror.
set -euo pipefail
if command -v nvcc >/dev/null 2>&1; then
    echo "nvcc already here: $(command -v nvcc)"
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
. /etc/os-release
if [ "${ID:-}" != debian ]; then
    echo "install-cuda-toolkit: this script knows Debian's packages; on ${ID:-this system} install a CUDA toolkit (nvcc, cuBLAS) yourself" >&2
    exit 1
fi
# non-free from the mirrors this machine already uses: its own Debian entries, with the
# components swapped.
list=/etc/apt/sources.list.d/modelpool-non-free.sources
if [ ! -f "$list" ]; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed -e 's/^Components:.*/Components: contrib non-free/' \
            /etc/apt/sources.list.d/debian.sources | $sudo tee "$list" >/dev/null
    elif [ -f /etc/apt/sources.list ]; then
        list=/etc/apt/sources.list.d/modelpool-non-free.list
        grep -E '^deb ' /etc/apt/sources.list | sed -E 's/ main( .*)?$/ contrib non-free/' \
            | $sudo tee "$list" >/dev/null
    else
        echo "install-cuda-toolkit: no Debian apt sources found to add non-free to" >&2
        exit 1
    fi
fi
$sudo apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nvidia-cuda-toolkit
nvcc --version
