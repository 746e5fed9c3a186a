"""Server mode: `server up|down|status` start and stop exactly what they record; a deployment runs through it."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from flows import server as srv
from flows.server_state import ServerRecord, is_running, load_record, record_path, save_record, started

REPO = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_sleeper(name: str, log: Path, argv=SLEEPER):
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, started(name, proc.pid, argv, log)


def fake_record(tmp_path: Path, port: int, *recs) -> ServerRecord:
    record = ServerRecord(port=port, api_url=f"http://127.0.0.1:{port}/api", prefect_home=str(tmp_path / "home"),
                          repo=str(REPO), work_pool=srv.WORK_POOL, started_at=time.time(), processes=list(recs))
    save_record(tmp_path, record)
    return record


@pytest.fixture
def sleepers(tmp_path):
    """A 'server' and a 'worker' stand-in (each in its own session); killed at the end whatever happens."""
    procs = [spawn_sleeper(n, tmp_path / f"{n}.log") for n in ("server", "worker")]
    yield procs
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_down_with_nothing_recorded_does_nothing(tmp_path):
    lines = []
    assert srv.server_down(tmp_path, log=lines.append) == []
    assert "nothing to stop" in lines[0] and not record_path(tmp_path).exists()
    assert srv.server_status(tmp_path) == {"up": False, "record": None}


def test_an_unreadable_record_is_reported_not_guessed_at(tmp_path, capsys):
    record_path(tmp_path).write_text('{"port": 4200, "processes": [{"pid": 1}]')  # cut short
    args = type("Args", (), {"state_dir": str(tmp_path), "timeout": 1.0, "port": 4200, "prefect_home": None,
                             "poll_seconds": 10.0, "no_ui": True})()
    for cmd in (srv.cmd_server_down, srv.cmd_server_up, srv.cmd_server_status):
        assert cmd(args) == 1
        assert f"server record {record_path(tmp_path)} is unreadable" in capsys.readouterr().err
    assert record_path(tmp_path).exists()  # left for a person to look at


def test_up_refuses_a_port_another_program_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(srv, "_spawn", lambda *a, **k: pytest.fail("nothing may be started"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not srv.port_is_free(port)
        with pytest.raises(srv.ServerError, match=rf"port {port} on 127.0.0.1 is already in use"):
            srv.server_up(srv.ServerConfig(port=port, state_dir=tmp_path), log=lambda m: None)
    assert srv.port_is_free(port)
    assert not record_path(tmp_path).exists()


def test_up_when_already_up_returns_the_record_and_starts_nothing(tmp_path, sleepers, monkeypatch):
    port = free_port()
    record = fake_record(tmp_path, port, *(r for _, r in sleepers))
    monkeypatch.setattr(srv, "_spawn", lambda *a, **k: pytest.fail("nothing may be started"))
    lines = []
    again = srv.server_up(srv.ServerConfig(port=port, state_dir=tmp_path), log=lines.append)
    assert again == record and lines == [f"already up: {record.api_url} (pids {sleepers[0][0].pid}, {sleepers[1][0].pid})"]
    with pytest.raises(srv.ServerError, match=rf"already up on port {port} .*server down.* port {port + 1}"):
        srv.server_up(srv.ServerConfig(port=port + 1, state_dir=tmp_path), log=lines.append)
    assert all(p.poll() is None for p, _ in sleepers) and load_record(tmp_path) == record


def test_up_clears_a_stale_record_before_starting(tmp_path, sleepers, monkeypatch):
    (server, srec), (worker, wrec) = sleepers
    fake_record(tmp_path, 4200, srec, wrec)
    server.kill()
    server.wait()  # the server died; its worker lives on
    monkeypatch.setattr(srv, "port_is_free", lambda port, host="127.0.0.1": False)  # stop right after the cleanup
    lines = []
    with pytest.raises(srv.ServerError, match="already in use"):
        srv.server_up(srv.ServerConfig(port=4200, state_dir=tmp_path), log=lines.append)
    assert lines[0].startswith("stale record") and "'server': False, 'worker': True" in lines[0]
    assert worker.wait(timeout=10) is not None and not record_path(tmp_path).exists()


def test_down_stops_the_recorded_groups_and_descendants_only(tmp_path):
    # the "worker" has a child in its group and a grandchild that started a session of its own (a flow run)
    tree = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
            "time.sleep(300)\n")
    worker, wrec = spawn_sleeper("worker", tmp_path / "w.log", [sys.executable, "-c", tree])
    server, srec = spawn_sleeper("server", tmp_path / "s.log")
    bystander = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        deadline = time.time() + 30
        while len(psutil.Process(worker.pid).children()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        kids = psutil.Process(worker.pid).children()
        assert len(kids) == 2
        fake_record(tmp_path, 4200, srec, wrec)
        out = []
        stopped = srv.server_down(tmp_path, timeout=5, log=out.append)
        assert sorted(stopped) == sorted([worker.pid, server.pid] + [k.pid for k in kids])
        assert out[0].startswith("worker: stopped pids") and out[1] == f"server: stopped pids {server.pid}"
        worker.wait(timeout=5), server.wait(timeout=5)
        assert not any(psutil.pid_exists(k.pid) and psutil.Process(k.pid).status() != psutil.STATUS_ZOMBIE for k in kids)
        assert bystander.poll() is None  # not recorded, not touched
        assert not record_path(tmp_path).exists()
    finally:
        for p in (worker, server, bystander):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_reused_pid_is_not_signalled(tmp_path, sleepers):
    (proc, rec), _ = sleepers
    rec.create_time -= 100  # the recorded process started earlier: this pid now belongs to another one
    assert not is_running(rec)
    fake_record(tmp_path, 4200, rec)
    assert srv.server_down(tmp_path, log=lambda m: None) == []
    assert proc.poll() is None


def test_a_server_that_dies_at_start_is_reported_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(srv, "prefect_argv", lambda *a: [sys.executable, "-c", "print('boom: no database'); raise SystemExit(3)"])
    cfg = srv.ServerConfig(port=free_port(), state_dir=tmp_path, start_timeout=60)
    with pytest.raises(srv.ServerError, match=r"(?s)server exited \(code 3\) before the API answered.*boom: no database"):
        srv.server_up(cfg, log=lambda m: None)
    assert not record_path(tmp_path).exists()


def test_child_env_points_everything_at_the_servers_home_and_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("PWD", "/somewhere/else")
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    monkeypatch.setenv("PYTHONPATH", "/extra")
    env = srv.child_env(srv.ServerConfig(port=4321, state_dir=tmp_path))
    assert env["PREFECT_HOME"] == str(tmp_path / "home") and env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PWD"] == str(REPO) and env["PYTHONPATH"] == f"{REPO}{os.pathsep}/extra"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and "PREFECT_PROFILE" not in env


def test_parser_registers_up_down_status(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    srv.add_server_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["server", "up", "--port", "4999", "--state-dir", str(tmp_path), "--poll-seconds", "2"])
    assert (a.func, a.port, a.state_dir, a.poll_seconds) == (srv.cmd_server_up, 4999, str(tmp_path), 2.0)
    assert p.parse_args(["server", "down", "--timeout", "3"]).func is srv.cmd_server_down
    assert p.parse_args(["server", "status"]).func is srv.cmd_server_status
    with pytest.raises(SystemExit):
        p.parse_args(["server"])


# ---------------------------------------------------------------------------------------------- end to end


def _server_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.server", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_dry_run_deployment_runs_through_the_worker(tmp_path, samples_dir):
    """up -> submit dry-run/dry-run -> COMPLETED with shards -> up again is a no-op -> down leaves nothing."""
    from tasks.steps.shard import shard_files

    port, state = free_port(), tmp_path / "state"
    one_clip = tmp_path / "samples"  # one short clip keeps the run to about a minute
    one_clip.mkdir()
    (one_clip / "yongen.mp4").symlink_to(samples_dir / "yongen.mp4")
    out = tmp_path / "out"
    t0, record = time.monotonic(), None
    try:  # `down` in finally: the record is written as each process starts, so even a failed `up` is undone
        up = _server_cli("up", "--port", str(port), "--state-dir", str(state), "--poll-seconds", "2", "--no-ui")
        record = load_record(state)
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{port}/api"
        assert f"Prefect API: {api}" in up.stdout and "prefect deployment run dry-run/dry-run" in up.stdout
        assert [p.name for p in record.processes] == ["server", "worker"] and record.prefect_home == str(state / "home")
        assert (state / "home" / "prefect.db").exists()  # the server's own database, not the embedded mode's
        t_up = time.monotonic() - t0

        again = _server_cli("up", "--port", str(port), "--state-dir", str(state))
        assert again.returncode == 0 and "already up" in again.stderr and load_record(state) == record
        assert _server_cli("status", "--state-dir", str(state)).returncode == 0

        params = {"out": str(out), "samples": str(one_clip), "train_steps": 0, "window_frames": 5,
                  "window_stride": 10000, "workers": 1}
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "home")}
        t1 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "dry-run/dry-run",
                              "--params", json.dumps(params), "--watch", "--watch-interval", "2"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        t_run = time.monotonic() - t1
        worker_log = Path(record.process("worker").log).read_text()
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + worker_log[-4000:]
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
        with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}") as r:
            flow_run = json.loads(r.read())
        assert flow_run["state"]["type"] == "COMPLETED" and flow_run["parameters"]["out"] == str(out)
        # this worker ran it: the process worker records the pid of the flow-run process it started, on its pool,
        # and the flow's own output came through the worker's log (its "Finished" line may still be buffered)
        assert flow_run["work_pool_name"] == record.work_pool and str(flow_run["infrastructure_pid"]).isdigit()
        assert "DRY RUN" in worker_log and f"Worker 'dualforce-{port}'" in worker_log, worker_log[-4000:]
        shards = shard_files(out / "samples" / "shards")
        assert shards and all(p.stat().st_size > 0 for p in shards)
        stats = json.loads((out / "samples" / "shards" / "stats.json").read_text())
        assert stats["clips"] == 1 and stats["samples"] == 1 and stats["config"]["stride"] == 10000
    finally:
        t2 = time.monotonic()
        down = _server_cli("down", "--state-dir", str(state), "--timeout", "10")
        t_down = time.monotonic() - t2
    assert down.returncode == 0, down.stdout + down.stderr
    assert record is not None and not any(is_running(p) for p in record.processes)
    assert not any(psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE
                   for p in record.processes)
    assert srv.port_is_free(port) and not record_path(state).exists()
    assert _server_cli("status", "--state-dir", str(state)).returncode == 1
    print(f"\nserver mode e2e: up {t_up:.1f} s, dry-run through the worker {t_run:.1f} s, down {t_down:.1f} s")


def test_the_printed_hints_run_as_printed(tmp_path):
    """`up`'s hints name the venv's prefect by its path, ./run by the repository's, and a --state-dir the user gave."""
    from flows.server_state import ProcessRecord

    record = ServerRecord(port=4321, api_url="http://127.0.0.1:4321/api", prefect_home=str(tmp_path / "home"),
                          repo=str(REPO), work_pool="dualforce", started_at=0.0,
                          processes=[ProcessRecord("server", 1, 1, 0.0, [], str(tmp_path / "logs" / "server.log"))])
    text = srv._how_to_use(record, tmp_path / "state")
    prefect = re.search(r"PREFECT_API_URL=\S+ (\S+) deployment run dry-run/dry-run", text).group(1)
    assert Path(prefect).is_file() and os.access(prefect, os.X_OK)
    stop = text.split("Stop: ")[1].split()
    assert Path(stop[0]) == REPO / "run" and Path(stop[0]).is_file()
    assert stop[1:] == ["server", "down", "--state-dir", str(tmp_path / "state")]
    assert "--state-dir" not in srv._how_to_use(record, srv.default_state_dir()).split("Stop: ")[1]
