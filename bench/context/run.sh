#!/usr/bin/env bash
# What a remote build context costs: the same build with a ~500 MB context (the bigcopy suite's
# generated tree) given as a local directory, as a tar on stdin, and as an object in a local S3
# emulator (moto, from scripts/install-emulators.sh). The build itself does almost nothing
# (`FROM scratch` + a LABEL, Dockerfile outside the context), so the difference to the local
# directory is the fetch: download, streaming unpack, cleanup. Also prints `tar -xf` of the same
# tar as a physical reference. Medians of wall time and peak RSS.
#
# usage: bench/context/run.sh [-n RUNS]      KILN=/path/to/kiln (default: target/release/kiln)
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
suites_dir="${KILN_BENCH_SUITES:-$repo/../shared/bench}"
runs=3
[[ "${1:-}" == "-n" ]] && runs="$2"

cache=$("$repo/scripts/install-emulators.sh" | tail -1)
if [[ -z "${KILN:-}" ]]; then
  (cd "$repo" && cargo build --release -q -p kiln)
  KILN="$repo/target/release/kiln"
fi
ctx="${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/bench/bigcopy-500"
if [[ ! -f "$ctx/.done" ]]; then
  rm -rf "$ctx"; mkdir -p "$ctx"
  python3 "$suites_dir/gen-bigcopy.py" "$ctx" 500 >&2
  touch "$ctx/.done"
fi

work=$(mktemp -d /var/tmp/kiln-ctx-bench.XXXXXX)
moto_pid=""
cleanup() {
  [[ -n "$moto_pid" ]] && kill "$moto_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

tar -C "$ctx" --exclude=./.done -cf "$work/ctx.tar" .
size_mb=$(( $(stat -c %s "$work/ctx.tar") / 1048576 ))
printf 'FROM scratch\nLABEL bench=context\n' > "$work/Dockerfile"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$cache/venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
moto_pid=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1 && break; sleep 0.1; done
mapfile -t keys < <("$cache/venv/bin/python" "$repo/scripts/emulators/s3-setup.py" \
  "http://127.0.0.1:$port" bench "ctx.tar=$work/ctx.tar")

measure() {
  local out="$1"; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/cmd.log" 2>&1 || {
    echo "FAILED: $*" >&2; tail -20 "$work/cmd.log" >&2; echo "fail fail" >> "$out"; return 0; }
  cat "$work/time" >> "$out"
}
median() { sort -n | awk '{a[NR]=$1} END { if (NR==0) {print "-"} else if (a[1]=="fail") {print "fail"} else {print a[int((NR+1)/2)]} }'; }

build() {
  "$KILN" build --progress plain --isolation chroot --work-dir "$work/wd" -f "$work/Dockerfile" \
    -o "type=oci,dest=$work/out" "$@"
}
export -f build
export KILN work

printf '| context (%s MB tar) | wall s (median of %s) | peak RSS MB |\n|---|---|---|\n' "$size_mb" "$runs"
for source in local stdin s3 tar-x; do
  res="$work/res-$source"; : > "$res"
  for _ in $(seq "$runs"); do
    rm -rf "$work/wd" "$work/out" "$work/x"; mkdir -p "$work/x"
    case "$source" in
      local) measure "$res" bash -c "build $(printf '%q' "$ctx")" ;;
      stdin) measure "$res" bash -c "build - < $(printf '%q' "$work/ctx.tar")" ;;
      s3) measure "$res" env AWS_ACCESS_KEY_ID="${keys[0]}" AWS_SECRET_ACCESS_KEY="${keys[1]}" \
            AWS_REGION=us-east-1 S3_ENDPOINT="http://127.0.0.1:$port" S3_FORCE_PATH_STYLE=true \
            bash -c "build s3://bench/ctx.tar" ;;
      tar-x) measure "$res" tar -xf "$work/ctx.tar" -C "$work/x" ;;
    esac
  done
  t=$(cut -d' ' -f1 "$res" | median)
  m=$(cut -d' ' -f2 "$res" | median)
  [[ "$m" =~ ^[0-9]+$ ]] && m=$((m / 1024))
  printf '| %s | %s | %s |\n' "$source" "$t" "$m"
done
