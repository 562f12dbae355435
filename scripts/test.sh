#!/usr/bin/env bash
# The one test command (see README): installs what the tests need, then runs formatting, lints
# and every test, unit and end-to-end. Safe to run again: every step is idempotent.
#
# Environment:
#   KILN_TEST_CACHE   where slow fixtures (root filesystems, base images) are cached
#                     (default: ~/.cache/kiln-test); keyed by their inputs, so safe to keep.
set -euo pipefail
cd "$(dirname "$0")/.."

export KILN_TEST_CACHE="${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}"
mkdir -p "$KILN_TEST_CACHE"

scripts/install-test-deps.sh

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast --failure-output final

step "doc tests"
cargo test --workspace --locked --doc

step "all checks passed"
