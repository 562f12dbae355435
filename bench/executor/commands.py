#!/usr/bin/env python3
"""The RUN commands' own time inside one containerised build, from its log.

usage: commands.py stamp < LOG > STAMPED     prefix each line with its arrival time (seconds)
       commands.py sum kiln|kaniko < STAMPED  print the summed time of the build's RUN commands

The floor (floor.py) runs the commands natively, once, before the builds; a build's own run of
them pays what the disk and the container's overlay cost at that moment, which on these VMs
varies by seconds from run to run. This measures them inside the same run instead:
- kiln reports each RUN's command time itself: `#N DONE 6.0s (command 5.1s, ...)`.
- kaniko logs `Running: [ARGV]` just before it starts a command and nothing of its own until
  the command has exited, so a command lasts from that line to kaniko's next log line (lines
  the command prints are not kaniko's: they have no `LEVEL[` prefix).
"""
import re
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;]*m")
KANIKO_LOG = re.compile(r"^(INFO|WARN|ERRO|DEBU|TRAC|FATA|PANI)\[")
KILN_COMMAND = re.compile(r"^#\d+ DONE [0-9.]+s \(command ([0-9.]+)s")


def stamp():
    t0 = time.monotonic()
    for line in sys.stdin.buffer:
        sys.stdout.write("%.3f %s" % (time.monotonic() - t0, line.decode("utf-8", "replace")))
        sys.stdout.flush()


def total(tool):
    seconds = 0.0
    running_since = None
    for raw in sys.stdin:
        at, _, line = raw.partition(" ")
        line = ANSI.sub("", line.rstrip("\n"))
        if tool == "kiln":
            m = KILN_COMMAND.match(line)
            if m:
                seconds += float(m.group(1))
            continue
        if not KANIKO_LOG.match(line):
            continue
        if running_since is not None:
            seconds += float(at) - running_since
            running_since = None
        if "Running: [" in line:
            running_since = float(at)
    print("%.2f" % seconds)


if __name__ == "__main__":
    if sys.argv[1:] == ["stamp"]:
        stamp()
    elif len(sys.argv) == 3 and sys.argv[1] == "sum" and sys.argv[2] in ("kiln", "kaniko"):
        total(sys.argv[2])
    else:
        sys.exit(__doc__)
