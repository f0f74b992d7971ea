#!/bin/sh
# deps.sh — makes sure this machine has what libklvae's build and tests need,
# and installs what is missing. `make deps` runs it; `make demo`, `make check`
# (and the other check targets) run it once first, and build/deps.stamp
# remembers that it passed, so that later runs do not ask again.
#
#   tools/deps.sh           check; on Debian or Ubuntu install what is missing
#                           (apt-get as root, else through sudo); elsewhere say
#                           what to install and fail
#   tools/deps.sh --check   check only: list what is missing, exit 1 if anything is
#
# PYTHON (default python3) is the interpreter whose numpy and pytest the
# binding tests use. KLVAE_NO_DEPS=1 in the environment of make skips this
# script (for package builds that bring their own dependencies).
set -u

PYTHON=${PYTHON:-python3}
say() { echo "klvae deps: $*"; }

# The Debian packages, each with the reason it is needed.
PACKAGES='build-essential  C and C++ compilers, make and the C library headers
pkgconf          pkg-config, which finds the flags of the libraries below
libopenblas-dev  OpenBLAS, the matrix products (CBLAS) of the CPU backend
libjansson-dev   jansson, which reads and writes config.json
libpng-dev       libpng, for PNG images
libjpeg-dev      libjpeg-turbo, for JPEG images
gfortran         libgfortran, which a static link against OpenBLAS needs (tests/install_test.sh)
check            Check, the framework of the C unit tests (make check)
strace           kills a save at chosen system calls (tests/fault_test.sh)
abigail-tools    abidw and abidiff, for make abi-check
python3-numpy    numpy, for the Python binding and its tests
python3-pytest   pytest, which runs the Python binding tests
python3-pip      pip (with setuptools and wheel), for the test that pip-installs the Python package
cargo            cargo, which builds and tests the Rust binding
clang            clang with libFuzzer, for the fuzzing harnesses (make fuzz)
libclang-rt-dev  compiler-rt: the fuzzer, ASan and UBSan runtimes clang links (make fuzz)
libopenmpi-dev   Open MPI headers and mpicc: klvae train built for mpirun (data-parallel training)
openmpi-bin      mpirun, which starts the ranks of tests/mpi_test.sh'

why() { echo "$PACKAGES" | awk -v p="$1" '$1 == p { $1 = ""; sub(/^ +/, ""); print }'; }

# true when PYTHON is Debian's own interpreter (apt's python3-* serve it)
debian_python() {
    case $(readlink -f "$(command -v "$PYTHON" 2>/dev/null)" 2>/dev/null) in
        /usr/bin/python3*) return 0 ;;
    esac
    return 1
}
# numpy and pytest for the binding tests; pip, setuptools and wheel for the
# one that pip-installs the package (it skips itself without them); setuptools
# first, as pip imports the distutils it replaces
python_ready() { "$PYTHON" -c "import setuptools, wheel, pip, numpy, pytest" >/dev/null 2>&1; }

# Packages that are not installed, on a dpkg system. A tool that is already
# on PATH from elsewhere (cargo from rustup, numpy and pytest in a Python of
# its own) needs no package.
missing_packages() {
    installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' \
                    $(echo "$PACKAGES" | awk '{ print $1 }') 2>/dev/null | awk '$2 == "ii" { print $1 }')
    for p in $(echo "$PACKAGES" | awk '{ print $1 }'); do
        echo "$installed" | grep -qx "$p" && continue
        case $p in
            cargo) command -v cargo >/dev/null 2>&1 && continue ;;
            python3-numpy | python3-pytest | python3-pip)
                python_ready && continue
                # another Python than Debian's gets them from pip (install_pip);
                # with no Python at all, these packages bring python3 too
                command -v "$PYTHON" >/dev/null 2>&1 && ! debian_python && continue ;;
        esac
        echo "$p"
    done
}

