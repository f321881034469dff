#!/usr/bin/env bash
# Runs the integration suite (every test target but the systemd tier,
# tests/system.rs, which boots containers itself) inside a Debian 13 (trixie)
# root with Debian's Nix 2.26, so that the suite is checked on a modern Nix
# as well as on the host's Nix 2.8.
#
#   tests/system/run-suite-in-container.sh                 # all targets below
#   tests/system/run-suite-in-container.sh --test core -- signed   # any cargo test args
#
# The root comes from tests/system/mkroot.sh (built there when missing), or
# from $NPBHQ_ROOTFS when that script is not in the tree. It is never
# changed: systemd-nspawn runs it with --volatile=overlay (writes go to a
# tmpfs), as PID 2 under a minimal init that reaps orphans, with its own
# network namespace (only a loopback: sshd ports cannot collide with the
# host's tests) and every capability (the tests mount a tmpfs and add users).
# A plain chroot would not do: Nix runs the post-build-hook after setns()ing
# back into the mount namespace it started in.
#
# The host's Rust toolchain ($CARGO_HOME, $RUSTUP_HOME) and this repository
# are bind-mounted at the same paths; cargo builds into its own target
# directory ($NPBHQ_CONTAINER_TARGET_DIR, default target/nix-2.26), since the
# host's binaries are built against another glibc.
#
# Descriptors: nspawn's default soft limit (1024) is below a listen backlog
# (somaxconn, 4096), which core's full-backlog test fills; it gets 65536.
#
# Needs root with CAP_SYS_ADMIN, CAP_NET_ADMIN (else the container's
# loopback stays down) and write access to /sys/fs/cgroup (as the systemd
# tier does). Missing tools, root or capabilities make it fail with one line
# saying why, never skip. Exits
# with cargo test's status.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd -P)
cd "$repo"

# Every integration test target runs here, except the systemd tier (which
# the host's `cargo test` runs, booting containers of its own) and the audit
# of the source, which no Nix version changes. A new target must be added to
# one list or the other (checked below), so that none is silently left out
# of this run.
targets=(core faults operate hostile packaging harness_selfcheck bench nixcall cli daemon hook_trust)
excluded=(system audit)

fail() {
    echo "run-suite-in-container.sh: $*" >&2
    exit 1
}

