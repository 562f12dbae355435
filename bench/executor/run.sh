#!/usr/bin/env bash
# Executor mode under podman: builds the shared benchmark suites (../shared/bench, or
# $KILN_BENCH_SUITES) with kiln's executor image, and with kaniko's executor packed the same way
# when KANIKO_EXECUTOR is set, each run as an unprivileged container (podman's default
# capabilities and seccomp, no --privileged) that pushes to a local registry. Prints a Markdown
# table of the median wall time of `podman run` (container start included), the suite's floor
# (its RUN commands run natively in a chroot of the same bases, bench/executor/floor.py), the
# overhead (wall - floor), the RUN commands' own time inside each build (commands.py: what kiln
# reports per step, kaniko's `Running:` line to its next log line) with the overhead above that,
# and the container's peak RSS. The tools take turns run by run, each run less the container
# start timed just before it, and the paired ratios (kiln's overhead over kaniko's in the
# neighbouring run) close the output.
#
# usage: bench/executor/run.sh [-n RUNS] [-s SUITE]... [-m cold|warm]... [--no-kiln]
#   -m cold   a fresh container: base pulled, every step run, image pushed (the default, with warm)
#   -m warm   --cache=true --cache-repo REGISTRY/cache/SUITE: one priming run, then the timed
#             rebuild with nothing changed (push included); its floor is 0 (every RUN is cached)
#   KANIKO_EXECUTOR=/path/to/executor   adds kaniko (a static executor built from its source)
#   KILN_EXECUTOR_IMAGE=FILE.tar        kiln's executor image as a docker archive (default: made
#                                       by scripts/build-executor-image.sh, release profile)
#   KILN_BENCH_KEEP=DIR                 keep each run's result file and time-stamped log there
#
# Both images run with: podman --runtime runc run --rm --network host --ulimit nofile=1024:1024
#   --ulimit nproc=1024:1024 -v CONTEXT:/workspace -v DOCKERFILE:/bench/Dockerfile:ro IMAGE
#   --context=/workspace --dockerfile=/bench/Dockerfile --destination=REGISTRY/bench/SUITE:TOOL
#   --insecure --insecure-pull --build-arg REGISTRY=REGISTRY
# (runc: crun refuses a hybrid cgroup v1/v2 host). The Dockerfile is mounted beside the context
# so that bigcopy's `COPY . /data/` copies the generated context only. podman's own start cost
# (`IMAGE --help`/`version`, median of RUNS) is printed so it can be subtracted. Peak RSS is the
# container memory cgroup's total_rss sampled every 0.1 s (a fresh cgroup parent per run).
# Before each run the caches are dropped and its inputs read back (bench/settle.sh: on these VMs
# creating files right after a big delete is up to 10x slower, which made whichever run came
# next slower). The registry is the Debian `docker-registry` on 127.0.0.1 with a random port; base images come
# from scripts/base-images.sh. Everything lives in a temporary directory removed at exit.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
suites_dir="${KILN_BENCH_SUITES:-$repo/../shared/bench}"
runs=3
suites=()
modes=()
with_kiln=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) runs="$2"; shift 2 ;;
    -m) modes+=("$2"); shift 2 ;;
    -s) suites+=("$2"); shift 2 ;;
    --no-kiln) with_kiln=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#suites[@]} -gt 0 ]] || suites=(small many-files bigcopy many-layers multistage)
