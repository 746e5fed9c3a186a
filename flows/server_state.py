"""What `dualforce server up` started, on disk, and how to stop exactly that.

The record is a small JSON file in the server's state folder. Each process carries its pid, its process group
and its start time, so that `down` never signals a process that merely reused a recorded pid.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

RECORD_NAME = "server.json"


@dataclass
class ProcessRecord:
    """One long-running process started by `up` (its own session, so its group id equals its pid)."""

    name: str  # "server" | "worker"
    pid: int
    pgid: int
    create_time: float  # psutil's start time: tells the recorded process from a later one with the same pid
    argv: list[str]
    log: str


@dataclass
class ServerRecord:
    port: int
    api_url: str
    prefect_home: str
    repo: str
    work_pool: str
    started_at: float
    processes: list[ProcessRecord] = field(default_factory=list)

    def process(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)


def record_path(state_dir: Path) -> Path:
    return Path(state_dir) / RECORD_NAME


def save_record(state_dir: Path, record: ServerRecord) -> Path:
    """Write the record atomically (temp file + rename): `down` must never find half a file."""
    path = record_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    os.replace(tmp, path)
    return path


def load_record(state_dir: Path) -> ServerRecord | None:
    path = record_path(state_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        procs = [ProcessRecord(**p) for p in data.pop("processes")]
        return ServerRecord(**data, processes=procs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"server record {path} is unreadable ({exc}); stop its processes by hand and delete it") from exc


def remove_record(state_dir: Path) -> None:
    record_path(state_dir).unlink(missing_ok=True)


def started(name: str, proc_pid: int, argv: list[str], log: Path) -> ProcessRecord:
    """The record of a process just started with start_new_session=True."""
    return ProcessRecord(name=name, pid=proc_pid, pgid=os.getpgid(proc_pid),
                         create_time=psutil.Process(proc_pid).create_time(), argv=list(argv), log=str(log))


def _live(pid: int, create_time: float | None = None) -> psutil.Process | None:
    """The process behind pid if it still runs (zombies count as gone) and, when given, started at create_time."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time is not None and abs(p.create_time() - create_time) > 0.01:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_running(rec: ProcessRecord) -> bool:
    return _live(rec.pid, rec.create_time) is not None


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is pgid."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, PermissionError):
            continue
    return members


def stop_process(rec: ProcessRecord, timeout: float = 15.0) -> list[int]:
    """SIGTERM the recorded process, its group and its descendants; SIGKILL what is left after timeout.

    Returns the pids that were signalled (empty when the recorded process is already gone). Descendants are
    collected as well as the group because a child may have started a session of its own (a flow run).
    """
    leader = _live(rec.pid, rec.create_time)
    if leader is None:
        return []
    targets = {p.pid: p for p in group_members(rec.pgid)}
    try:
        targets.update({c.pid: c for c in leader.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    targets[leader.pid] = leader
    for p in targets.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(targets.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_members(rec.pgid):  # stragglers that joined the group late
        for p in group_members(rec.pgid):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    return sorted(targets)
