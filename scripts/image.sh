#!/usr/bin/env bash
# image.sh: build the CPU image (deploy/Dockerfile, stage `prebuilt`) with bh from
# the modelpool binary cargo builds on this machine, without a Docker daemon and
# without a Rust image.
#
# The runtime stage's base image (the name deploy/Dockerfile gives it) is used from
# local storage when there, else pulled; when it cannot be pulled (no registry
# reachable), a minimal Debian bookworm root file system made with `debootstrap
# --variant=minbase` (slimmed like the registry's -slim images: no docs, man pages or
# locales) is committed under that name instead. Installing libgomp1 in the runtime
# stage still needs a Debian mirror (apt), as debootstrap does.
#
# Idempotent: buildah's layer cache makes a re-run with the same binary take ~20 s
# (vfs copies); the previous image, when replaced, is removed; temporary directories and
# working containers are removed whatever happens. Needs root, buildah and (only when
# the base image is missing and cannot be pulled) debootstrap.
#
# Usage: scripts/image.sh [--profile dev|release] [--binary PATH] [--tag NAME]
#   --profile  which cargo build to take (default dev: target/debug/modelpool, built
#              first with scripts/cargo.sh; release is the production build)
#   --binary   take this binary as it is; cargo is not run
#   --tag      image name (default modelpool:0.1.0, the name the manifests use)
# Env: STORAGE_DRIVER (default vfs), BUILDAH_ISOLATION (default chroot),
#      DEBIAN_MIRROR (debootstrap's mirror; debootstrap's own default when unset)
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
DOCKERFILE="$REPO_ROOT/deploy/Dockerfile"
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

profile=dev
binary=''
tag=modelpool:0.1.0
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=${2:?--profile needs a value}; shift 2 ;;
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$profile" in
    dev) profile_dir=debug; cargo_profile=() ;;
    release) profile_dir=release; cargo_profile=(--release) ;;
    *) die "--profile is dev or release, not '$profile'" ;;
esac

export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
[ "$(id -u)" -eq 0 ] || die "buildah with the $STORAGE_DRIVER driver needs root here (uid $(id -u))"
command -v buildah >/dev/null 2>&1 || die "buildah is missing (Debian: apt-get install buildah)"
# buildah 1.28 reads no STORAGE_DRIVER from the environment: pass it on every call.
bh() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

WORK=''
CONTAINER=''
cleanup() {
    if [ -n "$CONTAINER" ]; then
        bh rm "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ -n "$WORK" ]; then
        # debootstrap mounts proc and sys inside its target; a failed run may leave them.
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" || true; done
        rm -rf --one-file-system -- "$WORK"
    fi
}
trap cleanup EXIT
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/modelpool-image.XXXXXX")

# One build at a time per checkout (the test and `just image` share the image name).
mkdir -p "$TARGET_DIR"
exec 9>"$TARGET_DIR/.modelpool-image.lock"
flock 9

# The base image's name, as the runtime stage spells it.
base=$(sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]\{1,\}\)[[:space:]]\{1,\}AS[[:space:]]\{1,\}runtime[[:space:]]*$/\1/p' "$DOCKERFILE")
[ -n "$base" ] || die "no 'FROM <image> AS runtime' line in $DOCKERFILE"

image_present() { bh inspect --type image "$1" >/dev/null 2>&1; }

# debootstrap a minbase bookworm and commit it as $base.
provide_base() {
    command -v debootstrap >/dev/null 2>&1 ||
        die "$base cannot be pulled and debootstrap is missing (Debian: apt-get install debootstrap)"
    local root="$WORK/rootfs" mnt
    log "making $base with debootstrap --variant=minbase bookworm"
    # shellcheck disable=SC2086 # DEBIAN_MIRROR is one optional word
    debootstrap --variant=minbase bookworm "$root" ${DEBIAN_MIRROR:-} >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    # Slim: later package installs skip docs, man pages and locales too.
    cat >"$root/etc/dpkg/dpkg.cfg.d/modelpool-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
EOF
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
        "$root"/usr/share/groff/* "$root"/usr/share/lintian/*
    # What a container runtime provides or an image should not carry.
    rm -rf "$root"/dev/* "$root"/tmp/* "$root"/var/lib/apt/lists/* \
        "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/apt "$root"/var/log/dpkg.log "$root"/var/log/bootstrap.log

    CONTAINER=$(bh from scratch)
    mnt=$(bh mount "$CONTAINER")
    tar -C "$root" --numeric-owner --xattrs -cpf - . | tar -C "$mnt" --numeric-owner --xattrs -xpf -
    bh umount "$CONTAINER" >/dev/null
    bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd bash --label org.opencontainers.image.description="debootstrap minbase bookworm" \
        "$CONTAINER"
    bh commit --quiet --rm "$CONTAINER" "$base" >/dev/null
    CONTAINER=''
    rm -rf --one-file-system -- "$root"
}

if image_present "$base"; then
    log "base $base: in local storage"
elif bh pull --quiet --retry 0 "$base" >/dev/null 2>"$WORK/pull.err"; then
    log "base $base: pulled"
else
    log "base $base: cannot be pulled ($(tail -n 1 "$WORK/pull.err"))"
    provide_base
fi

if [ -z "$binary" ]; then
    log "building the $profile binary with scripts/cargo.sh"
    (cd "$REPO_ROOT" && "$SCRIPT_DIR/cargo.sh" build "${cargo_profile[@]}" --bin modelpool) >&2
    binary="$TARGET_DIR/$profile_dir/modelpool"
fi
[ -f "$binary" ] || die "$binary is missing"

# The build context: the Dockerfile's inputs and the binary, nothing else.
ctx="$WORK/context"
mkdir -p "$ctx/deploy/k8s/base"
cp "$REPO_ROOT/deploy/k8s/base/modelpool.toml" "$ctx/deploy/k8s/base/"
ln "$binary" "$ctx/modelpool" 2>/dev/null || cp "$binary" "$ctx/modelpool"

old=$(bh inspect --type image --format '{{.FromImageID}}' "$tag" 2>/dev/null || true)
bh bud --quiet --layers --pull=false -f "$DOCKERFILE" --target prebuilt \
    --build-arg MODELPOOL_BINARY=modelpool -t "$tag" "$ctx" >/dev/null
new=$(bh inspect --type image --format '{{.FromImageID}}' "$tag")
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    bh rmi "$old" >/dev/null 2>&1 || log "previous image ${old:0:12} kept (in use)"
fi
size=$(bh images --noheading --format '{{.Size}}' "$tag" | head -n 1)
log "$tag: image ${new:0:12}, $size, from $binary"
