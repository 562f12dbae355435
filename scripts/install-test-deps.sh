#!/usr/bin/env bash
# Installs the tools the tests use as independent checkers and real peers, if missing:
# the distribution registry, skopeo, umoci, runc/crun, podman, busybox, debootstrap, uidmap.
# Non-interactive and idempotent; does nothing when everything is present.
set -euo pipefail

packages=(docker-registry skopeo umoci runc crun podman busybox-static debootstrap uidmap
  git ca-certificates curl)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test dependencies: ${missing[*]}"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# rustfmt and clippy ship with most toolchain profiles, not with `minimal`.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
      echo "installing the $component toolchain component"
      rustup component add "$component"
    else
      echo "error: cargo $component is missing and there is no rustup to add it" >&2
      exit 1
    fi
  fi
done
