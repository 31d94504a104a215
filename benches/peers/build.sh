#!/usr/bin/env bash
# build.sh: build llama.cpp's own `llama-bench` and `llama-server` into .tools/peers/, as
# the peers `bench-engines` measures modelpool against. Nothing of llama.cpp is committed:
# its sources come from the sdist of the PyPI package llama-cpp-python (pinned, sha256
# checked), which vendors the whole llama.cpp tree (vendor/llama.cpp, tools included).
#
# The CPU flags are modelpool's: the target-cpu in .cargo/config.toml becomes -march, and
# the target features rustc enables for it become the GGML_* switches, as the
# llama-cpp-sys-2 build script maps them (GGML_NATIVE off, OpenMP on, Release). The
# binaries are linked statically against llama.cpp (BUILD_SHARED_LIBS=OFF), so they need
# no library of their own next to them. The Web UI is left out (no download at build).
#
# Idempotent: a build whose stamp matches (package version + flags) is kept. cmake is
# the system one, else the PyPI `cmake` package in .tools/build (as scripts/cargo.sh).
#
# Usage: benches/peers/build.sh          Env: JOBS (default 2), CMAKE
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
DEST="$REPO_ROOT/.tools/peers"
PKG='llama-cpp-python'
PKG_VERSION='0.3.36'
# llama.cpp commit it vendors (from its changelog), for the record.
LLAMA_COMMIT='0c1e57098'
SDIST_SHA256='832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e'
JOBS=${JOBS:-2}
BINARIES=(llama-bench llama-server)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

TMP=''
cleanup() { [ -n "$TMP" ] && rm -rf -- "$TMP"; return 0; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The target-cpu modelpool is compiled for (.cargo/config.toml), e.g. x86-64-v3.
target_cpu() {
    local cpu
    cpu=$(grep -o 'target-cpu=[A-Za-z0-9_.-]*' "$REPO_ROOT/.cargo/config.toml" | head -n1)
    printf '%s\n' "${cpu#target-cpu=}"
}

# GGML_* switches for the features rustc enables at that target-cpu, mapped as the
# llama-cpp-sys-2 build script maps CARGO_CFG_TARGET_FEATURE.
ggml_feature_flags() {
    local feature
    rustc --print cfg -C "target-cpu=$1" | sed -n 's/^target_feature="\(.*\)"$/\1/p' |
        while read -r feature; do
            case "$feature" in
                avx) echo -DGGML_AVX=ON ;;
                avx2) echo -DGGML_AVX2=ON ;;
                avx512bf16) echo -DGGML_AVX512_BF16=ON ;;
                avx512vbmi) echo -DGGML_AVX512_VBMI=ON ;;
                avx512vnni) echo -DGGML_AVX512_VNNI=ON ;;
                avxvnni) echo -DGGML_AVX_VNNI=ON ;;
                bmi2) echo -DGGML_BMI2=ON ;;
                f16c) echo -DGGML_F16C=ON ;;
                fma) echo -DGGML_FMA=ON ;;
                sse4.2) echo -DGGML_SSE42=ON ;;
            esac
        done
}

# shellcheck source=scripts/lib/build-tools.sh
. "$REPO_ROOT/scripts/lib/build-tools.sh"

command -v rustc >/dev/null 2>&1 || die "rustc is required (to read modelpool's CPU features)"
command -v python3 >/dev/null 2>&1 || die "python3 with pip is required"
CPU=$(target_cpu)
[ -n "$CPU" ] || die "no target-cpu in $REPO_ROOT/.cargo/config.toml"
mapfile -t FEATURE_FLAGS < <(ggml_feature_flags "$CPU")
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    "-DCMAKE_C_FLAGS=-march=$CPU"
    "-DCMAKE_CXX_FLAGS=-march=$CPU"
    "${FEATURE_FLAGS[@]}"
    -DGGML_OPENMP=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
)
STAMP="$PKG==$PKG_VERSION llama.cpp@$LLAMA_COMMIT ${CMAKE_FLAGS[*]}"

present() {
    local bin
    for bin in "${BINARIES[@]}"; do
        [ -x "$DEST/$bin" ] || return 1
    done
    [ -f "$DEST/STAMP" ] && [ "$(cat "$DEST/STAMP")" = "$STAMP" ]
}

if present; then
    log "$DEST already holds llama-bench and llama-server from $PKG $PKG_VERSION"
    exit 0
fi

CMAKE_BIN=$(find_cmake)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/peers.XXXXXX")
log "downloading the $PKG $PKG_VERSION sdist with pip"
# Only this package as source: pip prepares its metadata in an isolated environment,
# where `--no-binary :all:` would compile cmake and ninja from source. With cmake on PATH
# the build backend does not ask for the cmake wheel either.
PATH="$(dirname "$CMAKE_BIN"):$PATH" python3 -m pip download --no-deps --no-cache-dir \
    --disable-pip-version-check --no-binary "$PKG" -d "$TMP/dl" "$PKG==$PKG_VERSION" >&2 \
    || die "pip download of $PKG==$PKG_VERSION failed"
SDIST="$TMP/dl/llama_cpp_python-$PKG_VERSION.tar.gz"
[ -f "$SDIST" ] || die "pip did not produce $SDIST"
have=$(sha256sum -- "$SDIST" | cut -d' ' -f1)
[ "$have" = "$SDIST_SHA256" ] || die "sha256 mismatch for $SDIST: got $have, expected $SDIST_SHA256"

log "extracting vendor/llama.cpp"
mkdir -p "$TMP/src"
tar -xzf "$SDIST" -C "$TMP/src" --strip-components=3 "llama_cpp_python-$PKG_VERSION/vendor/llama.cpp"
rm -rf -- "$TMP/dl"

log "configuring (march=$CPU, ${#FEATURE_FLAGS[@]} GGML feature switches, OpenMP)"
"$CMAKE_BIN" -S "$TMP/src" -B "$TMP/build" "${CMAKE_FLAGS[@]}" >"$TMP/configure.log" 2>&1 \
    || { tail -n 40 "$TMP/configure.log" >&2; die "cmake configure failed"; }
log "building ${BINARIES[*]} with -j$JOBS"
"$CMAKE_BIN" --build "$TMP/build" --config Release -j "$JOBS" --target "${BINARIES[@]}" \
    >"$TMP/build.log" 2>&1 || { tail -n 40 "$TMP/build.log" >&2; die "build failed"; }

mkdir -p "$DEST"
rm -f -- "$DEST/STAMP"
for bin in "${BINARIES[@]}"; do
    built="$TMP/build/bin/$bin"
    [ -x "$built" ] || die "the build produced no $built"
    if ldd "$built" | grep -q 'not found'; then
        ldd "$built" >&2
        die "$bin needs a library that is missing"
    fi
    cp -- "$built" "$DEST/.$bin.tmp" && mv -f -- "$DEST/.$bin.tmp" "$DEST/$bin"
done
"$DEST/llama-server" --version >/dev/null 2>&1 || die "the built llama-server does not run"
printf '%s\n' "$STAMP" >"$DEST/STAMP"
log "installed ${BINARIES[*]} into $DEST ($PKG $PKG_VERSION, llama.cpp $LLAMA_COMMIT)"
