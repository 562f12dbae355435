#!/usr/bin/env bash
# Builds the shared benchmark suites (../shared/bench, or $KILN_BENCH_SUITES) with kiln and its
# peers side by side, cold (fresh storage, base pulled from a local registry) and with the push
# to that registry included, and prints a Markdown table of median wall time and peak RSS.
#
# usage: bench/build/run.sh [-n RUNS] [-s SUITE]... [-m cold|warm|changed] [--no-kiln] [--no-buildah] [-v]
#   -v          print each measured command's output (kiln's step timings) to stderr
#   -m warm     a no-op rebuild after a priming build (kiln: --cache=true with a cache repository
#               in the local registry; buildah: --layers with its storage kept), push included
#   -m changed  the same after changing one file of the context that the build copies (suites
#               whose context has no such file print n/a)
#   kaniko is measured by bench/executor/run.sh (KANIKO_EXECUTOR=...), under podman like a pod
#   KILN=/path/to/kiln                 the kiln binary (default: target/release/kiln, built)
#
# Peers: buildah bud --isolation chroot --layers, with overlay and with vfs storage, then
# buildah push. Each timed run is settled first (bench/settle.sh: caches dropped, inputs read
# back). The registry is the Debian `docker-registry` on 127.0.0.1 with a random port;
# base images come from scripts/base-images.sh.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
suites_dir="${KILN_BENCH_SUITES:-$repo/../shared/bench}"
runs=3
suites=()
with_kiln=1
with_buildah=1
mode=cold
verbose=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) runs="$2"; shift 2 ;;
    -m) mode="$2"; shift 2 ;;
    -s) suites+=("$2"); shift 2 ;;
    --no-kiln) with_kiln=0; shift ;;
    --no-buildah) with_buildah=0; shift ;;
    -v) verbose=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#suites[@]} -gt 0 ]] || suites=(small many-files bigcopy many-layers multistage)

if [[ $with_buildah == 1 ]] && ! command -v buildah >/dev/null; then
  echo "installing buildah (Debian package)" >&2
  sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq buildah >/dev/null
fi

work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
reg_pid=""
cleanup() {
  [[ -n "$reg_pid" ]] && kill "$reg_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A registry on a free port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
log:
  level: error
YML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
reg="127.0.0.1:$port"
"$repo/scripts/base-images.sh" "$reg" >&2

if [[ $with_kiln == 1 && -z "${KILN:-}" ]]; then
  (cd "$repo" && cargo build --release -q -p kiln)
  KILN="$repo/target/release/kiln"
fi

# The bigcopy context is generated once and cached.
context_of() {
  local suite="$1"
  if [[ "$suite" == bigcopy ]]; then
    local c="${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/bench/bigcopy-500"
    if [[ ! -f "$c/.done" ]]; then
      rm -rf "$c"; mkdir -p "$c"
      python3 "$suites_dir/gen-bigcopy.py" "$c" 500 >&2
      touch "$c/.done"
    fi
    echo "$c"
  else
    echo "$suites_dir/$suite"
  fi
}

# shellcheck source=../settle.sh
source "$here/../settle.sh"

# Runs a command, appending "seconds peak_kb" to $results_file; settled first (bench/settle.sh).
measure() {
  local out="$1"; shift
  settle "$work" "$suites_dir" "${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/bench" "${KILN:-}"
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/cmd.log" 2>&1 || {
    echo "FAILED: $*" >&2; tail -30 "$work/cmd.log" >&2; echo "fail fail" >> "$out"; return 0; }
  cat "$work/time" >> "$out"
  if [[ $verbose == 1 ]]; then cat "$work/cmd.log" >&2; cat "$work/time" >&2; fi
}

median() { sort -n | awk '{a[NR]=$1} END { if (NR==0) {print "-"} else if (a[1]=="fail") {print "fail"} else {print a[int((NR+1)/2)]} }'; }

# A context file the build copies (the first regular file besides the Dockerfile), for -m changed.
changed_file() {
  find "$1" -type f ! -name Dockerfile ! -name .done | sort | head -1
}

# For warm/changed modes: a private copy of the context (changed) or the context itself.
mode_context() {
  local suite="$1" ctx="$2"
  if [[ "$mode" == changed ]]; then
    local c="$work/ctx-$suite"
    [[ -d "$c" ]] || cp -a "$ctx" "$c"
    echo "$c"
  else
    echo "$ctx"
  fi
}

