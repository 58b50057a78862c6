"""The CPU time a proxy spends, read from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path


def process_group_cpu_s(pgids: set[int], proc_root: Path = Path("/proc")) -> float:
    """CPU seconds (user + system) used so far by the live processes of these groups.

    Read from /proc/PID/stat (Linux): fields 5 (pgrp), 14 (utime) and 15 (stime), the
    latter two in clock ticks. A process that exits between two readings takes its time
    with it, so this is for servers that stay up while measured.
    """
    tick = os.sysconf("SC_CLK_TCK")
    ticks = 0
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        # The command name (field 2) is in parentheses and may hold spaces or ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) in pgids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / tick
