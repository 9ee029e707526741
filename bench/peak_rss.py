"""Run a module as the program, and write its peak resident memory to a file when it exits.

    python -m bench.peak_rss OUTFILE MODULE [ARGS...]

Why not the ``ru_maxrss`` that wait4 reports: Linux carries a process's high-water mark over
fork and exec into the new program, so a small ``poller once`` started by a large benchmark
process reports the benchmark's peak instead of its own. ``VmHWM`` in /proc/self/status
belongs to the running program's memory alone.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")


def main() -> None:
    output, module, *arguments = sys.argv[1:]
    # atexit runs after the program's own sys.exit, when its memory has peaked.
    atexit.register(lambda: Path(output).write_text(f"{peak_rss_kib()}\n", encoding="ascii"))
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
