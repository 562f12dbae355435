#!/usr/bin/env bash
# Installs the object-store emulators the kiln-context tests run against, if missing:
#   S3    moto's server (PyPI `moto[server]`)          -> $CACHE/venv/bin/moto_server
#   GCS   gcp-storage-emulator (PyPI)                   -> $CACHE/venv/bin/gcp-storage-emulator
#   Azure Azurite's blob service (npm `azurite`)        -> $CACHE/npm/node_modules/.bin/azurite-blob
# and openssl (apt) for test keys.
# Everything lives under $KILN_TEST_CACHE (default ~/.cache/kiln-test). Idempotent: does
# nothing when everything is present. Prints the cache directory on its last line.
set -euo pipefail

cache="${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
exec 9>"$cache/.emulators.lock"
flock 9

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# openssl makes the RSA keys of the GCS service-account tests.
if ! command -v openssl >/dev/null; then
  echo "installing openssl" >&2
  apt_install openssl
fi

if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3 and venv" >&2
  apt_install python3 python3-venv
fi
venv="$cache/venv"
if [ ! -x "$venv/bin/moto_server" ] || [ ! -x "$venv/bin/gcp-storage-emulator" ] \
  || ! "$venv/bin/python" -c 'import moto, boto3, gcp_storage_emulator' 2>/dev/null; then
  echo "installing moto[server] and gcp-storage-emulator into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5' 'gcp-storage-emulator' >&2
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing nodejs and npm" >&2
  apt_install nodejs npm
fi
npmdir="$cache/npm"
if [ ! -x "$npmdir/node_modules/.bin/azurite-blob" ]; then
  echo "installing azurite into $npmdir" >&2
  mkdir -p "$npmdir"
  (cd "$npmdir" && [ -f package.json ] || echo '{"name":"kiln-test-emulators","private":true}' >package.json)
  npm install --prefix "$npmdir" --no-audit --no-fund --loglevel=error azurite >&2
fi

echo "$cache"
