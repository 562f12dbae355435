#!/usr/bin/env python3
"""The floor of a bench suite: the wall time of its RUN commands alone, run natively.

usage: floor.py DOCKERFILE CONTEXT WORKDIR NAME=LAYOUT...

Each stage's base (`FROM ${REGISTRY}/NAME`) is unpacked from its OCI layout (tag `img`, as
scripts/base-images.sh --layouts prints them) into WORKDIR with `umoci raw unpack`; WORKDIR,
ENV and COPY from the context are applied with plain file operations (untimed), and every RUN
is run with `chroot ROOT /bin/sh -c` in the stage's environment and working directory. Prints
the summed wall time of the RUN commands in seconds. This is what any builder must spend at
least; everything above it (pulling, unpacking, snapshotting, layer writing, pushing, starting)
is the builder's overhead.

Only what the shared suites use is understood: ARG before FROM, FROM [AS], WORKDIR, ENV,
COPY from the context (COPY --from is skipped: no suite runs anything after one), RUN in
shell form; LABEL, USER, CMD and the rest are ignored (no suite RUNs after a USER).
"""
import os
import shlex
import shutil
import subprocess
import sys
import time


def logical_lines(text):
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        yield buf.strip()
        buf = ""
    if buf.strip():
        yield buf.strip()


def copy_into(root, src, dest, cwd):
    if not dest.startswith("/"):
        dest = os.path.join(cwd, dest)
    target = root + dest
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
        subprocess.run(["cp", "-a", src.rstrip("/") + "/.", target], check=True)
    else:
        if dest.endswith("/"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        subprocess.run(["cp", "-a", src, target], check=True)


def main():
    dockerfile, context, work = sys.argv[1:4]
    layouts = dict(a.split("=", 1) for a in sys.argv[4:])
    total = 0.0
    stage = 0
    root = None
    env = {}
    cwd = "/"
    for line in logical_lines(open(dockerfile).read()):
        word, _, rest = line.partition(" ")
        word = word.upper()
        rest = rest.strip()
        if word == "FROM":
            ref = rest.split()[0]
            name = ref.split("/", 1)[1] if ref.startswith("${REGISTRY}/") else ref
            if name not in layouts:
                raise SystemExit(f"floor.py: no layout for {ref}")
            stage += 1
            root = os.path.join(work, f"stage{stage}")
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(work, exist_ok=True)
            subprocess.run(["umoci", "raw", "unpack", "--image", layouts[name] + ":img", root],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/root"}
            cwd = "/"
        elif root is None:
            continue
        elif word == "WORKDIR":
            cwd = os.path.join(cwd, rest)
            os.makedirs(root + cwd, exist_ok=True)
        elif word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
        elif word == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            *srcs, dest = args
            for s in srcs:
                copy_into(root, os.path.join(context, s), dest, cwd)
        elif word == "RUN":
            cmd = ["env", "-i"] + [f"{k}={v}" for k, v in env.items()]
            cmd += [shutil.which("chroot") or "/usr/sbin/chroot", root, "/bin/sh", "-c", f"cd {shlex.quote(cwd)} && {{ {rest}\n}}"]
            t0 = time.monotonic()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            total += time.monotonic() - t0
    print(f"{total:.2f}")


if __name__ == "__main__":
    main()
