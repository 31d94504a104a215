#!/usr/bin/env bash
# fetch-py-clients.sh: put the official `openai` and `tritonclient[grpc]` Python packages
# (and what they import, every version pinned in tests/clients/requirements.txt) into
# DEST_DIR, for the end-to-end tests that drive the OpenAI-compatible and KServe v2
# front ends with real clients. Idempotent: a stamp records what is installed.
#
# Usage: scripts/fetch-py-clients.sh [DEST_DIR]      (default: <repo>/.tools/python)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
# shellcheck source=scripts/lib/pip-fetch.sh
. "$SCRIPT_DIR/lib/pip-fetch.sh"

REQUIREMENTS="$REPO_ROOT/tests/clients/requirements.txt"
DEST_DIR=${1:-$REPO_ROOT/.tools/python}
STAMP="$DEST_DIR/py-clients.requirements"

command -v python3 >/dev/null 2>&1 || die "python3 is required"
if [ -f "$STAMP" ] && cmp -s "$STAMP" "$REQUIREMENTS" \
    && PYTHONPATH="$DEST_DIR" python3 -c 'import openai, tritonclient.grpc' >/dev/null 2>&1; then
    log "$DEST_DIR already has the pinned openai and tritonclient packages"
    exit 0
fi
mkdir -p -- "$DEST_DIR" || die "cannot create $DEST_DIR"
log "installing the pinned openai and tritonclient[grpc] packages with pip"
rm -f -- "$STAMP"
python3 -m pip install --no-deps --only-binary=:all: --no-cache-dir --disable-pip-version-check \
        --quiet --upgrade --target "$DEST_DIR" -r "$REQUIREMENTS" >&2 \
    || die "pip install of $REQUIREMENTS failed"
PYTHONPATH="$DEST_DIR" python3 -c 'import openai, tritonclient.grpc' \
    || die "the installed clients do not import"
cp -- "$REQUIREMENTS" "$STAMP"
log "installed openai and tritonclient[grpc] into $DEST_DIR"
