#!/usr/bin/env bash
# token_path.sh: where a decoding token's time goes, from llama.cpp's decode thread
# through the worker's relay to the gRPC client. Runs the `token_path` bench (one
# llama.cpp model decoding one request after another) under `perf record -a -g` and
# prints the samples by process and thread, by library, and the top symbols outside
# ggml. Needs perf (Debian: linux-perf) and perf_event_paranoid <= 1 (or root).
#
# Usage: benches/profile/token_path.sh [SECONDS]     Output: target/profile/token_path.*
set -euo pipefail
SECS=${1:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd -P)
OUT="$ROOT/target/profile"
mkdir -p "$OUT"
cd "$ROOT"
scripts/cargo.sh build -p modelpool-benches --bin token_path
BIN=target/debug/token_path
LOG="$OUT/token_path.log"
"$BIN" --secs "$SECS" >"$LOG" 2>&1 &
BENCH=$!
trap 'kill $BENCH 2>/dev/null || true' EXIT
until grep -q '^decoding for' "$LOG"; do
    kill -0 "$BENCH" 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.2
done
perf record -a -g -F 499 -o "$OUT/token_path.data" -- sleep "$((SECS - 2))" 2>/dev/null
wait "$BENCH"
trap - EXIT
cat "$LOG"
report() { perf report -i "$OUT/token_path.data" --stdio --no-children "$@" 2>/dev/null | grep -v '^#' | grep -v '^$'; }
echo "## by process and thread"
report --sort comm -g none | head -20
echo "## by library"
report --sort dso -g none | head -20
echo "## top symbols outside ggml and the kernel"
report --sort dso,sym -g none | grep -v 'libggml\|kernel\|\[k\]' | head -30
