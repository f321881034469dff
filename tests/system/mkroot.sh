#!/usr/bin/env bash
# Builds the Debian 13 (trixie) root file system both container tiers boot
# with systemd-nspawn (tests/system.rs, and the integration suite run under
# Nix 2.26), unless it is there already; prints its path on stdout.
#
#   tests/system/mkroot.sh            # build if missing, print the path
#   NPBHQ_ROOTFS=/some/dir tests/system/mkroot.sh
#
# debootstrap fetches from the Debian mirror this machine's apt already uses
# (its sources), or from $NPBHQ_DEBIAN_MIRROR.
#
# The root is never changed after it is built: containers boot it with
# --volatile=overlay. Its directory name carries a hash of the package list,
# so a changed list builds a new root beside the old one. Parallel callers
# wait on a lock; a half-built root is never seen (built under a temporary
# name, renamed when debootstrap succeeded).
set -euo pipefail

suite=trixie
# systemd as PID 1; Debian 13's multi-user Nix (2.26) with its nix-daemon
# units and build users; sshd for the ssh-ng receiver; a C toolchain for
# cargo; tools the tests use. libdbi-perl: nix-bin needs libdbd-sqlite3-perl,
# which depends on the virtual perl-dbdabi-94 that debootstrap cannot resolve
# by itself (without it configuring nix-bin fails).
packages=(
    systemd systemd-sysv dbus
    nix-bin nix-setup-systemd libdbi-perl
    openssh-server openssh-client
    gcc libc6-dev
    procps strace util-linux bsdutils ca-certificates
)
list=$(IFS=,; echo "${packages[*]}")
hash=$(printf '%s %s' "$suite" "$list" | sha256sum | cut -c1-12)
root=${NPBHQ_ROOTFS:-/var/tmp/npbhq/rootfs/$suite-$hash}
stamp=$root/.npbhq-rootfs-complete

if [ -f "$stamp" ]; then
    echo "$root"
    exit 0
fi

command -v debootstrap >/dev/null 2>&1 || {
    echo "mkroot.sh: debootstrap is not installed (apt-get install -y debootstrap)" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || {
    echo "mkroot.sh: must run as root (debootstrap, and the containers, need it)" >&2
    exit 1
}

# The Debian mirror this machine's own apt uses (NPBHQ_DEBIAN_MIRROR wins):
# the first URI of a `deb` source whose path ends in /debian, from
# /etc/apt/sources.list, *.list (one-line form) or *.sources (deb822).
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '
            /^[[:space:]]*#/ { next }
            $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; break } }
            tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }
        ' "$f"
    done | sed 's,/*$,,' | grep -m 1 -E '^(https?|file)://.*/debian$' || true
}
mirror=${NPBHQ_DEBIAN_MIRROR:-$(apt_mirror)}
[ -n "$mirror" ] || {
    echo "mkroot.sh: no Debian mirror in this machine's apt sources (a deb line or URIs: ending in /debian); set NPBHQ_DEBIAN_MIRROR" >&2
    exit 1
}

parent=$(dirname "$root")
mkdir -p "$parent"
exec 9>"$root.lock"
flock 9
if [ ! -f "$stamp" ]; then
    tmp="$root.partial"
    rm -rf "$tmp"
    log="$root.debootstrap.log"
    echo "mkroot.sh: debootstrapping $suite into $root (log: $log)" >&2
    start=$(date +%s)
    if ! debootstrap --variant=minbase --include="$list" "$suite" "$tmp" "$mirror" >"$log" 2>&1; then
        echo "mkroot.sh: debootstrap failed; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    # Keep it small: the package cache is not needed to boot.
    rm -rf "$tmp"/var/cache/apt/archives/*.deb
    rm -rf "$root"
    mv "$tmp" "$root"
    echo "$suite $list" >"$stamp"
    echo "mkroot.sh: built in $(($(date +%s) - start)) s" >&2
fi
echo "$root"
