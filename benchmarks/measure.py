"""A child process's wall time and its own peak RSS, for the benchmarks that run jobs as children.

Linux carries the launching process's peak RSS into the child's ru_maxrss across fork/vfork +
exec, so wait4 on a child of a benchmark that has just held a large array reports at least that
array (a `python -c pass` child of a process holding 2 GB reports 2 GB). The command is therefore
started by a small launcher process, and the launcher's wait4 on it is the figure: the command's
own peak (plus the launcher's few MB of Python at fork).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

__all__ = ["own_peak_rss_bytes", "run_measured"]

LAUNCHER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))  # Linux: KiB
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list, stdout=None, stderr=None, cwd=None) -> tuple[int, float, int]:
    """Run `cmd` (a list of str/paths) to completion; returns (exit code, wall seconds, the
    command's own peak RSS in bytes). stdout/stderr: file objects (a pipe could fill and block)."""
    fd, peak_file = tempfile.mkstemp(prefix="peak_rss_")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", LAUNCHER, peak_file, *map(str, cmd)],
                               stdout=stdout, stderr=stderr, cwd=cwd)
        wall = time.perf_counter() - t0
        with open(peak_file) as f:
            text = f.read().strip()
        return code, wall, int(text) if text else 0
    finally:
        os.remove(peak_file)


def own_peak_rss_bytes() -> int:
    """This process's own peak RSS in bytes: VmHWM of its address space (ru_maxrss would
    include the launching process's peak, see above)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")
