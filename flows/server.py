"""`dualforce server up|down|status`: a local Prefect server, the repo's deployments and a worker, as one unit.

`up` starts `prefect server start` on 127.0.0.1, waits for its health endpoint, creates the process work pool,
runs `prefect deploy --all` from the repo root and starts a worker on the pool; it records what it started so
that `down` stops exactly that. The server keeps its database under a PREFECT_HOME of its own (in the state
folder), apart from the embedded mode's `.prefect/`.

Why not `prefect server start --background` / `prefect server stop` (Prefect 3.8.8, read in
prefect/cli/_server_utils.py and cli/server.py): the background server is started with stdout and stderr on pipes
nobody reads once the CLI has returned (its log is lost, and its writes go to a closed pipe), in the terminal's
session (a hang-up or Ctrl-C of that terminal reaches it), and `stop` sends SIGTERM to whatever process holds the
pid in the pid file, without checking it is still the server (after a reboot or a crash it can be another
program) and without waiting for it to exit. There is no background worker at all. Here each process gets a log
file, a session of its own, and a record of its pid and start time (flows/server_state.py): `down` signals a pid
only while the process with that start time still holds it, stops its whole group and waits. The prefect CLI does
the rest: the server itself, `work-pool create`, `deploy --all`, `worker start`.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flows.cli_checks import port, positive_float
from flows.server_state import (
    ProcessRecord,
    ServerRecord,
    is_running,
    load_record,
    record_path,
    remove_record,
    save_record,
    started,
    stop_process,
)

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "dualforce-process"
DEFAULT_PORT = 4200
DEFAULT_STATE_DIR = REPO / ".prefect" / "server"


class ServerError(RuntimeError):
    """`up`/`down` could not do what was asked; the message says why and where the logs are."""


@dataclass
class ServerConfig:
    port: int = DEFAULT_PORT
    state_dir: Path = DEFAULT_STATE_DIR
    prefect_home: Path | None = None  # default: <state_dir>/home
    repo: Path = REPO  # holds prefect.yaml; deploy runs here
    work_pool: str = WORK_POOL
    worker_poll_seconds: float = 10.0  # PREFECT_WORKER_QUERY_SECONDS
    ui: bool = True
    start_timeout: float = 180.0  # server health, then worker registration (2 shared cores: be patient)
    deploy_timeout: float = 300.0

    @property
    def home(self) -> Path:
        return Path(self.prefect_home) if self.prefect_home else Path(self.state_dir) / "home"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def default_state_dir() -> Path:
    return Path(os.environ.get("DUALFORCE_SERVER_DIR", DEFAULT_STATE_DIR))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a listener could bind host:port (SO_REUSEADDR as uvicorn sets it, so TIME_WAIT is no obstacle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200 and json.loads(r.read() or b"null") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pool_workers(api_url: str, pool: str, timeout: float = 5.0) -> list[dict]:
    """The workers the API has heard from on a pool (a worker shows up after its first heartbeat)."""
    req = urllib.request.Request(f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return []


def child_env(cfg: ServerConfig) -> dict[str, str]:
    """Environment of everything `up` runs: the server's own PREFECT_HOME and API URL, the repo importable.

    PWD is set because prefect.yaml's pull step is `{{ $PWD }}`, which `prefect deploy` fills in from the
    environment (a subprocess's cwd alone does not change PWD). PYTHONPATH puts this repo's flows first for
    flow runs the worker starts in a temporary folder (an editable install may point at another checkout).
    """
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_PROFILE"}
    env.update(
        PREFECT_HOME=str(cfg.home),
        PREFECT_API_URL=cfg.api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS=str(cfg.worker_poll_seconds),
        PREFECT_CLI_PROMPT="false",
        PWD=str(cfg.repo),
        PYTHONPATH=os.pathsep.join([str(cfg.repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        PYTHONUNBUFFERED="1",
    )
    return env


def prefect_argv(*args: str) -> list[str]:
    """The prefect CLI of this interpreter (no shell, no PATH lookup)."""
    return [sys.executable, "-m", "prefect", *args]


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One `up`/`down` at a time per state folder."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(path: str | Path, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _spawn(name: str, argv: list[str], cfg: ServerConfig) -> tuple[subprocess.Popen, ProcessRecord]:
    log = Path(cfg.state_dir) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, cwd=cfg.repo, env=child_env(cfg), stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, started(name, proc.pid, argv, log)


def _run(step: str, argv: list[str], cfg: ServerConfig, timeout: float) -> str:
    """A short prefect command against the server; its output goes to the step's log and is returned."""
    log = Path(cfg.state_dir) / "logs" / f"{step}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(argv, cwd=cfg.repo, env=child_env(cfg), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"{step} did not finish within {timeout:.0f} s: {' '.join(argv)}") from exc
    out = proc.stdout + proc.stderr
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(argv)}\n{out}\n[exit {proc.returncode}]\n")
    if proc.returncode != 0:
        raise ServerError(f"{step} failed (exit {proc.returncode}, log {log}):\n{out[-3000:]}")
    return out


