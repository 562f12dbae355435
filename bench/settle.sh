# Sourced by the bench scripts. `settle DIR...` before each timed run makes it independent of
# what the run before it deleted. These VMs' ext4 has no journal, and its inode allocator then
# skips every inode deleted in the last few seconds (minutes while the inode table's block is
# dirty), with one buffer-cache lookup each (`recently_deleted` in the kernel's ext4 ialloc.c):
# after a run removed its 20,000 files, creating Debian's 6,700 took 2 s instead of 0.2 s, and
# each podman run made the next one slower. Writing dirty data back and dropping the caches
# ends that; DIRs (the registry's blobs, images, contexts, binaries) are read back into the
# page cache, so the run does not pay cold reads of its inputs instead.
# KILN_BENCH_NO_SETTLE=1 turns it off; without root it only syncs.
settle() {
  [[ -n "${KILN_BENCH_NO_SETTLE:-}" ]] && return 0
  sync
  if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 > /proc/sys/vm/drop_caches; fi
  local d
  for d in "$@"; do
    if [[ -e "$d" ]]; then find "$d" -type f -print0 2>/dev/null | xargs -0 -r cat > /dev/null 2>&1 || true; fi
  done
}
