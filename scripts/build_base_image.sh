#!/usr/bin/env bash
# Build a CPU stand-in for the GPU base image, for CI and machines that cannot reach a
# container registry.
#
# The real base, tensorflow/tensorflow:2.21.0-gpu, is Ubuntu 22.04 with Python 3.11 as the
# system Python, TensorFlow installed into it by pip, running as root. The stand-in mimics
# what the Dockerfile relies on: debootstrapped Debian bookworm (Python 3.11, apt, bash),
# tensorflow==2.21.0 pip-installed into the system Python as root, and this host's CA
# bundle so that pip and apt over TLS work inside `docker build` behind an intercepting
# proxy. It has no CUDA: the image built on it trains on the CPU.
#
#   usage: sudo scripts/build_base_image.sh [TAG]
#   env:   STANDIN_TAG     image tag (default below; the first argument wins)
#          DEBIAN_MIRROR   default: the host's Debian mirror, else http://deb.debian.org/debian
#          CA_BUNDLE       default: /etc/ssl/certs/ca-certificates.crt
#          FORCE=1         rebuild even if the tag exists
#
# The image is cached by tag: when `docker image inspect TAG` finds it, nothing is built.
# Then: docker build --network host --build-arg BASE_IMAGE=TAG -t trainjob:VERSION .
set -euo pipefail

TF_VERSION=2.21.0
SUITE=bookworm
TAG=${1:-${STANDIN_TAG:-trainjob-base-standin:tf${TF_VERSION}-py3.11-${SUITE}}}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

die() { echo "build_base_image.sh: error: $*" >&2; exit 1; }
log() { echo "build_base_image.sh: $*"; }

host_mirror() {
    # The first Debian mirror the host's apt uses (deb822 or one-line format).
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\/\?\)[[:space:]]*$/\1/p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(sed -n 's/^deb[[:space:]]\+\(http[^[:space:]]*\/debian\/\?\)[[:space:]].*/\1/p' \
            /etc/apt/sources.list 2>/dev/null | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror)}

command -v docker >/dev/null || die "docker is not installed"
if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG is already built (FORCE=1 rebuilds it)"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[ -s "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE not found (set CA_BUNDLE)"

work=$(mktemp -d /var/tmp/trainjob-standin.XXXXXX)
rootfs=$work/rootfs
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT

start=$SECONDS
log "debootstrap $SUITE from $MIRROR into $rootfs"
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $((SECONDS - start))s"

# The host's CA bundle, kept across any later update-ca-certificates run (apt triggers one).
cp "$CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
chroot "$rootfs" /usr/sbin/update-ca-certificates >/dev/null 2>&1 \
    || die "update-ca-certificates failed in the stand-in"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"

log "pip install tensorflow==$TF_VERSION into the system Python"
# A clean environment: the host's pip settings (local indexes, find-links) mean nothing there.
chroot "$rootfs" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DEFAULT_TIMEOUT=180 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
    python3 -m pip install --no-cache-dir --progress-bar off "tensorflow==$TF_VERSION" \
    >"$work/pip.log" 2>&1 || { tail -n 30 "$work/pip.log" >&2; die "pip install failed"; }
chroot "$rootfs" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
log "tensorflow installed ($((SECONDS - start))s so far)"

chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/root/.cache "$rootfs"/tmp/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
: >"$rootfs/etc/resolv.conf"

log "importing the root filesystem as $TAG"
tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.title=trainjob-base-standin org.opencontainers.image.description=\"CPU stand-in for tensorflow/tensorflow:${TF_VERSION}-gpu: Debian ${SUITE}, Python 3.11, tensorflow==${TF_VERSION}\"" \
    --message "debootstrap $SUITE + tensorflow==$TF_VERSION (scripts/build_base_image.sh)" \
    - "$TAG" >/dev/null
log "built $TAG in $((SECONDS - start))s"
