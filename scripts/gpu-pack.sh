#!/usr/bin/env bash
# gpu-pack.sh: prepares .gpu/ (git-ignored) for scripts/gpu-check.sh, which runs on a
# lent GPU machine that has a CUDA toolkit and a driver but no Rust toolchain and no
# network. What it packs, about 40 MiB:
# - the GPU tests (the e2e test binary and the modelpool-testbin its servers spawn), the
#   seed swap scenario and the synthetic-model writer, built with the `llama-shared`
#   feature: llama.cpp linked as shared libraries, so the libggml found at run time
#   decides the GPU backend and no CUDA toolkit is needed here;
# - llama.cpp's sources exactly as llama-cpp-sys-2 builds them, for gpu-check.sh to
#   build those shared libraries with CUDA there;
# - the first 2 MiB of SmolLM2's GGUF: its tokenizer, which the synthetic models copy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$root"
features=(--features modelpool-cli/llama-shared)
scripts/cargo.sh build -p modelpool-benches --bin swap_scenario --bin synth_gguf "${features[@]}"
e2e=$(scripts/cargo.sh test -p modelpool-tests --test e2e "${features[@]}" --no-run --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "e2e":
        print(m["executable"])')
[ -x "$e2e" ] || { echo "gpu-pack: no e2e test binary" >&2; exit 1; }
rm -rf .gpu
mkdir -p .gpu
# Stripped and xz-compressed: the device tool carries 64 MiB at most.
pack() { strip -o ".gpu/$2" "$1" && xz -T0 -6 ".gpu/$2"; }
pack "$e2e" e2e
pack target/debug/modelpool-testbin modelpool-testbin
pack target/debug/swap_scenario swap_scenario
pack target/debug/synth_gguf synth_gguf
head -c 2M "models/SmolLM2-135M-Instruct.Q4_1.gguf" > .gpu/tokenizer.gguf
# The llama.cpp tree llama-cpp-sys-2 built, less what a CUDA build never reads.
src=$(cargo metadata --format-version 1 | python3 -c 'import json,sys,os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "llama-cpp-sys-2"))')/llama.cpp
exclude=()
for d in docs examples tools tests models gguf-py grammars pocs ci; do exclude+=(--exclude="./$d"); done
for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
    exclude+=(--exclude="./ggml/src/ggml-$b")
done
tar -C "$src" "${exclude[@]}" -cJf .gpu/llama-src.tar.xz .
du -sh .gpu .gpu/* | sed 's/^/gpu-pack: /'
