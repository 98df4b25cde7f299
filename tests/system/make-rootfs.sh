#!/usr/bin/env bash
# Builds (once) and prints the path of a Debian root file system for the system
# tier: systemd as PID 1 for the units the modules render, Python for the
# wheel, and Debian's nix-bin (Nix 2.26 in trixie) for the second Nix run.
#
#   tests/system/make-rootfs.sh [SUITE]      (default: trixie)
#
# The mirror is the one this machine's apt uses (/etc/apt/sources.list{,.d}).
# The result is cached under $NIXFLEET_ROOTFS_CACHE (default
# /var/cache/nixfleet-tests), keyed by suite, mirror and package list, so
# reruns cost nothing. Needs root and debootstrap.
set -euo pipefail

SUITE="${1:-trixie}"
CACHE="${NIXFLEET_ROOTFS_CACHE:-/var/cache/nixfleet-tests}"
# debootstrap resolves --include without virtual packages (nix-bin needs
# perl-dbdabi-94), so Nix is installed by apt in a second step.
BASE="systemd,systemd-sysv,dbus,libnss-systemd,python3,python3-venv,ca-certificates,git,procps,iproute2"
EXTRA="nix-bin nix-setup-systemd"

mirror() {
  local m
  m="$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  if [ -z "$m" ]; then
    m="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | grep -v -- '-security' | awk '{for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
          | head -n1 || true)"
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

if [ "$(id -u)" != 0 ]; then
  echo "make-rootfs: needs root (debootstrap, then systemd-nspawn)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "make-rootfs: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }

MIRROR="$(mirror)"
KEY="$(printf '%s\n' "$SUITE" "$MIRROR" "$BASE" "$EXTRA" "v1" | sha256sum | cut -c1-16)"
ROOT="$CACHE/rootfs-$SUITE-$KEY"

mkdir -p "$CACHE"
# One build at a time per suite (test runs of several checkouts share the cache).
exec 9>"$CACHE/.lock-$SUITE"
flock 9
if [ ! -e "$ROOT/.complete" ]; then
  TMP="$(mktemp -d "$CACHE/.build-$SUITE.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  echo "make-rootfs: debootstrap $SUITE from $MIRROR into $ROOT (once; cached)" >&2
  if ! debootstrap --variant=minbase --include="$BASE" "$SUITE" "$TMP/root" "$MIRROR" >&2; then
    cp "$TMP/root/debootstrap/debootstrap.log" "$CACHE/debootstrap-$SUITE.log" 2>/dev/null || true
    echo "make-rootfs: debootstrap failed; see $CACHE/debootstrap-$SUITE.log" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  systemd-nspawn -q --register=no --keep-unit -D "$TMP/root" --pipe -E DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get install -y -q --no-install-recommends $EXTRA && apt-get clean" >&2
  # A machine id, so journald and DynamicUser behave as on a booted host; no
  # getty on the console the tests read.
  systemd-machine-id-setup --root="$TMP/root" >/dev/null 2>&1 || true
  rm -f "$TMP/root/etc/systemd/system/getty.target.wants/"* 2>/dev/null || true
  echo "nixfleet-test" > "$TMP/root/etc/hostname"
  mkdir -p "$TMP/root/nix/store"
  touch "$TMP/root/.complete"
  rm -rf "$ROOT"
  mv "$TMP/root" "$ROOT"
fi
echo "$ROOT"