for f in tests/*.rs tests/*/main.rs; do
    [ -e "$f" ] || continue
    case $f in
    tests/*/main.rs) t=${f#tests/}; t=${t%/main.rs} ;;
    *) t=$(basename "$f" .rs) ;;
    esac
    case " ${targets[*]} ${excluded[*]} " in
    *" $t "*) ;;
    *) fail "test target '$t' ($f) is in neither list of this script: add it to 'targets' (runs under Nix 2.26) or 'excluded'" ;;
    esac
done

[ "$(id -u)" = 0 ] || fail "must run as root (systemd-nspawn needs it)"
# Without CAP_NET_ADMIN the container's loopback stays down and every test
# that starts sshd on 127.0.0.1 would fail without saying why.
capeff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
(((0x$capeff >> 12) & 1)) ||
    fail "cannot run here: no CAP_NET_ADMIN (systemd-nspawn --private-network needs it to bring up the container's loopback, which the tests' sshd listens on); run as root on a machine, or in a container with CAP_NET_ADMIN"
(((0x$capeff >> 21) & 1)) ||
    fail "cannot run here: no CAP_SYS_ADMIN (systemd-nspawn needs it for its mounts and namespaces)"
command -v systemd-nspawn >/dev/null 2>&1 ||
    fail "systemd-nspawn is not installed (apt-get install -y systemd-container)"

if [ -x tests/system/mkroot.sh ]; then
    root=$(tests/system/mkroot.sh)
elif [ -n "${NPBHQ_ROOTFS:-}" ]; then
    root=$NPBHQ_ROOTFS
else
    fail "no root file system: tests/system/mkroot.sh is missing and NPBHQ_ROOTFS is not set"
fi
[ -x "$root/usr/bin/nix" ] && [ -x "$root/usr/sbin/sshd" ] && [ -x "$root/usr/bin/cc" ] ||
    fail "$root is not a usable root (needs nix-bin, openssh-server and gcc)"

cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
[ -x "$cargo_home/bin/cargo" ] || fail "no cargo at $cargo_home/bin/cargo (set CARGO_HOME)"
[ -d "$rustup_home" ] || fail "no rustup toolchains at $rustup_home (set RUSTUP_HOME)"
target_dir=${NPBHQ_CONTAINER_TARGET_DIR:-$repo/target/nix-2.26}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd -P)

if [ "$#" -gt 0 ]; then
    test_args=("$@")
else
    test_args=(--no-fail-fast)
    for t in "${targets[@]}"; do
        test_args+=(--test "$t")
    done
fi

# systemd-nspawn makes cgroups below the one it starts in; a cgroup of our
# own keeps parallel containers (the systemd tier's) apart, and is removed
# after. The machine name keeps its /run/systemd/nspawn state apart too.
name=npbhq-suite-$$
cgroups=()
cleanup() {
    local cg
    for cg in "${cgroups[@]}"; do
        echo $$ >"$(dirname "$cg")/cgroup.procs" 2>/dev/null || true
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    # nspawn leaves this behind when /run is not a tmpfs (it says
    # "Attempted to remove disk file system ..."): ours, so removed here.
    rm -rf "/run/systemd/nspawn/propagate/$name"
}
trap cleanup EXIT
for h in unified systemd; do
    [ -d "/sys/fs/cgroup/$h" ] || continue
    mkdir "/sys/fs/cgroup/$h/$name"
    cgroups+=("/sys/fs/cgroup/$h/$name")
    echo $$ >"/sys/fs/cgroup/$h/$name/cgroup.procs"
done

# The tests' temp dirs are in the container's /tmp, which goes with it. For
# a post-mortem, NPBHQ_KEEP_TMP=1 NPBHQ_TEST_TMP=/some/host/dir keeps them
# there (bind-mounted; keep the path short, for unix socket names).
keep=()
[ -z "${NPBHQ_KEEP_TMP+set}" ] || keep+=(--setenv=NPBHQ_KEEP_TMP="$NPBHQ_KEEP_TMP")
if [ -n "${NPBHQ_TEST_TMP:-}" ]; then
    mkdir -p "$NPBHQ_TEST_TMP"
    keep+=(--bind="$NPBHQ_TEST_TMP" --setenv=NPBHQ_TEST_TMP="$NPBHQ_TEST_TMP")
fi

echo "run-suite-in-container.sh: $root; cargo test ${test_args[*]}" >&2
# In the background, so that a SIGTERM or SIGINT to this script reaches
# the container too (nspawn then ends it) before the cleanup above runs.
systemd-nspawn --quiet --directory="$root" --machine="$name" \
    --volatile=overlay --register=no --keep-unit --private-network \
    --as-pid2 --capability=all --console=pipe \
    --rlimit=RLIMIT_NOFILE=65536 \
    --bind="$repo" --bind="$target_dir" \
    --bind-ro="$cargo_home" --bind-ro="$rustup_home" \
    --chdir="$repo" \
    --setenv=PATH="$cargo_home/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --setenv=CARGO_HOME="$cargo_home" --setenv=RUSTUP_HOME="$rustup_home" \
    --setenv=CARGO_TARGET_DIR="$target_dir" --setenv=CARGO_NET_OFFLINE=true \
    "${keep[@]}" \
    sh -c 'lo=$(cat /sys/class/net/lo/flags 2>/dev/null || echo 0)
        [ $((lo & 1)) = 1 ] || { echo "run-suite-in-container.sh: the container'"'"'s loopback is down (systemd-nspawn could not bring it up): the tests need 127.0.0.1" >&2; exit 1; }
        nix --version && exec cargo test "$@"' sh "${test_args[@]}" </dev/null &
nspawn=$!
trap 'kill -TERM "$nspawn" 2>/dev/null || true' INT TERM
while :; do
    status=0
    wait "$nspawn" || status=$?
    kill -0 "$nspawn" 2>/dev/null || break
done
exit "$status"
