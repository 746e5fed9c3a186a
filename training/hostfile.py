"""DeepSpeed hostfiles (`host slots=N` per line): parse strictly, so a typo fails here and not on node 7.

DeepSpeed's own parser accepts trailing text after `slots=N` and, when the file is missing, silently trains on
the local machine only; these checks turn both into errors that name the file and line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<host>[^\s#]+)\s+slots=(?P<slots>\d+)\s*(?:#.*)?$")


@dataclass(frozen=True)
class HostSlots:
    host: str
    slots: int  # processes (accelerators) this host offers


def parse_hostfile(text: str, source: str = "hostfile") -> list[HostSlots]:
    """Hosts in file order; blank lines and `#` comments are skipped; duplicates and bad lines are errors."""
    hosts: list[HostSlots] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{source} line {number}: expected 'HOST slots=N', got {line!r}")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise ValueError(f"{source} line {number}: host {host!r} has slots={slots}; slots must be >= 1")
        if host in seen:
            raise ValueError(f"{source} line {number}: host {host!r} is listed twice (first on line {seen[host]})")
        seen[host] = number
        hosts.append(HostSlots(host, slots))
    if not hosts:
        raise ValueError(f"{source} lists no hosts (expected lines like 'worker-0 slots=8')")
    return hosts


def read_hostfile(path: str | Path) -> list[HostSlots]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} does not exist (DeepSpeed would silently train on this node only)")
    return parse_hostfile(path.read_text(), source=f"hostfile {path}")


def write_hostfile(hosts: list[HostSlots], path: str | Path) -> Path:
    """The DeepSpeed format, e.g. from a SLURM node list; written temp + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{h.host} slots={h.slots}\n" for h in hosts))
    tmp.replace(path)
    return path
