#!/usr/bin/env bash
# Builds kiln's executor image (deploy/executor/Dockerfile) with kiln itself:
#   1. a static kiln binary (glibc, crt-static: a static-pie with no interpreter), checked with ldd;
#   2. a build context in a temporary directory under target/executor-image/: the binary, Debian's CA bundle
#      (/etc/ssl/certs/ca-certificates.crt, package ca-certificates), nsswitch.conf, and for
#      --debug busybox-static with its applet symlinks;
#   3. `kiln build --reproducible` of that context with the freshly built binary (no RUN steps,
#      so no sandbox), to every OUTPUT.
#
# usage: scripts/build-executor-image.sh [--debug] [--profile release|dev]
#            [--insecure-registry HOST[:PORT]]... [--digest-file FILE] [--print-binary] OUTPUT...
#   OUTPUT   a kiln `--output` spec (`type=oci,dest=DIR`, `type=oci,dest=FILE.tar`,
#            `type=docker,dest=FILE.tar,name=REF`) or a registry reference to push to
#            (`registry.example.com/kiln/executor:debug`)
#   --debug          the `debug` stage (adds /busybox and /bin/sh); default: the `executor` stage
#   --profile        cargo profile of the binary (default: release)
#   --insecure-registry   push over plain HTTP to this registry (repeatable)
#   --digest-file    write the image digest there
#   --print-binary   build and check the static binary, print its path, build no image
#
# Timestamps come from the last commit (SOURCE_DATE_EPOCH), so running it again on the same tree
# gives the same image digest. Nothing is downloaded: cargo builds from its local registry cache
# (or whatever cargo is configured to reach), the rest comes from installed Debian packages.
set -euo pipefail
shopt -s inherit_errexit

usage() { sed -n '/^# usage:/,/^# Timestamps/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

cd "$(dirname "$0")/.."
repo=$(pwd)

target=executor
profile=release
print_binary=false
digest_file=""
insecure=()
outputs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --debug) target=debug; shift ;;
    --profile) profile="${2:?--profile needs release or dev}"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    --insecure-registry) insecure+=(--insecure-registry "${2:?}"); shift 2 ;;
    --insecure-registry=*) insecure+=(--insecure-registry "${1#*=}"); shift ;;
    --digest-file) digest_file="${2:?}"; shift 2 ;;
    --digest-file=*) digest_file="${1#*=}"; shift ;;
    --print-binary) print_binary=true; shift ;;
    -h|--help) usage ;;
    -*) echo "build-executor-image.sh: unknown option $1" >&2; usage ;;
    *) outputs+=("$1"); shift ;;
  esac
done
case "$profile" in
  release) cargo_profile=(--release); profile_dir=release ;;
  # No debug info in the image's binary: it makes it five times bigger and its gzip slow.
  dev|debug) cargo_profile=(); profile_dir=debug; export CARGO_PROFILE_DEV_DEBUG=0 ;;
  *) echo "build-executor-image.sh: --profile must be release or dev, not $profile" >&2; exit 2 ;;
esac
if [[ "$print_binary" == false && ${#outputs[@]} -eq 0 ]]; then
  echo "build-executor-image.sh: no OUTPUT given" >&2
  usage
fi

log() { printf '==> %s\n' "$*" >&2; }

# 1. The static binary.
triple=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
binary="$target_dir/$triple/$profile_dir/kiln"
log "cargo build -p kiln --target $triple ${cargo_profile[*]} (crt-static)"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --locked -q -p kiln --target "$triple" "${cargo_profile[@]}" >&2
# A static-pie has no program interpreter; ldd says "statically linked" (or "not a dynamic
# executable" for a non-PIE static binary). Anything else would need a libc in the image.
ldd_out=$(ldd "$binary" 2>&1 || true)
if ! grep -Eq 'statically linked|not a dynamic executable' <<<"$ldd_out"; then
  echo "build-executor-image.sh: $binary is not static:" >&2
  echo "$ldd_out" >&2
  exit 1
fi
if [[ "$print_binary" == true ]]; then
  echo "$binary"
  exit 0
fi

# 2. The build context, made afresh each time in a directory of this run's own (two runs at
# once, as parallel tests do, must not share one), removed at exit.
certs=/etc/ssl/certs/ca-certificates.crt
[[ -f "$certs" ]] || { echo "build-executor-image.sh: $certs missing (apt-get install ca-certificates)" >&2; exit 1; }
mkdir -p "$target_dir/executor-image"
context=$(mktemp -d "$target_dir/executor-image/$target-context.XXXXXX")
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/empty" "$context/links"
ln -s executor "$context/links/warmer"
cp "$binary" "$context/kiln"
cp "$certs" "$context/ca-certificates.crt"
cp deploy/executor/nsswitch.conf "$context/nsswitch.conf"
if [[ "$target" == debug ]]; then
  busybox=/bin/busybox
  # ldd exits 1 for a non-PIE static binary: read its message, not its status.
  ldd_out=$(ldd "$busybox" 2>&1 || true)
  "$busybox" --list >/dev/null 2>&1 && grep -Eq 'statically linked|not a dynamic executable' <<<"$ldd_out" || {
    echo "build-executor-image.sh: $busybox is not a static busybox (apt-get install busybox-static)" >&2
    exit 1
  }
  mkdir -p "$context/busybox" "$context/bin"
  cp "$busybox" "$context/busybox/busybox"
  for applet in $("$busybox" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$context/busybox/$applet"
  done
  ln -s /busybox/sh "$context/bin/sh"
fi
# The context's own files get fixed modes and times so that umask and checkout time do not
# change the image (COPY keeps a file's mode unless --chmod says otherwise).
chmod -R u=rwX,go=rX "$context"
chmod 755 "$context/kiln"
[[ ! -e "$context/busybox/busybox" ]] || chmod 755 "$context/busybox/busybox"

# 3. The image.
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null || true)" ]]; then
  revision="$revision-dirty"
fi
version=$("$binary" --version | awk '{print $2}')
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
args=(build --progress plain --reproducible --target "$target"
  -f "$repo/deploy/executor/Dockerfile"
  --build-arg "KILN_VERSION=$version"
  --build-arg "KILN_REVISION=$revision"
  --build-arg "KILN_CREATED=$created"
  "${insecure[@]}")
[[ -z "$digest_file" ]] || args+=(--digest-file "$digest_file")
for o in "${outputs[@]}"; do
  if [[ "$o" == type=* ]]; then args+=(--output "$o"); else args+=(--tag "$o"); fi
done
log "kiln ${args[*]} $context"
start=$(date +%s%N)
SOURCE_DATE_EPOCH="$epoch" "$binary" "${args[@]}" "$context"
log "image built in $(( ($(date +%s%N) - start) / 1000000 )) ms (target $target, profile $profile)"
