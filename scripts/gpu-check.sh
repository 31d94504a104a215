#!/usr/bin/env bash
# gpu-check.sh: issue 30's GPU checks on a lent GPU machine, in one run that fits a few
# minutes. Needs .gpu/ from scripts/gpu-pack.sh (made where Rust is), and there: an
# NVIDIA driver, nvcc, cmake and ninja. It
#   1. builds llama.cpp's shared libraries with CUDA for CUDA_ARCH (default 90) on every
#      core, from the sources llama-cpp-sys-2 builds, and puts them on the library path;
#   2. meanwhile writes the synthetic models: one SmolLM2-shaped, two 7B-shaped (Q4_0);
#   3. runs the GPU tests (tests/tests/e2e/gpu.rs): every layer on the GPU, VRAM charged
#      vs NVML, VRAM back after an eviction, refusal over the VRAM budget;
#   4. runs the seed swap scenario on cuda:0: five small models under load and one
#      swap slot alternating between the 7B-shaped models, under a VRAM budget;
#   5. checks that no worker is left on the GPU.
# The report goes to stdout and to $OUT/gpu-report.md (OUT: the device tool's folder;
# else target/gpu-check), each step's log beside it.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$root"
out=${OUT:-$root/target/gpu-check}
mkdir -p "$out"
report=$out/gpu-report.md
: >"$report"
say() { printf '%s\n' "$*" | tee -a "$report"; }
failed=0
# step NAME SECONDS CMD...: runs CMD under a time limit, its output in $out/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc ms
    t0=$(date +%s%N)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    say "- $name: exit $rc after $((ms / 1000)).$((ms % 1000 / 100)) s"
    [ "$rc" = 0 ] || { failed=1; tail -n 15 "$out/$name.log" | sed 's/^/    /' | tee -a "$report"; }
    return "$rc"
}
[ -d .gpu ] || { echo "gpu-check: .gpu/ is missing: run scripts/gpu-pack.sh first" >&2; exit 2; }
# xz, or Python's lzma where the machine has no xz.
unxz() {
    if command -v xz >/dev/null; then xz -dc "$1"; else
        python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"
    fi
}
# The binaries, in the layout the e2e tests expect: <dir>/deps/e2e, <dir>/modelpool-testbin.
bin=/tmp/modelpool-gpu
mkdir -p "$bin/deps"
for b in deps/e2e modelpool-testbin swap_scenario synth_gguf; do
    unxz ".gpu/$(basename "$b").xz" >"$bin/$b" && chmod +x "$bin/$b" || exit 1
done

say "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
say "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
say "- nvcc: $(nvcc --version 2>&1 | tail -1); cores: $(nproc)"

# 2. Models, written while llama.cpp builds.
mkdir -p models
small=models/gpu-small-135m.gguf
synth() { "$bin/synth_gguf" --tokenizer-from .gpu/tokenizer.gguf "$@"; }
step synth-models 300 bash -c "$(declare -f synth); bin=$bin
    synth --shape 135m --quant q4-0 --out $small &&
    { synth --shape 7b --out models/synth-llama-7b-a.gguf --seed 1 & a=\$!
      synth --shape 7b --out models/synth-llama-7b-b.gguf --seed 2 && wait \$a; }" \
    &
synth_pid=$!

# 1. llama.cpp with CUDA, as shared libraries (LLAMA_LIBS: use those instead, e.g. the
#    CPU ones cargo built, to try this script where there is no GPU). Flash-attention
#    kernels are off unless CUDA_FA=ON: they are most of the build's time, and llama.cpp
#    runs without them (its automatic choice falls back).
arch=${CUDA_ARCH:-90}
if [ -z "${LLAMA_LIBS:-}" ]; then
    src=/tmp/modelpool-llama-src
    build=/tmp/modelpool-llama-cuda
    rm -rf "$src" && mkdir -p "$src" && unxz .gpu/llama-src.tar.xz | tar -C "$src" -x || exit 1
    step cuda-configure 120 cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_FA="${CUDA_FA:-OFF}" -DGGML_CPU_REPACK=OFF -DGGML_OPENMP=ON -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
        || exit 1
    step cuda-build 360 cmake --build "$build" -j "$(nproc)" || exit 1
    LLAMA_LIBS=$(dirname "$(find "$build" -name 'libggml-cuda.so*' | head -1)")
fi
export LD_LIBRARY_PATH=$LLAMA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(ldd "$bin/modelpool-testbin" | grep 'not found')
[ -z "$missing" ] || { say "- libraries not found: $missing"; exit 1; }
wait "$synth_pid" || exit 1

# 3. The GPU tests.
export CARGO_MANIFEST_DIR=$root/tests MODELPOOL_GPU_SMALL=$root/$small \
    MODELPOOL_GPU_LARGE=$root/models/synth-llama-7b-a.gguf
step gpu-tests 200 "$bin/deps/e2e" gpu:: --test-threads 1 --nocapture
grep -h -e '^gpu-report:' -e '^test ' -e '^test result' -e '^skipped' "$out/gpu-tests.log" | sed 's/^/    /' | tee -a "$report"

# 4. The seed scenario on the GPU.
step swap-scenario 180 "$bin/swap_scenario" --device cuda:0 --small "$small" --small-count 5 \
    --large models/synth-llama-7b-a.gguf models/synth-llama-7b-b.gguf \
    --phase-secs 15 --swap-every-secs 5 --svg "$out/swap-gpu.svg"
grep -h -e '^|' -e '^swaps' -e 'budget' "$out/swap-scenario.log" | sed 's/^/    /' | tee -a "$report"

# 5. Nothing left behind on the GPU.
left=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>&1)
say "- compute processes left on the GPU: ${left:-none}"
[ -z "$left" ] || failed=1
say "- result: $([ "$failed" = 0 ] && echo pass || echo FAIL)"
exit "$failed"
