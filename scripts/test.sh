#!/usr/bin/env bash
# Installs the project into ./.venv (from nothing) and runs every test:
# rustfmt's check, the pure-Rust core with cargo, the package's type hints with mypy, then
# the Python package with pytest (benchmarks included, run once each
# without timing).
set -euo pipefail
cd "$(dirname "$0")/.."
# The same install as the README's first command (profile-guided where the
# toolchain allows), with the test extras: the tests run what users run.
bash scripts/install.sh test
cargo fmt --check
# A debug build: arithmetic overflow panics there, where the release
# build would wrap silently (a `then_some(i - 1)` evaluated for i == 0 went
# unseen for as long as this ran --release).
cargo test
.venv/bin/python -m mypy
.venv/bin/python -m pytest
