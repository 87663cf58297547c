#!/usr/bin/env bash
# Installs memattr into ./.venv from nothing, built with profile-guided
# optimization (PGO) when the Rust toolchain has llvm-profdata:
#
#   1. build the extension instrumented (-Cprofile-generate);
#   2. run scripts/pgo_train.py on it (what users run: the compare job, the
#      native replay at 1 TiB, the per-call Vm);
#   3. merge the profile and build again with it (-Cprofile-use).
#
# The profile is made here, by this toolchain, from this source: a profile
# checked into the repository would be tied to one LLVM version. PGO
# changes how the code is laid out and inlined, never what it computes.
# Where the toolchain has no llvm-profdata (and rustup cannot add the
# llvm-tools component), or MEMATTR_PGO=0, it builds without PGO and says
# so.
#
# usage: bash scripts/install.sh [EXTRAS]      e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
spec="."
if [ -n "${1:-}" ]; then spec=".[$1]"; fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip

plain() {
    echo "memattr: building without PGO: $1"
    .venv/bin/python -m pip install --quiet -e "$spec"
    exit 0
}

if [ "${MEMATTR_PGO:-1}" = 0 ]; then plain "MEMATTR_PGO=0"; fi
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ] && command -v rustup >/dev/null; then
    rustup component add llvm-tools >/dev/null 2>&1 || true
fi
if [ ! -x "$profdata" ]; then plain "no $profdata (rustup component add llvm-tools)"; fi

# The flags go in cargo's per-target setting, which cargo joins with the
# target.'cfg(...)' flags of .cargo/config.toml (POPCNT) instead of
# replacing them as RUSTFLAGS would. A RUSTFLAGS the caller set replaces
# both, so then they go there.
var="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
with_flags() {
    if [ -n "${RUSTFLAGS+x}" ]; then
        RUSTFLAGS="$RUSTFLAGS $1" "${@:2}"
    else
        env "$var=${!var:-} $1" "${@:2}"
    fi
}
prof=$(mktemp -d)
trap 'rm -rf "$prof"' EXIT
with_flags "-Cprofile-generate=$prof" .venv/bin/python -m pip install --quiet -e "$spec"
if ! .venv/bin/python scripts/pgo_train.py; then
    echo "memattr: the PGO training run failed (above)" >&2
    exit 1
fi
"$profdata" merge -o "$prof/merged.profdata" "$prof"/*.profraw
with_flags "-Cprofile-use=$prof/merged.profdata" .venv/bin/python -m pip install --quiet -e "$spec"
echo "memattr: built with PGO (profile from scripts/pgo_train.py)"
