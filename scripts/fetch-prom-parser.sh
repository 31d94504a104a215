#!/usr/bin/env bash
# fetch-prom-parser.sh: put the reference Prometheus text-format parser (the Python
# package prometheus-client, pure Python) into DEST_DIR, for the end-to-end test that
# scrapes /metrics and parses it as Prometheus would.
#
# Usage: scripts/fetch-prom-parser.sh [DEST_DIR]      (default: <repo>/.tools/python)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
# shellcheck source=scripts/lib/pip-fetch.sh
. "$SCRIPT_DIR/lib/pip-fetch.sh"

VERSION='0.21.1'
PKG_SPEC="prometheus-client==$VERSION"
WHEEL_SHA256='594b45c410d6f4f8888940fe80b5cc2521b305a1fafe1c58609ef715a001f301'
DEST_DIR=${1:-$REPO_ROOT/.tools/python}
STAMP="$DEST_DIR/prometheus_client.version"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VERSION" ] && [ -f "$DEST_DIR/prometheus_client/parser.py" ]; then
    log "$DEST_DIR already has prometheus-client $VERSION"
    exit 0
fi
command -v python3 >/dev/null 2>&1 || die "python3 is required"
mkdir -p -- "$DEST_DIR" || die "cannot create $DEST_DIR"
TMP_DL=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
log "downloading $PKG_SPEC with pip"
python3 -m pip download --no-deps --only-binary=:all: --no-cache-dir \
        --disable-pip-version-check -d "$TMP_DL" "$PKG_SPEC" >&2 \
    || die "pip download of $PKG_SPEC failed"
wheel=("$TMP_DL"/*.whl)
[ -f "${wheel[0]}" ] || die "pip download produced no wheel"
got=$(sha256_of "${wheel[0]}")
[ "$got" = "$WHEEL_SHA256" ] || die "sha256 of $(basename "${wheel[0]}") is $got, expected $WHEEL_SHA256"
rm -rf -- "$DEST_DIR/prometheus_client"
python3 - "${wheel[0]}" "$TMP_DL/unpacked" <<'PY' || die "unpacking failed"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("prometheus_client/")])
PY
mv -- "$TMP_DL/unpacked/prometheus_client" "$DEST_DIR/prometheus_client" || die "cannot move the package into $DEST_DIR"
printf '%s\n' "$VERSION" > "$STAMP"
log "installed prometheus-client $VERSION into $DEST_DIR"
