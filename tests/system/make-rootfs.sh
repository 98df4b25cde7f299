#!/usr/bin/env bash
# Builds (once) and prints the path of a Debian root file system for the system
# tier: systemd as PID 1 for the units the modules render, Python for the
# wheel, Debian's nix-bin (Nix 2.26 in trixie, 2.8 in bookworm) for the
# second Nix run, and Debian's postgresql for the control plane on PostgreSQL.
#
#   tests/system/make-rootfs.sh [SUITE]      (default: the other release: trixie, or
#                                             bookworm on a Debian 13 machine)
#   tests/system/make-rootfs.sh --mirror     (print the archive it would use)
#
# The mirror is the one this machine's apt uses (/etc/apt/sources.list{,.d}, see
# mirror() below).
# The result is cached under $NIXFLEET_ROOTFS_CACHE (default
# /var/cache/nixfleet-tests), keyed by suite, mirror and package list, so
# reruns cost nothing. Needs root and debootstrap.
set -euo pipefail

# HOST_ETC: where this machine's os-release and apt sources are (tests point it
# at a fixture); `--mirror` prints the archive chosen from them and exits.
HOST_ETC="${NIXFLEET_HOST_ETC:-/etc}"
# Default suite: the other Debian release than this machine's (as the tier picks it).
case "$(. "$HOST_ETC/os-release" 2>/dev/null && echo "${VERSION_CODENAME:-}")" in
  trixie) SUITE="${1:-bookworm}" ;;
  *) SUITE="${1:-trixie}" ;;
esac
CACHE="${NIXFLEET_ROOTFS_CACHE:-/var/cache/nixfleet-tests}"
# debootstrap resolves --include without virtual packages (nix-bin needs
# perl-dbdabi-94), so Nix is installed by apt in a second step; so is Debian's
# PostgreSQL, for the control plane's database.createLocally (peer authentication).
BASE="systemd,systemd-sysv,dbus,libnss-systemd,python3,python3-venv,ca-certificates,git,procps,iproute2"
EXTRA="nix-bin nix-setup-systemd postgresql"

# The Debian archive this machine's apt uses: the first enabled source (deb822
# stanza in sources.list.d/*.sources, or one-line entry in sources.list{,.d/*.list})
# that serves this machine's own release (VERSION_CODENAME) with `main`. Other
# entries (security, -updates, third-party archives listed first) are not the
# archive. That archive also serves the other release (Debian 12 on a Debian 13
# machine and the reverse), snapshot.debian.org included. Nothing matching, or not
# Debian: deb.debian.org.
mirror() {
  local codename m=""
  # Only Debian's own archive serves Debian suites (Ubuntu's, say, does not).
  codename="$(. "$HOST_ETC/os-release" 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}" || true)"
  if [ -n "$codename" ]; then
    m="$(awk -v want="$codename" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " want " ") \
            && (" " comps " ") ~ / main / && enabled != "no" && uri != "" && !done) {
          print uri; done = 1
        }
        types = suites = comps = uri = ""; enabled = "yes"
      }
      BEGIN { enabled = "yes" }
      FNR == 1 { flush() }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]*#/ { next }
      tolower($1) == "types:" { $1 = ""; types = $0 }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "suites:" { $1 = ""; suites = $0 }
      tolower($1) == "components:" { $1 = ""; comps = $0 }
      tolower($1) == "enabled:" { enabled = tolower($2) }
      END { flush() }' "$HOST_ETC"/apt/sources.list.d/*.sources 2>/dev/null || true)"
    if [ -z "$m" ]; then
      m="$(awk -v want="$codename" '
        $1 == "deb" {
          i = 2
          if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
          uri = $i; suite = $(i + 1); comps = ""
          for (j = i + 2; j <= NF; j++) comps = comps " " $j
          if (suite == want && (comps " ") ~ / main /) { print uri; exit }
        }' "$HOST_ETC"/apt/sources.list "$HOST_ETC"/apt/sources.list.d/*.list 2>/dev/null || true)"
    fi
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

# The archive's signing keys: Debian's keyring holds the keys of its release and
# of the two before it (bookworm's 2023.3+deb12u2 also trixie's, trixie's 2025.1
# bookworm's), so one machine's keyring verifies the other release.
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

if [ "$SUITE" = --mirror ]; then
  mirror
  exit 0
fi
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
  KEYARG=()
  if [ -f "$KEYRING" ]; then KEYARG=(--keyring="$KEYRING"); fi
  if ! debootstrap --variant=minbase "${KEYARG[@]}" --include="$BASE" "$SUITE" "$TMP/root" "$MIRROR" >&2; then
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
