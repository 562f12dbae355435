#!/usr/bin/env bash
# `kiln image copy` vs `skopeo copy` between two local registries (Debian's `docker-registry`,
# plain HTTP on 127.0.0.1, random ports), for two images:
#   debian   library/debian:bookworm from scripts/base-images.sh (one ~110 MB layer)
#   big      ~1 GiB: 8 layers of 128 MiB of random data (gzip), made once with umoci and
#            cached under $KILN_TEST_CACHE/bench (default ~/.cache/kiln-test)
# Every run copies into a fresh, empty destination registry. Prints a Markdown table of the
# median wall time and peak RSS (/usr/bin/time) of RUNS runs per tool and image.
#
# usage: bench/copy/run.sh [-n RUNS] [-i debian|big]...
#   KILN=/path/to/kiln  the kiln binary (default: target/release/kiln, built)
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
runs=3
images=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) runs="$2"; shift 2 ;;
    -i) images+=("$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#images[@]} -gt 0 ]] || images=(debian big)

for tool in skopeo umoci docker-registry; do
  command -v "$tool" >/dev/null || "$repo/scripts/install-test-deps.sh"
done
[[ -x /usr/bin/time ]] || apt-get install -y time >/dev/null

kiln="${KILN:-}"
if [[ -z "$kiln" ]]; then
  (cd "$repo" && cargo build --release -p kiln >/dev/null 2>&1)
  kiln="$repo/target/release/kiln"
fi

cache="${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/bench"
mkdir -p "$cache"
work=$(mktemp -d /var/tmp/kiln-bench-copy.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry NAME: starts a registry with storage $work/NAME, sets $reg_host and $reg_pid.
start_registry() {
  local name="$1" port
  port=$(free_port)
  mkdir -p "$work/$name"
  cat > "$work/$name/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/$name/data
http:
  addr: 127.0.0.1:$port
log:
  level: error
YML
  docker-registry serve "$work/$name/config.yml" > "$work/$name/log" 2>&1 &
  reg_pid=$!
  pids+=("$reg_pid")
  reg_host="127.0.0.1:$port"
  for _ in $(seq 100); do curl -fsS "http://$reg_host/v2/" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "registry $name did not start" >&2
  cat "$work/$name/log" >&2
  exit 1
}

stop_registry() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# The ~1 GiB image: 8 layers of 128 MiB of random data.
big_layout() {
  local out="$cache/big-8x128m" tmp
  if [[ -f "$out/index.json" ]]; then echo "$out"; return; fi
  tmp="$out.partial.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp.work"
  umoci init --layout "$tmp" >/dev/null
  umoci new --image "$tmp:big" >/dev/null
  for i in $(seq 8); do
    mkdir -p "$tmp.work/root"
    head -c 128M /dev/urandom > "$tmp.work/root/data-$i"
    tar --numeric-owner --mtime=@0 -C "$tmp.work/root" -cf "$tmp.work/layer.tar" "data-$i"
    umoci raw add-layer --image "$tmp:big" "$tmp.work/layer.tar" >/dev/null
    rm -rf "$tmp.work/root" "$tmp.work/layer.tar"
  done
  umoci config --image "$tmp:big" --os linux --architecture "$(dpkg --print-architecture)" >/dev/null
  rm -rf "$tmp.work"
  mv "$tmp" "$out"
  echo "$out"
}

start_registry src
src="$reg_host"
for image in "${images[@]}"; do
  case "$image" in
    debian) "$repo/scripts/base-images.sh" --only debian "$src" >/dev/null ;;
    big)
      layout=$(big_layout)
      skopeo copy --quiet --dest-tls-verify=false "oci:$layout:big" "docker://$src/bench/big:latest" ;;
    *) echo "unknown image $image" >&2; exit 2 ;;
  esac
done

ref_of() { case "$1" in debian) echo "library/debian:bookworm" ;; big) echo "bench/big:latest" ;; esac; }

median() { sort -n | awk '{a[NR]=$1} END { if (NR==0) {print "-"} else {print a[int((NR+1)/2)]} }'; }

for image in "${images[@]}"; do
  ref=$(ref_of "$image")
  for run in $(seq "$runs"); do
    for tool in kiln skopeo; do
      rm -rf "$work/dst"
      start_registry dst
      dst="$reg_host"
      dst_pid="$reg_pid"
      case "$tool" in
        kiln) cmd=("$kiln" image copy --insecure-registry "$src" --insecure-registry "$dst"
                   "docker://$src/$ref" "docker://$dst/$ref") ;;
        skopeo) cmd=(skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false
                     "docker://$src/$ref" "docker://$dst/$ref") ;;
      esac
      if /usr/bin/time -f "%e %M" -o "$work/time" "${cmd[@]}" >"$work/out" 2>&1; then
        # The copy must be complete: the destination serves the same manifest digest.
        want=$(skopeo inspect --raw --tls-verify=false "docker://$src/$ref" | sha256sum | cut -d' ' -f1)
        got=$(skopeo inspect --raw --tls-verify=false "docker://$dst/$ref" | sha256sum | cut -d' ' -f1)
        [[ "$want" == "$got" ]] || { echo "$tool $image: digest differs" >&2; exit 1; }
        read -r secs kb < "$work/time"
        echo "$secs $((kb / 1024))" >> "$work/res-$image-$tool"
      else
        echo "$tool $image run $run failed:" >&2
        cat "$work/out" >&2
        exit 1
      fi
      stop_registry "$dst_pid"
    done
  done
done

size_of() { skopeo inspect --tls-verify=false "docker://$src/$1" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(len(m["Layers"]))'; }
printf '| image | tool | wall s (median of %s) | peak RSS MB (median) |\n|---|---|---|---|\n' "$runs"
for image in "${images[@]}"; do
  for tool in kiln skopeo; do
    f="$work/res-$image-$tool"
    printf '| %s (%s layers) | %s | %s | %s |\n' "$image" "$(size_of "$(ref_of "$image")")" "$tool" \
      "$(cut -d' ' -f1 "$f" | median)" "$(cut -d' ' -f2 "$f" | median)"
  done
done
