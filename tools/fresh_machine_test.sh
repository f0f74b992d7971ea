#!/bin/sh
# fresh_machine_test.sh — the README's two commands on a bare Debian 12, as a
# newcomer runs them: debootstrap --variant=minbase bookworm into a folder, add
# only gcc, g++, make, git and python3, git clone this checkout's branch inside
# it, and run `make demo` then `make check` there under chroot. Nothing else is
# installed by hand: what the build and the tests need, the two commands
# install themselves (tools/deps.sh).
#
# Then .ci/run (make check with the bindings required, make abi-check) on the
# same machine, which must install and check nothing again.
#
# Usage, as root on a Debian or Ubuntu host with network access:
#   tools/fresh_machine_test.sh          the commands as root
#   tools/fresh_machine_test.sh --user   as a user with sudo (sudo added to the root)
# Environment: DEMO_MINUTES (default 1, the README's demo trains 3), FRESH_ROOT
# (default /var/tmp/klvae-fresh: base/ is the debootstrapped system, kept and
# reused; root/ a fresh copy of it per run; logs/), MIRROR.
# Only committed work is tested: the clone comes from HEAD's branch.
set -eu
top=$(git rev-parse --show-toplevel)
branch=$(git -C "$top" rev-parse --abbrev-ref HEAD)
fresh=${FRESH_ROOT:-/var/tmp/klvae-fresh}
mirror=${MIRROR:-http://deb.debian.org/debian}
minutes=${DEMO_MINUTES:-1}
as_user=0
[ "${1:-}" = --user ] && as_user=1
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, mount, chroot)" >&2; exit 1; }
base=$fresh/base
root=$fresh/root
logs=$fresh/logs
mkdir -p "$logs"
stamp() { date -u +%H:%M:%S; }
say() { echo "[$(stamp)] $*"; }

command -v debootstrap >/dev/null 2>&1 || apt-get install -y -q debootstrap
if [ ! -x "$base/usr/bin/apt-get" ]; then
    say "debootstrap --variant=minbase bookworm $base"
    rm -rf "$base.partial"
    debootstrap --variant=minbase bookworm "$base.partial" "$mirror" >"$logs/debootstrap.log" 2>&1
    mv "$base.partial" "$base"
fi

unmount() {
    for m in dev/pts dev sys proc; do
        mountpoint -q "$root/$m" 2>/dev/null && umount "$root/$m"
    done
    return 0
}
unmount
rm -rf "$root"
cp -a "$base" "$root"
trap unmount EXIT
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# What a fresh machine of this kind has from its image: the certificate
# authorities and pip's settings through which the package registries are
# reached (Debian's bare root would have pip refuse the egress proxy's CA).
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$root/etc/pip.conf"; fi
if [ -d /usr/local/share/ca-certificates ]; then # kept by update-ca-certificates
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$root/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
# The branch as a bare repository inside the root, for the chroot's own git.
git clone -q --bare --branch "$branch" "$top" "$root/srv/libklvae.git"

# in_root USER COMMAND: a login-like clean environment inside the root
in_root() {
    home=/root
    [ "$1" = root ] || home=/home/$1
    chroot --userspec="$1:$1" "$root" /usr/bin/env -i HOME="$home" USER="$1" LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/sh -c "cd $home && $2"
}

extra=""
[ $as_user = 1 ] && extra=sudo
say "apt-get install gcc g++ make git python3 $extra (all that is installed by hand)"
in_root root "apt-get update -q && apt-get install -y -q --no-install-recommends gcc g++ make git python3 $extra" \
    >"$logs/bare.log" 2>&1
user=root
if [ $as_user = 1 ]; then
    user=dev
    in_root root "useradd -m -s /bin/sh dev && echo 'dev ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/dev &&
        chown -R dev:dev /srv/libklvae.git" # git refuses a repository of another owner
fi
before=$(in_root root "dpkg-query -W | wc -l")

run_step() { # run_step NAME COMMAND: timed, logged, the log's tail shown
    name=$1
    shift
    t0=$(date +%s)
    say "$name: $*"
    rc=0
    in_root $user "$*" >"$logs/$name.log" 2>&1 || rc=$?
    say "$name: exit $rc after $(($(date +%s) - t0)) s (log: $logs/$name.log)"
    tail -n 12 "$logs/$name.log" | sed 's/^/    /'
    return $rc
}

home=/root
[ $user = root ] || home=/home/$user
status=0
run_step clone "git clone -q -b $branch /srv/libklvae.git libklvae" || exit 1
run_step demo "cd libklvae && make demo DEMO_MINUTES=$minutes" || status=1
# what make demo installed, as it said it
sed -n '/installing [0-9]* Debian packages/,/^ *[a-z0-9.+-]* *[A-Z]/p' "$logs/demo.log" | head -n 1
grep -E '^    [a-z0-9.+-]+ +[a-zA-Z]' "$logs/demo.log" | head -n 20
[ -s "$root$home/libklvae/demo-run/grid.png" ] || { say "no demo-run/grid.png"; status=1; }
run_step check "cd libklvae && make check" || status=1
# a binding test skipped for a missing tool (the CUDA test skips without a GPU)
grep -E "^(python|rust): SKIPPED| skipped in " "$logs/check.log" && { say "make check skipped a test"; status=1; }
# CI's entry point (bindings required, make abi-check) on the same machine:
# the packages are there, and nothing is installed or checked again
run_step ci "cd libklvae && sh .ci/run" || status=1
grep -q "klvae deps:" "$logs/check.log" "$logs/ci.log" && { say "the deps ran again"; status=1; }
after=$(in_root root "dpkg-query -W | wc -l")
say "packages: $before after the bare install, $after after make demo and make check"
say "result: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