kiln_cmd() {
  local suite="$1" ctx="$2" wd="$3"
  local cache=()
  [[ "$mode" != cold ]] && cache=(--cache=true --cache-repo "$reg/bench/$suite/cache")
  echo "$KILN" build --progress plain --work-dir "$wd" --insecure-registry "$reg" "${cache[@]}" \
    -f "$suites_dir/$suite/Dockerfile" --build-arg "REGISTRY=$reg" \
    -t "$reg/bench/$suite:kiln" "$ctx"
}

run_kiln() {
  local suite="$1" ctx="$2" out="$3"
  local wd="$work/kiln-$suite"; rm -rf "$wd"
  if [[ "$mode" != cold ]]; then
    ctx=$(mode_context "$suite" "$ctx")
    if [[ ! -f "$work/primed-kiln-$suite" ]]; then
      $(kiln_cmd "$suite" "$ctx" "$wd") > "$work/prime.log" 2>&1 || { tail -20 "$work/prime.log" >&2; }
      touch "$work/primed-kiln-$suite"; rm -rf "$wd"
    fi
    [[ "$mode" == changed ]] && echo "change $RANDOM" >> "$(changed_file "$ctx")"
  fi
  # shellcheck disable=SC2046
  measure "$out" $(kiln_cmd "$suite" "$ctx" "$wd")
}

run_buildah() {
  local driver="$1" suite="$2" ctx="$3" out="$4"
  local st="$work/buildah-$driver-$suite"
  [[ "$mode" == cold ]] && rm -rf "$st"
  mkdir -p "$st"
  local b=(buildah --root "$st/root" --runroot "$st/run" --storage-driver "$driver")
  local script
  [[ "$mode" != cold ]] && ctx=$(mode_context "$suite" "$ctx")
  script="$(printf '%q ' "${b[@]}") bud --quiet --isolation chroot --layers --tls-verify=false \
      -f $(printf '%q' "$suites_dir/$suite/Dockerfile") --build-arg REGISTRY=$reg -t bench-$suite $(printf '%q' "$ctx") >/dev/null &&
    $(printf '%q ' "${b[@]}") push --quiet --tls-verify=false bench-$suite docker://$reg/bench/$suite:buildah-$driver"
  if [[ "$mode" != cold && ! -f "$st/.primed" ]]; then
    bash -c "$script" > "$work/prime.log" 2>&1 || tail -20 "$work/prime.log" >&2
    touch "$st/.primed"
  fi
  [[ "$mode" == changed ]] && echo "change $RANDOM" >> "$(changed_file "$ctx")"
  measure "$out" bash -c "$script"
  if [[ "$mode" == cold ]]; then
    "${b[@]}" rm -a >/dev/null 2>&1 || true
    "${b[@]}" rmi -a -f >/dev/null 2>&1 || true
    rm -rf "$st" 2>/dev/null || true
  fi
}

printf '| suite | tool | mode | wall s (median of %s) | peak RSS MB |\n|---|---|---|---|---|\n' "$runs"
for suite in "${suites[@]}"; do
  ctx=$(context_of "$suite")
  if [[ "$mode" == changed && -z "$(changed_file "$ctx")" ]]; then
    printf '| %s | all | %s | n/a (no context file) | |\n' "$suite" "$mode"
    continue
  fi
  tools=()
  [[ $with_kiln == 1 ]] && tools+=(kiln)
  [[ $with_buildah == 1 ]] && tools+=(buildah-overlay buildah-vfs)
  for tool in "${tools[@]}"; do
    res="$work/res-$suite-$tool"; : > "$res"
    for _ in $(seq "$runs"); do
      case "$tool" in
        kiln) run_kiln "$suite" "$ctx" "$res" ;;
        buildah-overlay) run_buildah overlay "$suite" "$ctx" "$res" ;;
        buildah-vfs) run_buildah vfs "$suite" "$ctx" "$res" ;;
      esac
    done
    t=$(cut -d' ' -f1 "$res" | median)
    m=$(cut -d' ' -f2 "$res" | median)
    [[ "$m" =~ ^[0-9]+$ ]] && m=$((m / 1024))
    printf '| %s | %s | %s | %s | %s |\n' "$suite" "$tool" "$mode" "$t" "$m"
  done
done
