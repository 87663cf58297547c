#!/usr/bin/env bash
# Builds memattr_maple: the kernel's own maple tree (Linux 6.1
# lib/maple_tree.c) in the kernel's user-space test harness
# (tools/testing/radix-tree), driven by memattr_maple.c. See that file for the
# stream format and the command line.
#
# Idempotent. Kernel source is extracted from Debian's linux-source-6.1
# package into the build directory, never into git:
#   ${MEMATTR_KERNEL_MAPLE_DIR:-<repo>/target/kernel-maple}   (target/ is ignored)
# If linux-source-6.1 or liburcu-dev is missing, installs it with apt-get, but
# only when running as root with apt-get available; otherwise exits 1 with a
# one-line reason. The binary appears (atomically renamed) only after a
# complete build; a failed build removes any previous one.
#
# Compiler flags: the harness's Makefile builds with -Og and ASan/UBSan, which
# would measure the sanitizers; this builds every object with -O2 and
# -fno-strict-aliasing, as the kernel compiles lib/maple_tree.c, and no
# sanitizers. Override with MEMATTR_KERNEL_MAPLE_CFLAGS, e.g.
# "-Og -g -fsanitize=address -fsanitize=undefined" for the harness's checking
# build (give it its own MEMATTR_KERNEL_MAPLE_DIR: it is 3-5x slower).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${MEMATTR_KERNEL_MAPLE_DIR:-$root/target/kernel-maple}
tarball=${MEMATTR_LINUX_SOURCE_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
top=linux-source-6.1
opt=${MEMATTR_KERNEL_MAPLE_CFLAGS:--O2 -g -fno-strict-aliasing}
bin=$build/memattr_maple

fail() {
    echo "kernel_maple/build.sh: $*" >&2
    exit 1
}

have_urcu() {
    echo '#include <urcu.h>' | gcc -D_LGPL_SOURCE -fsyntax-only -x c - >/dev/null 2>&1
}

have_deps() {
    [[ -r $tarball ]] && have_urcu
}

for tool in gcc make tar xz; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed"
done

if ! have_deps; then
    command -v apt-get >/dev/null 2>&1 || fail "no $tarball or liburcu-dev, and no apt-get to install them"
    [[ $(id -u) == 0 ]] || fail "no $tarball or liburcu-dev; run as root (or apt-get install linux-source-6.1 liburcu-dev)"
    echo "kernel_maple/build.sh: apt-get install linux-source-6.1 liburcu-dev" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends linux-source-6.1 liburcu-dev >&2; then
        apt-get update -q >&2 || true
        apt-get install -y -q --no-install-recommends linux-source-6.1 liburcu-dev >&2 ||
            fail "apt-get could not install linux-source-6.1 and liburcu-dev"
    fi
    have_deps || fail "apt-get ran but $tarball or <urcu.h> is still missing"
fi

mkdir -p "$build"
rm -f "$bin" "$bin.tmp" "$build/memattr_maple.info"

# The files the harness's core objects and the driver read (found with
# gcc -M on each object), and nothing else of the kernel.
members=(
    tools/testing/radix-tree
    tools/include
    tools/arch
    tools/lib/find_bit.c
    tools/lib/bitmap.c
    tools/lib/slab.c
    lib/maple_tree.c
    lib/xarray.c
    lib/test_xarray.c
    lib/radix-tree.c
    lib/idr.c
    include/linux/maple_tree.h
    include/linux/xarray.h
    include/linux/radix-tree.h
    include/linux/idr.h
    include/linux/gfp_types.h
    include/linux/kconfig.h
    Makefile
)
stamp="$build/src.stamp"
want="$(stat -c '%s %Y' "$tarball") ${members[*]}"
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "kernel_maple/build.sh: extracting the harness and lib/maple_tree.c from $tarball" >&2
    rm -rf "$build/src" "$build/src.tmp" "$stamp"
    mkdir -p "$build/src.tmp"
    tar -xJf "$tarball" -C "$build/src.tmp" "${members[@]/#/$top/}" ||
        fail "could not extract the harness from $tarball"
    mv "$build/src.tmp" "$build/src"
    echo "$want" >"$stamp"
fi

src=$build/src/$top
harness=$src/tools/testing/radix-tree
version=$(awk '/^VERSION =/{v=$3} /^PATCHLEVEL =/{p=$3} /^SUBLEVEL =/{s=$3} END{print v"."p"."s}' "$src/Makefile")
package=$(dpkg-query -W -f '${Version}' linux-source-6.1 2>/dev/null || echo unknown)

# The harness's core objects, as its Makefile's `maple` target links them
# (CORE_OFILES), minus maple.o: the driver takes its place. Command-line
# CFLAGS replace the Makefile's (-Og + sanitizers), so its -I and -D go here.
cflags="-I. -I../../include $opt -Wall -D_LGPL_SOURCE"
objs=(xarray.o radix-tree.o idr.o linux.o test.o find_bit.o bitmap.o slab.o)
# A changed CFLAGS must rebuild every object.
if [[ ! -f $build/cflags || $(cat "$build/cflags") != "$cflags" ]]; then
    (cd "$harness" && rm -f ./*.o)
    echo "$cflags" >"$build/cflags"
fi
make -s -C "$harness" CFLAGS="$cflags" generated/map-shift.h generated/bit-length.h "${objs[@]}" >&2 ||
    fail "the harness's objects did not build (see above)"

# shellcheck disable=SC2086 # cflags is a word list
(cd "$harness" && gcc $cflags -c "$here/memattr_maple.c" -o "$build/memattr_maple.o") ||
    fail "memattr_maple.c did not compile (see above)"
# shellcheck disable=SC2086 # opt is a word list (the sanitizers link too)
(cd "$harness" && gcc $opt -o "$bin.tmp" "$build/memattr_maple.o" "${objs[@]}" -lpthread -lurcu \
    -Wl,--wrap=kmem_cache_alloc_lru,--wrap=kmem_cache_free,--wrap=kmem_cache_alloc_bulk,--wrap=kmem_cache_free_bulk) ||
    fail "memattr_maple did not link (see above)"

cat >"$build/memattr_maple.info" <<EOF
kernel=$version
package=linux-source-6.1 $package
cflags=$cflags
EOF
mv "$bin.tmp" "$bin"
echo "$bin (Linux $version, Debian linux-source-6.1 $package)"
