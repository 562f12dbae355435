#!/usr/bin/env bash
# kiln-fs benchmarks, side by side with the standard tools, in one run:
#  1. snapshot: walk+diff of a ~100k-file root (a debootstrapped Debian with /usr copied 15
#     times) after changing 10 files (the engine keeps the previous table, so this is the cost
#     of one RUN step's change detection);
#  2. write: a ~1 GB mixed tree (gen-bigcopy.py 1000) as one gzip-6 layer vs `tar -c | pigz -6`
#     and `tar -c | gzip -6`;
#  3. apply: that layer vs `tar -xzf`.
# usage: bench/fs/run.sh [WORKDIR]   (default /var/tmp/kiln-fsbench; needs ~6 GB)
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work="${1:-/var/tmp/kiln-fsbench}"
mkdir -p "$work"
command -v pigz >/dev/null || { echo "pigz is needed: apt-get install pigz" >&2; exit 1; }
(cd "$repo" && cargo build --release -q -p kiln-fs --example fsbench)
fsbench="$repo/target/release/examples/fsbench"

if [[ ! -f "$work/root.done" ]]; then
  "$repo/scripts/base-images.sh" --only debian --layouts >/dev/null
  rootfs=$(ls "${KILN_TEST_CACHE:-$HOME/.cache/kiln-test}"/bases/debian-bookworm-rootfs-*.tar | head -1)
  rm -rf "$work/root"; mkdir -p "$work/root"
  tar -C "$work/root" -xf "$rootfs"
  for i in $(seq 15); do cp -a "$work/root/usr" "$work/root/usr-copy$i"; done
  touch "$work/root.done"
fi
if [[ ! -f "$work/big.done" ]]; then
  rm -rf "$work/big"
  python3 "$repo/../shared/bench/gen-bigcopy.py" "$work/big" 1000 >/dev/null
  touch "$work/big.done"
fi

t() { /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/out" 2>&1; read -r s kb < "$work/time"; echo "$s s, $((kb / 1024)) MB"; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo "snapshot (3 runs):"
for _ in 1 2 3; do "$fsbench" snapshot "$work/root" 10; done
sync
rm -rf "$work/blobs"; mkdir -p "$work/blobs"
echo "write 1 GB layer:"
echo "  kiln gzip-6:      $(t "$fsbench" write "$work/big" "$work/blobs" gzip 6)  $(cat "$work/out")"
echo "  tar | pigz -6:    $(t sh -c "tar -C '$work/big' -cf - . | pigz -6 > '$work/pigz.tgz'")  size $(stat -c %s "$work/pigz.tgz")"
echo "  tar | gzip -6:    $(t sh -c "tar -C '$work/big' -cf - . | gzip -6 > '$work/gzip.tgz'")"
blob=$(ls "$work"/blobs/* | head -1)
echo "apply that layer:"
rm -rf "$work/dst"; mkdir "$work/dst"
echo "  kiln apply:       $(t "$fsbench" apply "$blob" "$work/dst")"
rm -rf "$work/dst"; mkdir "$work/dst"
echo "  tar -xzf:         $(t tar -C "$work/dst" -xzf "$blob")"
rm -rf "$work/dst" "$work/blobs" "$work/pigz.tgz" "$work/gzip.tgz"
