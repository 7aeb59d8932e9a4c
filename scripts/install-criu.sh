#!/usr/bin/env bash
# Install CRIU >= 4.2 and pycriu for prewarm-pool, idempotently.
#
# Debian 12's criu 3.17 fails on kernels >= 6.13 and Debian 13's 4.1.1 cannot dump TCP sockets on
# kernels >= 6.16, so unless the machine already has a CRIU >= 4.2 that passes `criu check`, we unpack
# Debian testing's criu 4.2.x with its own libc into a private prefix and run it through that prefix's
# loader. The system's libc and packages are not touched.
#
# Result (PREFIX defaults to /opt/prewarm-pool/criu):
#   PREFIX/bin/criu        wrapper that runs the right CRIU binary
#   PREFIX/python/pycriu   the pycriu package (made importable by the venv's .pth, see Makefile)
# Usage: install-criu.sh [--prefix DIR] [--force]
set -euo pipefail

PREFIX=${POOL_CRIU_PREFIX:-/opt/prewarm-pool/criu}
FORCE=0
SUITE=${POOL_CRIU_SUITE:-forky}
MIRROR=${POOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# criu 4.2.x and what it links against, as packaged in Debian testing (criu-notes.md).
PACKAGES="criu libcompel1 python3-pycriu libc6 libgnutls30t64 libnettle8t64 libhogweed6t64 libp11-kit0
libunistring5 libidn2-0 libtasn1-6 libgmp10 libnftables1 libnl-3-200 libprotobuf-c1 libnet9 libbsd0 libmd0
libuuid1 libjansson4 libmnl0 libnftnl11 libxtables12 libedit2 libffi8 libtinfo6"

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install-criu: unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { echo "install-criu: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (CRIU needs root to checkpoint and restore)"

# version_ok BIN: prints the version and succeeds when BIN is CRIU >= 4.2 and `criu check` passes.
version_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  { [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "${minor:-0}" -ge 2 ]; }; } || return 1
  "$1" check >/dev/null 2>&1 || return 1
  echo "$v"
}

write_wrapper() {  # write_wrapper TARGET_COMMAND...
  mkdir -p "$PREFIX/bin"
  local tmp="$PREFIX/bin/.criu.tmp"
  { echo '#!/bin/sh'; echo '# written by prewarm-pool scripts/install-criu.sh'; echo "exec $* \"\$@\""; } >"$tmp"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$PREFIX/bin/criu"
}

if [ "$FORCE" = 0 ] && [ -x "$PREFIX/bin/criu" ] && [ -d "$PREFIX/python/pycriu" ] \
   && v=$(version_ok "$PREFIX/bin/criu"); then
  log "CRIU $v already installed at $PREFIX (nothing to do)"
  exit 0
fi

# A system CRIU >= 4.2 with its pycriu is used as it is.
if [ "$FORCE" = 0 ] && command -v criu >/dev/null && v=$(version_ok "$(command -v criu)") \
   && [ -d /usr/lib/python3/dist-packages/pycriu ]; then
  log "using the system's CRIU $v"
  write_wrapper "$(command -v criu)"
  mkdir -p "$PREFIX/python"
  ln -sfn /usr/lib/python3/dist-packages/pycriu "$PREFIX/python/pycriu"
  exit 0
fi

command -v apt-get >/dev/null || die "no CRIU >= 4.2 found and apt-get is missing: install CRIU >= 4.2 by hand and set POOL_CRIU"
[ -f "$KEYRING" ] || die "$KEYRING is missing: apt-get install debian-archive-keyring"

work=$(mktemp -d /tmp/pool-criu-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
cat >"$work/sources/pool-criu.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE
Components: main
Signed-By: $KEYRING
SRC
APT=(-o "Dir::Etc::SourceParts=$work/sources" -o Dir::Etc::SourceList=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
log "fetching the $SUITE package list"
apt-get "${APT[@]}" -qq update >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; die "apt-get update for $SUITE failed"; }
log "downloading criu and its libraries from $SUITE"
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get "${APT[@]}" -qq download $PACKAGES) >"$work/apt.log" 2>&1 \
  || { cat "$work/apt.log" >&2; die "apt-get download failed"; }
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done

libdir="$work/root/usr/lib/x86_64-linux-gnu"
[ -x "$libdir/ld-linux-x86-64.so.2" ] || die "the unpacked libc6 has no loader at $libdir (architecture $(uname -m) unsupported by this installer)"
[ -d "$work/root/usr/lib/python3/dist-packages/pycriu" ] || die "python3-pycriu did not unpack a pycriu package"

# Publish atomically: build the new prefix beside the old one, then swap directories.
stage="$PREFIX.new.$$"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/python" "$(dirname "$PREFIX")"
mv "$work/root" "$stage/root"
cp -a "$stage/root/usr/lib/python3/dist-packages/pycriu" "$stage/python/pycriu"
L="$PREFIX/root/usr/lib/x86_64-linux-gnu"
{ echo '#!/bin/sh'; echo '# written by prewarm-pool scripts/install-criu.sh: CRIU with its own libc'
  echo "exec $L/ld-linux-x86-64.so.2 --library-path $L $PREFIX/root/usr/sbin/criu \"\$@\""; } >"$stage/bin/criu"
chmod 0755 "$stage/bin/criu"
if [ -e "$PREFIX" ]; then mv "$PREFIX" "$PREFIX.old.$$"; fi
mv "$stage" "$PREFIX"
rm -rf "$PREFIX.old.$$"

v=$(version_ok "$PREFIX/bin/criu") || { "$PREFIX/bin/criu" check >&2 || true; die "installed CRIU at $PREFIX does not pass 'criu check'"; }
log "installed CRIU $v at $PREFIX"