def _wait(what: str, ready, proc: subprocess.Popen, rec: ProcessRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise ServerError(f"{rec.name} exited (code {proc.returncode}) before {what}; log {rec.log}:\n{_tail(rec.log)}")
        time.sleep(0.5)
    raise ServerError(f"{what} did not happen within {timeout:.0f} s; log {rec.log}:\n{_tail(rec.log)}")


def ensure_work_pool(cfg: ServerConfig) -> bool:
    """Create the process work pool unless it exists (an existing pool, and its settings, are left alone).

    Returns True when it was created.
    """
    exists = subprocess.run(prefect_argv("work-pool", "inspect", cfg.work_pool), cwd=cfg.repo, env=child_env(cfg),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=cfg.deploy_timeout)
    if exists.returncode == 0:
        return False
    _run("work-pool", prefect_argv("work-pool", "create", cfg.work_pool, "--type", "process"), cfg, cfg.deploy_timeout)
    return True


def running_processes(record: ServerRecord) -> dict[str, bool]:
    return {p.name: is_running(p) for p in record.processes}


def server_up(cfg: ServerConfig, log=print) -> ServerRecord:
    """Start server, pool, deployments and worker; when they already run on cfg.port, return their record.

    Raises ServerError when the port is taken by something else, when another port is asked for while the
    server is up, or when a step fails (then everything this call started is stopped again).
    """
    state_dir = Path(cfg.state_dir)
    with _locked(state_dir):
        record = load_record(state_dir)
        if record is not None:
            alive = running_processes(record)
            if all(alive.values()) and alive:
                if record.port != cfg.port:
                    raise ServerError(f"the server is already up on port {record.port} ({record.api_url}); "
                                      f"run `{REPO / 'run'} server down --state-dir {cfg.state_dir}` before "
                                      f"starting it on port {cfg.port}")
                log(f"already up: {record.api_url} (pids {', '.join(str(p.pid) for p in record.processes)})")
                return record
            log(f"stale record {state_dir / 'server.json'} ({alive}): stopping what is left of it")
            for p in reversed(record.processes):
                stop_process(p)
            remove_record(state_dir)

        if not port_is_free(cfg.port):
            raise ServerError(f"port {cfg.port} on 127.0.0.1 is already in use by another program; "
                              f"choose another with --port")
        cfg.home.mkdir(parents=True, exist_ok=True)
        record = ServerRecord(port=cfg.port, api_url=cfg.api_url, prefect_home=str(cfg.home), repo=str(cfg.repo),
                              work_pool=cfg.work_pool, started_at=time.time())
        try:
            t0 = time.monotonic()
            argv = prefect_argv("server", "start", "--host", "127.0.0.1", "--port", str(cfg.port),
                                "--ui" if cfg.ui else "--no-ui", "--analytics-off")
            server, rec = _spawn("server", argv, cfg)
            record.processes.append(rec)
            save_record(state_dir, record)
            _wait("the API answered", lambda: api_healthy(cfg.api_url), server, rec, cfg.start_timeout)
            log(f"server: healthy at {cfg.api_url} after {time.monotonic() - t0:.1f} s (pid {server.pid})")

            created = ensure_work_pool(cfg)
            log(f"work pool {cfg.work_pool}: {'created' if created else 'exists'}")

            t1 = time.monotonic()
            _run("deploy", prefect_argv("deploy", "--all", "--no-prompt"), cfg, cfg.deploy_timeout)
            log(f"deployments from {cfg.repo / 'prefect.yaml'}: done in {time.monotonic() - t1:.1f} s")

            argv = prefect_argv("worker", "start", "--pool", cfg.work_pool, "--type", "process",
                                "--name", f"dualforce-{cfg.port}")
            worker, wrec = _spawn("worker", argv, cfg)
            record.processes.append(wrec)
            save_record(state_dir, record)
            _wait("the worker registered with the pool",
                  lambda: any(w.get("name") == f"dualforce-{cfg.port}" for w in pool_workers(cfg.api_url, cfg.work_pool)),
                  worker, wrec, cfg.start_timeout)
            log(f"worker: polling {cfg.work_pool} every {cfg.worker_poll_seconds:g} s (pid {worker.pid}); "
                f"up in {time.monotonic() - t0:.1f} s")
        except BaseException:
            for p in reversed(record.processes):
                stop_process(p)
            remove_record(state_dir)
            raise
        return record


def server_down(state_dir: Path, timeout: float = 15.0, log=print) -> list[int]:
    """Stop what the record names (worker first), then remove the record; returns the pids signalled."""
    state_dir = Path(state_dir)
    if not record_path(state_dir).is_file():  # nothing to stop: and no lock file made in a folder we never had
        log(f"nothing to stop: no server record in {state_dir}")
        return []
    with _locked(state_dir):
        record = load_record(state_dir)
        if record is None:
            log(f"nothing to stop: no server record in {state_dir}")
            return []
        stopped: list[int] = []
        for p in reversed(record.processes):
            pids = stop_process(p, timeout=timeout)
            log(f"{p.name}: {'stopped pids ' + ', '.join(map(str, pids)) if pids else 'was not running'}")
            stopped += pids
        still = [p.name for p in record.processes if is_running(p)]
        if still:
            raise ServerError(f"could not stop {still}; the record {state_dir / 'server.json'} is kept")
        remove_record(state_dir)
        return stopped


def server_status(state_dir: Path) -> dict:
    """What the record says and what of it runs; `up` is True only when every process runs and the API answers."""
    record = load_record(Path(state_dir))
    if record is None:
        return {"up": False, "record": None}
    alive = running_processes(record)
    healthy = api_healthy(record.api_url)
    return {"up": bool(alive) and all(alive.values()) and healthy, "api_url": record.api_url, "port": record.port,
            "healthy": healthy, "processes": {p.name: {"pid": p.pid, "running": alive[p.name], "log": p.log}
                                              for p in record.processes},
            "prefect_home": record.prefect_home, "record": str(Path(state_dir) / "server.json")}


def _how_to_use(record: ServerRecord, state_dir: Path) -> str:
    """Commands that run as printed: the venv's `prefect` by its path, `./run` by the repository's, and the
    --state-dir the user passed (the default one is left out)."""
    ui = record.api_url.removesuffix("/api")
    prefect = Path(sys.executable).parent / "prefect"
    state = "" if Path(state_dir).resolve() == default_state_dir().resolve() else f" --state-dir {state_dir}"
    return "\n".join([
        f"Prefect API: {record.api_url}   (UI: {ui})",
        "Submit a run (the worker picks it up within its poll interval):",
        f"  PREFECT_API_URL={record.api_url} {prefect} deployment run dry-run/dry-run",
        f"  PREFECT_API_URL={record.api_url} {prefect} deployment run preprocess/preprocess-hdtf "
        f"-p manifest=/data/manifests/hdtf.parquet",
        f"Logs: {Path(record.processes[0].log).parent}   Stop: {REPO / 'run'} server down{state}",
    ])


def cmd_server_up(args: argparse.Namespace) -> int:
    for flag, value in (("--state-dir", args.state_dir), ("--prefect-home", args.prefect_home)):
        if value and Path(value).exists() and not Path(value).is_dir():
            print(f"server up: {flag} {value} is a file, not a folder", file=sys.stderr)
            return 2
    cfg = ServerConfig(port=args.port, state_dir=Path(args.state_dir),
                       prefect_home=Path(args.prefect_home) if args.prefect_home else None,
                       worker_poll_seconds=args.poll_seconds, ui=not args.no_ui)
    try:
        record = server_up(cfg, log=lambda m: print(m, file=sys.stderr))
    except (ServerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(_how_to_use(record, Path(args.state_dir)))
    return 0


def cmd_server_down(args: argparse.Namespace) -> int:
    try:
        server_down(Path(args.state_dir), timeout=args.timeout, log=print)
    except (ServerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_server_status(args: argparse.Namespace) -> int:
    try:
        st = server_status(Path(args.state_dir))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if st["record"] is None:
        print("down: no server record")
        return 1
    print(f"{'up' if st['up'] else 'NOT fully up'}: {st['api_url']} (API {'answers' if st['healthy'] else 'does not answer'})")
    for name, p in st["processes"].items():
        print(f"  {name:<7} pid {p['pid']:<8} {'running' if p['running'] else 'gone'}   log {p['log']}")
    return 0 if st["up"] else 1


def add_server_parser(subparsers) -> argparse.ArgumentParser:
    """Register `server up|down|status` on a `dualforce` subparsers object."""
    s = subparsers.add_parser("server", help="a local Prefect server + deployments + worker (server mode)")
    sub = s.add_subparsers(dest="server_command", required=True)

    def state_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", default=str(default_state_dir()),
                       help="record, logs and the server's PREFECT_HOME (default: .prefect/server or $DUALFORCE_SERVER_DIR)")

    up = sub.add_parser("up", help="start server, work pool, deployments and a worker")
    up.add_argument("--port", type=port, default=DEFAULT_PORT)
    state_arg(up)
    up.add_argument("--prefect-home", help="the server's PREFECT_HOME (default: <state-dir>/home)")
    up.add_argument("--poll-seconds", type=positive_float, default=10.0, help="how often the worker asks for runs")
    up.add_argument("--no-ui", action="store_true", help="serve the API only")
    up.set_defaults(func=cmd_server_up)

    down = sub.add_parser("down", help="stop what `server up` started")
    state_arg(down)
    down.add_argument("--timeout", type=positive_float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    down.set_defaults(func=cmd_server_down)

    st = sub.add_parser("status", help="what runs (exit 0 only when fully up)")
    state_arg(st)
    st.set_defaults(func=cmd_server_status)
    return s


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m flows.server up`) until `dualforce` wires add_server_parser in."""
    p = argparse.ArgumentParser(prog="dualforce")
    add_server_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["server", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
