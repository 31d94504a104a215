#!/usr/bin/env bash
# cargo.sh: run cargo with what building llama.cpp needs (the llama-cpp-sys-2 crate runs
# cmake and generates bindings with bindgen, which loads libclang).
#
# Where the machine has cmake and libclang (Debian: cmake, libclang-dev) they are used
# as they are. Otherwise the PyPI packages `cmake` and `libclang` are installed once into
# .tools/build with the ordinary pip client (no root needed) and pointed at through
# CMAKE and LIBCLANG_PATH. The libclang wheel carries no compiler headers, so bindgen is
# given gcc's own include directory.
#
# Usage: scripts/cargo.sh <cargo arguments...>
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
TOOLS="$REPO_ROOT/.tools/build"
CMAKE_SPEC='cmake==4.4.4'
LIBCLANG_SPEC='libclang==18.1.1'

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

system_libclang() {
    local dir
    for dir in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
        # libclang.so.N or libclang-N.so; not libclang-cpp, which bindgen cannot use.
        compgen -G "$dir/libclang.so*" >/dev/null && return 0
        compgen -G "$dir/libclang-[0-9]*.so*" >/dev/null && return 0
    done
    return 1
}

pip_into_tools() {
    command -v python3 >/dev/null 2>&1 || die "python3 is required to fetch $*"
    log "installing $* into $TOOLS with pip"
    python3 -m pip install --disable-pip-version-check --no-cache-dir --quiet \
        --upgrade --target "$TOOLS" "$@" >&2 || die "pip install of $* failed"
}

if [ -z "${CMAKE:-}" ] && ! command -v cmake >/dev/null 2>&1; then
    [ -x "$TOOLS/cmake/data/bin/cmake" ] || pip_into_tools "$CMAKE_SPEC"
    export CMAKE="$TOOLS/cmake/data/bin/cmake"
fi

if [ -z "${LIBCLANG_PATH:-}" ] && ! system_libclang; then
    [ -f "$TOOLS/clang/native/libclang.so" ] || pip_into_tools "$LIBCLANG_SPEC"
    export LIBCLANG_PATH="$TOOLS/clang/native"
    if [ -z "${BINDGEN_EXTRA_CLANG_ARGS:-}" ] && command -v gcc >/dev/null 2>&1; then
        export BINDGEN_EXTRA_CLANG_ARGS="-I$(gcc -print-file-name=include)"
    fi
fi

exec cargo "$@"
