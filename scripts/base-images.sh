#!/usr/bin/env bash
# Makes the base images tests and benchmarks build on, from local root filesystems (nothing
# from the internet but Debian packages), and pushes them to a registry:
#   library/busybox:latest        busybox-static + applet links, /etc/passwd, /etc/group, /tmp
#   library/debian:bookworm       debootstrap --variant=minbase bookworm, apt lists removed
#   library/debian:bookworm-slim  the same without docs, man pages and locales
#
# usage: scripts/base-images.sh [--only busybox|debian] REGISTRY_HOST:PORT
#        scripts/base-images.sh [--only busybox|debian] --layouts   (print NAME=DIR, no push)
# The OCI layouts are cached under $KILN_TEST_CACHE/bases (default ~/.cache/kiln-test), keyed
# by the recipe version below and the inputs' package versions; older entries are removed.
# Pushing uses skopeo over plain HTTP (the test registries listen on 127.0.0.1).
set -euo pipefail
shopt -s inherit_errexit

only=""
if [[ "${1:-}" == "--only" ]]; then only="$2"; shift 2; fi
registry="${1:?usage: base-images.sh [--only NAME] REGISTRY_HOST:PORT | --layouts}"
cache="${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}/bases"
mkdir -p "$cache"
# Bump when a recipe below changes: it keys the cache.
recipe=2
script_key="recipe-$recipe"

# Takes an exclusive lock named $1 for the rest of the calling (sub)shell: test processes run
# this script at the same time on a cold cache, and one must not remove another's work dir.
lock() {
  local fd
  exec {fd}>"$cache/.$1.lock"
  flock "$fd"
}

# Deterministic uncompressed tar of a root directory.
tar_root() { tar --sort=name --numeric-owner --mtime=@0 --xattrs --xattrs-include='*' -C "$1" -cf "$2" .; }

# Builds an OCI layout at $1 (tag `img`) from a root tar $2 with Cmd $3.
make_layout() {
  local out="$1" layer="$2" cmd="$3" tmp="$1.partial.$$"
  rm -rf "$tmp"
  umoci init --layout "$tmp" >/dev/null
  umoci new --image "$tmp:img" >/dev/null
  umoci raw add-layer --image "$tmp:img" --history.created_by "kiln base-images.sh" "$layer" >/dev/null
  umoci config --image "$tmp:img" --config.cmd "$cmd" \
    --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --os linux --architecture "$(dpkg --print-architecture)" >/dev/null
  rm -rf "$out"
  mv "$tmp" "$out"
}

busybox_layout() {
  local key; key=$(echo "$script_key $(dpkg-query -W -f='${Version}' busybox-static)" | sha256sum | cut -c1-16)
  local out="$cache/busybox-$key"
  [[ -d "$out" ]] || lock busybox
  if [[ ! -d "$out" ]]; then
    find "$cache" -maxdepth 1 -name 'busybox-*' ! -name "busybox-$key" -exec rm -rf {} + 2>/dev/null || true
    local work; work=$(mktemp -d "$cache/busybox-work.XXXXXX")
    local root="$work/root"
    mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/usr/bin" "$root/sbin" "$root/usr/sbin"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list-full); do
      [[ "$applet" == "bin/busybox" ]] && continue
      mkdir -p "$root/$(dirname "$applet")"
      ln -sf /bin/busybox "$root/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
    chmod 1777 "$root/tmp"
    tar_root "$root" "$work/layer.tar"
    make_layout "$out" "$work/layer.tar" sh
    rm -rf "$work"
  fi
  echo "$out"
}

debian_layout() {
  local slim="$1"
  local mirror
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [[ -n "$mirror" ]] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
  local key; key=$(echo "$script_key $(dpkg-query -W -f='${Version}' debootstrap)" | sha256sum | cut -c1-16)
  local rootfs="$cache/debian-bookworm-rootfs-$key.tar"
  local name=bookworm
  [[ "$slim" == slim ]] && name=bookworm-slim
  local out="$cache/debian-$name-$key"
  [[ -f "$rootfs" && -d "$out" ]] || lock debian
  if [[ ! -f "$rootfs" ]]; then
    find "$cache" -maxdepth 1 -name 'debian-*' ! -name "*-$key*" -exec rm -rf {} + 2>/dev/null || true
    local work; work=$(mktemp -d "$cache/debian-work.XXXXXX")
    debootstrap --variant=minbase bookworm "$work/root" "$mirror" > "$work/log" 2>&1 || {
      tail -20 "$work/log" >&2; echo "debootstrap failed" >&2; exit 1; }
    rm -rf "$work/root"/var/lib/apt/lists/* "$work/root"/var/cache/apt/*.bin "$work/root"/var/cache/apt/archives/*.deb "$work/root"/var/log/*.log
    tar_root "$work/root" "$work/root.tar"
    mv "$work/root.tar" "$rootfs"
    rm -rf "$work"
  fi
  if [[ ! -d "$out" ]]; then
    local work; work=$(mktemp -d "$cache/debian-layout.XXXXXX")
    if [[ "$slim" == slim ]]; then
      mkdir "$work/root"
      tar -C "$work/root" -xf "$rootfs"
      rm -rf "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* "$work/root"/usr/share/info/*
      find "$work/root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
      tar_root "$work/root" "$work/layer.tar"
      make_layout "$out" "$work/layer.tar" bash
    else
      make_layout "$out" "$rootfs" bash
    fi
    rm -rf "$work"
  fi
  echo "$out"
}

# Pushes layout $1 as $2, or with --layouts prints `$2=$1`.
push() {
  if [[ "$registry" == --layouts ]]; then
    echo "$2=$1"
  else
    skopeo copy --quiet --dest-tls-verify=false "oci:$1:img" "docker://$registry/$2"
  fi
}

# Each layout is assigned first: a failure inside "$(...)" used as an argument would not stop
# the script, and an empty directory would be printed.
if [[ -z "$only" || "$only" == busybox ]]; then
  layout=$(busybox_layout)
  push "$layout" library/busybox:latest
fi
if [[ -z "$only" || "$only" == debian ]]; then
  layout=$(debian_layout full)
  push "$layout" library/debian:bookworm
  layout=$(debian_layout slim)
  push "$layout" library/debian:bookworm-slim
fi
