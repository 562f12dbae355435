#!/usr/bin/env bash
# Sandbox overhead: run `/bin/true` 100 times in each kiln-sandbox mode and in the peers
# (`runc run`, `chroot(8)`; crun 1.8 refuses this host's hybrid cgroup set-up) on the same busybox root. Each hyperfine sample is 100
# sequential runs, so the per-run overhead is the reported time / 100.
#
# Needs root (chroot, runc, and the throwaway root for in-place mode), hyperfine, runc,
# busybox-static, util-linux (unshare, setpriv). Usage: bench/sandbox/run.sh [RUNS]
# In-place mode runs only inside a throwaway root (unshare -m + pivot_root into a temp dir),
# never on this machine's `/`.
set -euo pipefail
runs=${1:-5}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cargo build --release -q -p kiln-sandbox --bin kiln-sandbox-run --manifest-path "$repo/Cargo.toml"
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml" | sed 's/.*"target_directory":"\([^"]*\)".*/\1/')
work=$(mktemp -d /tmp/kiln-sandbox-bench.XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
drv="$work/kiln-sandbox-run"
cp "$target_dir/release/kiln-sandbox-run" "$drv"

root="$work/bundle/rootfs"
mkdir -p "$root"/{bin,etc,tmp,proc,dev,sys,root,usr}
cp /bin/busybox "$root/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
# unprivileged copy of the root for rootless mode as `nobody`
cp -a "$root" "$work/rootfs-nobody"
chown -R 65534:65534 "$work/rootfs-nobody"

# OCI bundle for runc/crun
(cd "$work/bundle" && runc spec)
sed -i 's/"terminal": true/"terminal": false/; s/"sh"/"\/bin\/true"/' "$work/bundle/config.json"

# throwaway root for in-place: the driver (glibc) needs /usr; the whole loop of 100 runs
# happens inside one unshare, so its ~ms set-up is counted once per sample
ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
cp "$drv" "$root/kiln-sandbox-run"
inplace="set -e; R=$root; mount --bind \$R \$R; mount --bind /usr \$R/usr; mount -o remount,bind,ro \$R/usr; \
  mount --rbind /dev \$R/dev; mount -t proc proc \$R/proc; cd \$R; mkdir -p .old; pivot_root . .old; umount -l /.old; rmdir /.old; \
  exec /kiln-sandbox-run --mode in-place --force --repeat 100 / -- /bin/true"

loop() { echo "for i in \$(seq 100); do $1 >/dev/null; done"; }
hyperfine -N --warmup 1 --runs "$runs" --export-markdown "$work/results.md" \
  -n "chroot(8)" "bash -c '$(loop "chroot $root /bin/true")'" \
  -n "runc run" "bash -c '$(loop "runc run --bundle $work/bundle kiln-bench")'" \
  -n "kiln chroot (100 processes)" "bash -c '$(loop "$drv --mode chroot $root -- /bin/true")'" \
  -n "kiln rootless as root (100 processes)" "bash -c '$(loop "$drv --mode rootless $root -- /bin/true")'" \
  -n "kiln rootless as nobody (100 processes)" "setpriv --reuid=65534 --regid=65534 --clear-groups bash -c '$(loop "$drv --mode rootless $work/rootfs-nobody -- /bin/true")'" \
  -n "kiln chroot (1 process, 100 runs)" "$drv --mode chroot --repeat 100 $root -- /bin/true" \
  -n "kiln rootless as root (1 process, 100 runs)" "$drv --mode rootless --repeat 100 $root -- /bin/true" \
  -n "kiln rootless as nobody (1 process, 100 runs)" "setpriv --reuid=65534 --regid=65534 --clear-groups $drv --mode rootless --repeat 100 $work/rootfs-nobody -- /bin/true" \
  -n "kiln in-place (throwaway root, 1 process, 100 runs)" "unshare --mount --pid --fork --propagation private /bin/sh -c '$inplace'"
cat "$work/results.md"
