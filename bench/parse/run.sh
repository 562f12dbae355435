#!/usr/bin/env bash
# Dockerfile frontend benchmark: parse + typed instructions + plan of a generated
# 2,000-instruction Dockerfile, in-process (min/median/mean per phase) and end to end through
# the CLI (`kiln plan`, with hyperfine when installed). Results go to docs/BENCHMARKS.md by hand.
#
# Usage: bench/parse/run.sh [INSTRUCTIONS] [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."

n="${1:-2000}"
iterations="${2:-300}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo build --release --quiet -p kiln --bin kiln
cargo build --release --quiet -p kiln-dockerfile --example parse_bench
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bench="$target_dir/release/examples/parse_bench"
kiln="$target_dir/release/kiln"

"$bench" generate "$n" > "$work/Dockerfile"
echo "== machine"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "kernel $(uname -r), $(rustc --version)"
echo
echo "== in-process ($n instructions)"
"$bench" run "$work/Dockerfile" "$iterations"
echo
echo "== end to end: kiln plan -f <generated> (process start, read, parse, plan, print)"
if command -v hyperfine >/dev/null 2>&1; then
  hyperfine --warmup 5 --runs 50 --style basic \
    "$kiln plan -f $work/Dockerfile $work" \
    "$kiln plan --format json -f $work/Dockerfile $work"
else
  echo "hyperfine not installed; timing 20 runs with bash's time"
  time (for _ in $(seq 20); do "$kiln" plan -f "$work/Dockerfile" "$work" >/dev/null; done)
fi
