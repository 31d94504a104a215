# Shared by scripts/cargo.sh and benches/peers/build.sh (sourced, not run): where cmake
# and libclang come from for building llama.cpp. The machine's own are used when present;
# otherwise the PyPI packages `cmake` and `libclang` are installed once into .tools/build
# with the ordinary pip client (no root needed). The caller sets REPO_ROOT and defines
# log and die before sourcing.

BUILD_TOOLS="$REPO_ROOT/.tools/build"
CMAKE_SPEC='cmake==4.4.4'
LIBCLANG_SPEC='libclang==18.1.1'

pip_into_build_tools() {
    command -v python3 >/dev/null 2>&1 || die "python3 is required to fetch $*"
    log "installing $* into $BUILD_TOOLS with pip"
    python3 -m pip install --disable-pip-version-check --no-cache-dir --quiet \
        --upgrade --target "$BUILD_TOOLS" "$@" >&2 || die "pip install of $* failed"
}

# Prints the cmake to run: $CMAKE, the one on PATH, or the PyPI one (installed if needed).
find_cmake() {
    if [ -n "${CMAKE:-}" ]; then
        printf '%s\n' "$CMAKE"
    elif command -v cmake >/dev/null 2>&1; then
        command -v cmake
    else
        [ -x "$BUILD_TOOLS/cmake/data/bin/cmake" ] || pip_into_build_tools "$CMAKE_SPEC"
        printf '%s\n' "$BUILD_TOOLS/cmake/data/bin/cmake"
    fi
}

# Whether the machine has a libclang bindgen can load: libclang.so.N or libclang-N.so,
# not libclang-cpp.
system_libclang() {
    local dir
    for dir in /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
        compgen -G "$dir/libclang.so*" >/dev/null && return 0
        compgen -G "$dir/libclang-[0-9]*.so*" >/dev/null && return 0
    done
    return 1
}

# Exports LIBCLANG_PATH (and gcc's include directory for bindgen, which the wheel lacks)
# when the machine has no libclang and the caller set none.
export_libclang() {
    if [ -z "${LIBCLANG_PATH:-}" ] && ! system_libclang; then
        [ -f "$BUILD_TOOLS/clang/native/libclang.so" ] || pip_into_build_tools "$LIBCLANG_SPEC"
        export LIBCLANG_PATH="$BUILD_TOOLS/clang/native"
        if [ -z "${BINDGEN_EXTRA_CLANG_ARGS:-}" ] && command -v gcc >/dev/null 2>&1; then
            export BINDGEN_EXTRA_CLANG_ARGS="-I$(gcc -print-file-name=include)"
        fi
    fi
}