[[ ${#modes[@]} -gt 0 ]] || modes=(cold warm)
tools=()
[[ $with_kiln == 1 ]] && tools+=(kiln)
[[ -n "${KANIKO_EXECUTOR:-}" ]] && tools+=(kaniko)
[[ ${#tools[@]} -gt 0 ]] || { echo "nothing to run (--no-kiln and no KANIKO_EXECUTOR)" >&2; exit 2; }

log() { printf '==> %s\n' "$*" >&2; }
# shellcheck source=../settle.sh
source "$here/../settle.sh"

# (lowercase: podman names an image pulled from an OCI layout after its path)
work=/var/tmp/kiln-bench-exec.$$; rm -rf "$work"; mkdir -p "$work"
cg_name="kiln-bench-exec-$$"
reg_pid=""
sampler_pid=""
cleanup() {
  [[ -n "$sampler_pid" ]] && kill "$sampler_pid" 2>/dev/null || true
  [[ -n "$reg_pid" ]] && kill "$reg_pid" 2>/dev/null || true
  "${podman[@]}" rm -a -f >/dev/null 2>&1 || true
  "${podman[@]}" rmi -a -f >/dev/null 2>&1 || true
  remove_cgroups
  # podman's overlay storage may leave its own mounts under $work behind.
  findmnt -rn -o TARGET | grep "^$work/" | sort -r | xargs -r umount 2>/dev/null || true
  rm -rf "$work"
}
podman=(podman --root "$work/podman/root" --runroot "$work/podman/run" --storage-driver overlay
  --cgroup-manager cgroupfs --runtime runc)
remove_cgroups() {
  local d
  for d in /sys/fs/cgroup/*/"$cg_name"-*; do
    [[ -d "$d" ]] || continue
    find "$d" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null || true
    rmdir "$d" 2>/dev/null || true
  done
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
log "registry $reg; base images"
"$repo/scripts/base-images.sh" "$reg" >&2
mapfile -t layouts < <("$repo/scripts/base-images.sh" --layouts 2>/dev/null)

# The images, loaded into a private podman storage.
if [[ $with_kiln == 1 ]]; then
  kiln_tar="${KILN_EXECUTOR_IMAGE:-}"
  if [[ -z "$kiln_tar" ]]; then
    log "kiln's executor image (scripts/build-executor-image.sh, release)"
    kiln_tar="$work/kiln-executor.tar"
    "$repo/scripts/build-executor-image.sh" "type=docker,dest=$kiln_tar,name=localhost/kiln/executor:bench" >&2
  fi
  id=$("${podman[@]}" load -q -i "$kiln_tar" | awk '{print $NF}')
  "${podman[@]}" tag "$id" localhost/kiln/executor:bench
fi
if [[ -n "${KANIKO_EXECUTOR:-}" ]]; then
  # kaniko's layout, as its deploy/Dockerfile has it: /kaniko/executor, the CA bundle,
  # /kaniko/.docker, and its environment; one layer, made with umoci.
  log "kaniko's executor image from $KANIKO_EXECUTOR"
  k="$work/kaniko-image"
  mkdir -p "$k/root/kaniko/.docker" "$k/root/kaniko/ssl/certs" "$k/root/workspace"
  cp "$KANIKO_EXECUTOR" "$k/root/kaniko/executor"
  cp /etc/ssl/certs/ca-certificates.crt "$k/root/kaniko/ssl/certs/ca-certificates.crt"
  tar -C "$k/root" --numeric-owner --owner=0 --group=0 -cf "$k/layer.tar" .
  umoci init --layout "$k/oci" >/dev/null
  umoci new --image "$k/oci:bench" >/dev/null
  umoci raw add-layer --image "$k/oci:bench" "$k/layer.tar" >/dev/null
  umoci config --image "$k/oci:bench" --config.env HOME=/root --config.env USER=root \
    --config.env PATH=/usr/local/bin:/kaniko --config.env SSL_CERT_DIR=/kaniko/ssl/certs \
    --config.env DOCKER_CONFIG=/kaniko/.docker/ --config.workingdir /workspace \
    --config.entrypoint /kaniko/executor --os linux --architecture amd64 >/dev/null
  id=$("${podman[@]}" pull -q "oci:$k/oci:bench")
  "${podman[@]}" tag "$id" localhost/kaniko/executor:bench
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

median() { sort -n | awk '{a[NR]=$1} END { if (NR==0) {print "-"} else if (a[1]=="fail") {print "fail"} else {print a[int((NR+1)/2)]} }'; }

# Samples the total_rss of memory cgroup $1 every 0.1 s; writes the peak (bytes) to $2 when killed.
sample_rss() {
  local cg="$1" out="$2" peak=0 k v
  trap 'echo "$peak" > "$out"; exit 0' TERM
  while :; do
    if [[ -r "$cg/memory.stat" ]]; then
      while read -r k v; do
        [[ "$k" == total_rss ]] && { (( v > peak )) && peak=$v; break; }
      done < "$cg/memory.stat"
    fi
    sleep 0.1
  done
}

run_n=0
# Runs one containerised build of TOOL, appending "seconds peak_kb commands_s start_s" (or
# "fail ...") to $out; commands_s is the RUN commands' own time in this run (commands.py),
# start_s what a container start with --help/version took just before it.
run_container() {
  local out="$1" tool="$2"; shift 2
  run_n=$((run_n + 1))
  local parent="$cg_name-$run_n"
  settle "$work/registry" "$work/podman/root" "$suites_dir" "${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/bench"
  # podman, runc, conmon and the executor's binary back in the page cache: an untimed start.
  local arg=--help; [[ "$tool" == kaniko ]] && arg=version
  "${podman[@]}" run --rm --pull=never --network host --ulimit nofile=1024:1024 \
    --ulimit nproc=1024:1024 "localhost/$tool/executor:bench" "$arg" > /dev/null 2>&1 || true
  # ... and a timed one: what starting a container costs right now, subtracted from this run
  # alone (the VM's speed drifts within minutes, so a start measured at the beginning is off).
  # The same for both tools: kiln's image and `--help` (a 2 ms process) where kiln is built;
  # kaniko's `version` spends 30-35 ms in Go's start-up, which is part of kaniko's overhead.
  local start_image="localhost/$tool/executor:bench" start_arg="$arg"
  if [[ $with_kiln == 1 ]]; then start_image=localhost/kiln/executor:bench; start_arg=--help; fi
  /usr/bin/time -f "%e" -o "$work/start" "${podman[@]}" run --rm --pull=never --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$start_image" "$start_arg" \
    > /dev/null 2>&1 || true
  mkdir -p "/sys/fs/cgroup/memory/$parent"
  sample_rss "/sys/fs/cgroup/memory/$parent" "$work/peak" &
  sampler_pid=$!
  local ok=1
  /usr/bin/time -f "%e" -o "$work/time" "${podman[@]}" run --rm --pull=never --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --cgroup-parent "/$parent" "$@" \
    2>&1 | python3 "$here/commands.py" stamp > "$work/cmd.log" || ok=0
  kill -TERM "$sampler_pid"; wait "$sampler_pid" 2>/dev/null || true; sampler_pid=""
  if [[ -n "${KILN_BENCH_KEEP:-}" ]]; then cp "$work/cmd.log" "$KILN_BENCH_KEEP/log-$run_n-$tool"; fi
  remove_cgroups
  if [[ $ok == 0 ]]; then
    echo "FAILED: podman run $*" >&2; tail -30 "$work/cmd.log" >&2; echo "fail fail fail fail" >> "$out"; return 0
  fi
  echo "$(cat "$work/time") $(( $(cat "$work/peak") / 1024 )) $(python3 "$here/commands.py" sum "$tool" < "$work/cmd.log") $(tail -1 "$work/start")" >> "$out"
}

build_args() {
  local tool="$1" suite="$2" ctx="$3" mode="$4"
  local a=(-v "$ctx:/workspace" -v "$suites_dir/$suite/Dockerfile:/bench/Dockerfile:ro"
    "localhost/$tool/executor:bench" --context=/workspace --dockerfile=/bench/Dockerfile
    "--destination=$reg/bench/$suite:$tool" --insecure --insecure-pull
    --build-arg "REGISTRY=$reg")
  [[ "$mode" == warm ]] && a+=(--cache=true --cache-repo "$reg/cache/$suite-$tool")
  printf '%s\n' "${a[@]}"
}

# podman's own cost: starting the image and running the executor's --help / version.
log "podman start cost"
declare -A start_cost
for tool in "${tools[@]}"; do
  res="$work/start-$tool"; : > "$res"
  arg=--help; [[ "$tool" == kaniko ]] && arg=version
  for _ in $(seq "$runs"); do run_container "$res" "$tool" "localhost/$tool/executor:bench" "$arg"; done
  start_cost[$tool]=$(cut -d' ' -f1 "$res" | median)
done

declare -A floor
printf '\nMachine: nproc %s, %s GiB RAM, kernel %s, load before %s\n' "$(nproc)" \
  "$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" "$(uname -r)" \
  "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'podman start + --help/version (median of %s): %s\n\n' "$runs" \
  "$(for t in "${tools[@]}"; do printf '%s %s s; ' "$t" "${start_cost[$t]}"; done)"
printf '| suite | mode | tool | wall s (median of %s) | floor s | overhead s | podman start s (per run) | overhead − podman start s | commands in the run s | wall − commands − podman start s | peak RSS MB | load |\n' "$runs"
printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
paired=()
for suite in "${suites[@]}"; do
  ctx=$(context_of "$suite")
  for mode in "${modes[@]}"; do
    if [[ "$mode" == warm ]]; then
      f=0
    else
      if [[ -z "${floor[$suite]:-}" ]]; then
        log "$suite: floor (RUN commands natively in a chroot)"
        : > "$work/floor"
        for _ in $(seq "$runs"); do
          settle "$suites_dir" "$ctx" "${layouts[@]#*=}"
          python3 "$here/floor.py" "$suites_dir/$suite/Dockerfile" "$ctx" "$work/floor-root" \
            "${layouts[@]}" >> "$work/floor"
          rm -rf "$work/floor-root"
        done
        floor[$suite]=$(median < "$work/floor")
      fi
      f=${floor[$suite]}
    fi
    # The tools take turns, run by run, the first alternating: a slow spell of the VM then
    # falls on both, and each run is compared with its neighbour (the paired ratios below).
    for tool in "${tools[@]}"; do
      : > "$work/res-$suite-$mode-$tool"
      if [[ "$mode" == warm ]]; then
        mapfile -t args < <(build_args "$tool" "$suite" "$ctx" "$mode")
        log "$suite $mode $tool: priming"
        run_container "$work/prime" "$tool" "${args[@]}"
        tail -1 "$work/prime" | grep -q fail && echo "priming failed: $suite $tool" >&2
      fi
    done
    load=$(cut -d' ' -f1 /proc/loadavg)
    for i in $(seq "$runs"); do
      order=("${tools[@]}")
      if (( i % 2 == 0 && ${#tools[@]} == 2 )); then order=("${tools[1]}" "${tools[0]}"); fi
      for tool in "${order[@]}"; do
        log "$suite $mode $tool ($i/$runs)"
        mapfile -t args < <(build_args "$tool" "$suite" "$ctx" "$mode")
        run_container "$work/res-$suite-$mode-$tool" "$tool" "${args[@]}"
      done
    done
    for tool in "${tools[@]}"; do
      res="$work/res-$suite-$mode-$tool"
      t=$(cut -d' ' -f1 "$res" | median)
      m=$(cut -d' ' -f2 "$res" | median)
      c=$(awk '{print $3}' "$res" | median)
      st=$(awk '{print $4}' "$res" | median)
      # Medians of each run's own overheads, not differences of medians: above the floor,
      # and above the commands' time in that run, both less that run's container start.
      o=$(awk -v f="$f" '$1 ~ /^[0-9.]+$/ { printf "%.2f\n", $1 - f }' "$res" | median)
      o2=$(awk -v f="$f" '$1 ~ /^[0-9.]+$/ { printf "%.2f\n", $1 - f - $4 }' "$res" | median)
      oc=$(awk '$1 ~ /^[0-9.]+$/ { printf "%.2f\n", $1 - $3 - $4 }' "$res" | median)
      [[ "$m" =~ ^[0-9]+$ ]] && m=$((m / 1024))
      printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$suite" "$mode" "$tool" "$t" "$f" "$o" "$st" "$o2" "$c" "$oc" "$m" "$load"
      cp "$res" "${KILN_BENCH_KEEP:-$work}/" 2>/dev/null || true
    done
    if [[ ${#tools[@]} == 2 ]]; then
      # kiln's overhead over kaniko's, run i against run i; the median of those ratios.
      paired+=("$(paste -d' ' "$work/res-$suite-$mode-kiln" "$work/res-$suite-$mode-kaniko" |
        awk -v f="$f" -v suite="$suite" -v mode="$mode" '
          function ratio(a, b) { return b > 0 ? sprintf("%.0f", 100 * a / b) : "-" }
          $1 ~ /^[0-9.]+$/ && $5 ~ /^[0-9.]+$/ {
            floor_r = floor_r " " ratio($1 - f - $4, $5 - f - $8)
            run_r = run_r " " ratio($1 - $3 - $4, $5 - $7 - $8)
          }
          END { printf "%s %s %s|%s\n", suite, mode, floor_r, run_r }')")
    fi
  done
done
if [[ ${#paired[@]} -gt 0 ]]; then
  printf '\nkiln overhead / kaniko overhead, run by run (%%; each less its own container start):\n\n'
  printf '| suite | mode | above the floor | median | above the commands in the run | median |\n|---|---|---|---|---|---|\n'
  for p in "${paired[@]}"; do
    read -r suite mode rest <<< "${p%%|*}"
    runr="${p#*|}"
    printf '| %s | %s | %s | %s | %s | %s |\n' "$suite" "$mode" "$rest" \
      "$(tr ' ' '\n' <<< "$rest" | grep -v '^$' | median)" "$runr" \
      "$(tr ' ' '\n' <<< "$runr" | grep -v '^$' | median)"
  done
fi