# What is missing, checked by use rather than by package, on any system.
missing_tools() {
    for t in cc c++ make pkg-config; do
        command -v $t >/dev/null 2>&1 || echo "$t"
    done
    if command -v pkg-config >/dev/null 2>&1; then
        for p in openblas jansson libpng libjpeg check; do
            pkg-config --exists $p 2>/dev/null || echo "$p (pkg-config cannot find $p.pc)"
        done
    fi
    if command -v cc >/dev/null 2>&1; then
        # cc prints the bare name when it has no such library
        [ "$(cc -print-file-name=libgfortran.so)" != libgfortran.so ] || echo "libgfortran"
    fi
    for t in strace abidw abidiff cargo clang mpicc mpirun; do
        command -v $t >/dev/null 2>&1 || echo "$t"
    done
    python_ready || echo "numpy, pytest, pip, setuptools and wheel for $PYTHON"
}

# Runs a command as root: directly, or through sudo.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "this needs root, and sudo is not installed; as root run:"
        echo "    $*"
        return 1
    fi
}

install_debian() {
    missing=$(missing_packages)
    [ -n "$missing" ] || return 0
    say "installing $(echo "$missing" | wc -l) Debian packages the build and the tests need:"
    for p in $missing; do
        printf '    %-16s %s\n' "$p" "$(why "$p")"
    done
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q || { say "apt-get update failed (see above)"; return 1; }
    # shellcheck disable=SC2086
    as_root apt-get install -y -q --no-install-recommends $missing ||
        { say "apt-get install failed (see above)"; return 1; }
}

install_pip() {
    python_ready && return 0
    debian_python && return 0 # apt's packages serve it; checked below
    say "installing numpy, pytest, setuptools and wheel with pip for $PYTHON (not Debian's python3)"
    "$PYTHON" -m pip install -q numpy pytest setuptools wheel ||
        { say "pip install failed (see above)"; return 1; }
}

# Python's own safetensors reader, for the test that opens encode-dataset's
# shards without libklvae. Debian has no package of it: pip puts it in
# build/pydeps (--target leaves the system's Python alone), which the binding
# tests add to PYTHONPATH. Without it that one test skips, or fails under
# KLVAE_REQUIRE_BINDINGS=1.
PYDEPS=${PYDEPS:-build/pydeps}
install_safetensors() {
    reader='import safetensors.numpy'
    "$PYTHON" -c "$reader" >/dev/null 2>&1 && return 0
    PYTHONPATH="$PYDEPS" "$PYTHON" -c "$reader" >/dev/null 2>&1 && return 0
    "$PYTHON" -c 'import pip' >/dev/null 2>&1 || return 0
    say "installing Python's safetensors reader with pip into $PYDEPS (a test reads shards with it)"
    "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$PYDEPS" safetensors ||
        say "pip could not install safetensors: the test that reads shards with it will skip"
    return 0
}

report_missing() {
    say "missing:"
    echo "$1" | sed 's/^/    /'
    cat <<'TXT'
Install these with your system's package manager and run make again. The build
needs a C11 compiler, make, pkg-config, OpenBLAS (with CBLAS), jansson, libpng,
libjpeg, and Open MPI (mpicc, mpirun) for data-parallel training; the tests also
need Check, libgfortran, strace, libabigail (abidw), Python 3 with numpy, pytest,
pip, setuptools and wheel, cargo, and clang with compiler-rt (make fuzz). On
Fedora for example (then module load mpi/openmpi-x86_64, for mpicc on PATH):
    dnf install gcc gcc-c++ make pkgconf-pkg-config openblas-devel jansson-devel \
        libpng-devel libjpeg-turbo-devel check-devel libgfortran strace libabigail \
        python3-numpy python3-pytest python3-pip cargo clang compiler-rt openmpi-devel
(KLVAE_NO_DEPS=1 make ... skips this check.)
TXT
}

has_apt() { command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; }

if [ "${1:-}" = --check ]; then
    if has_apt; then missing=$(missing_packages); else missing=$(missing_tools); fi
    [ -z "$missing" ] && { say "everything needed is installed"; exit 0; }
    if has_apt; then
        say "missing Debian packages (tools/deps.sh or make deps installs them):"
        echo "$missing" | sed 's/^/    /'
    else
        report_missing "$missing"
    fi
    exit 1
fi

if has_apt; then
    install_debian || exit 1
    install_pip || exit 1
fi
install_safetensors
missing=$(missing_tools)
if [ -n "$missing" ]; then
    report_missing "$missing"
    exit 1
fi
say "everything the build and the tests need is installed"
