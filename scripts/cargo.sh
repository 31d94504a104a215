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
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
# shellcheck source=scripts/lib/build-tools.sh
. "$SCRIPT_DIR/lib/build-tools.sh"

if [ -z "${CMAKE:-}" ] && ! command -v cmake >/dev/null 2>&1; then
    CMAKE=$(find_cmake)
    export CMAKE
fi
export_libclang

exec cargo "$@"
