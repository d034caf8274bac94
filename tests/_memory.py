"""How much of a mapped file this process holds in memory, from Linux's /proc/self/smaps."""

import re
from pathlib import Path

SMAPS = Path("/proc/self/smaps")
HAS_SMAPS = SMAPS.exists()


def resident_kb(path):
    """KB of the file at `path` resident in this process's maps of it."""
    total, in_file = 0, False
    for line in SMAPS.read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: address range, ..., file
            in_file = line.rstrip().endswith(str(path))
        elif in_file and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def vm_flags(address):
    """The VmFlags of this process's mapping holding `address` ("hg": advised for huge pages)."""
    inside = False
    for line in SMAPS.read_text().splitlines():
        header = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if header:
            inside = int(header[1], 16) <= address < int(header[2], 16)
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise LookupError(f"no mapping holds {address:#x}")
