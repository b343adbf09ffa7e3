"""The workdir's local Prefect server (flows/server.py): real servers, started by real `pixart` commands in
subprocesses, found again by later ones, replaced when stale, stopped. Every test stops what it started."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.server import HOME_ENV, alive, read_record, record_path, server_home, stop_server

PIXART = str(Path(sys.executable).parent / "pixart")
VIEW_AT = re.compile(r"View at (http://127\.0\.0\.1:\d+)/runs/flow-run/([0-9a-f-]{36})")


def env() -> dict:
    """This environment without a configured Prefect API, Ray cluster or server home: what a user starts from."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS", "PIXART_SERVER"))}


def pixart(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PIXART, *map(str, args)], env=env(), capture_output=True, text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def server_processes(home: Path) -> list[int]:
    """Pids of the Prefect servers running in `home` (a server's working directory is its home)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").resolve() == home.resolve() and alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


@pytest.fixture
def workdir(tmp_path):
    """A local workdir; whatever server a test leaves in it is stopped afterwards."""
    workdir = tmp_path / "work"
    yield workdir
    stop_server(workdir / ".server")
    assert server_processes(workdir / ".server") == []


def test_the_server_lives_in_the_workdir_or_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert server_home("workdir") == tmp_path / "workdir" / ".server"  # absolute, whatever the cwd later
    assert server_home("s3://bucket/pixart") is None  # a remote workdir: a temporary server per command
    monkeypatch.setenv(HOME_ENV, "state")
    assert server_home("s3://bucket/pixart") == tmp_path / "state"

    done = pixart("server", "status", "--workdir", "s3://bucket/pixart", timeout=60)
    assert done.returncode == 1 and HOME_ENV in done.stderr and "not local" in done.stderr


@pytest.mark.slow
def test_commands_start_one_server_and_its_links_and_history_outlive_them(workdir, tmp_path):
    home = workdir / ".server"
    config = tmp_path / "small.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": "demo",
                "until": "ingest",
                "ingest": {"source": {"kind": "shapes", "count": 16, "image_size": 32}, "samples_per_shard": 8},
            }
        )
    )
    assert pixart("server", "status", "--workdir", workdir, timeout=60).returncode == 1

    # 1. The first command starts the server; its flow run and the task runs on Ray report to it
    first = ok(pixart("run", "ingest", "-c", config, "--workdir", workdir))
    url, first_run = VIEW_AT.search(first).groups()
    assert f"Prefect UI: {url} (local server" in first and "started now" in first
    server = read_record(home)
    assert server.url == url and alive(server.pid)

    # 2. After the command: the link opens, the run, its task runs and its Prefect artifacts are there
    link = urllib.request.Request(f"{url}/runs/flow-run/{first_run}", headers={"Accept": "text/html"})  # a browser
    with urllib.request.urlopen(link, timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read()
    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        assert client.read_flow_run(first_run).state.is_completed()
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first_run])))
        assert sum(r.name.startswith("ingest-shard") for r in runs) == 2  # run on Ray workers
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-counts"]))
        assert len(client.read_artifacts(artifact_filter=keys)) == 1

    # 3. The next command reuses it: the same process, no second server, and nothing to do takes seconds
    start = time.perf_counter()
    again = ok(pixart("run", "ingest", "-c", config, "--workdir", workdir))
    seconds = time.perf_counter() - start
    print(f"fully reused `pixart run ingest` with the server up: {seconds:.1f} s")
    assert "reused" in again and f"pid {server.pid}, up " in again and VIEW_AT.search(again)[1] == url
    assert server_processes(home) == [server.pid] and read_record(home) == server

    status = ok(pixart("server", "status", "--workdir", workdir, timeout=60))
    for value in (url, str(server.pid), str(home / "prefect.db"), "uptime"):
        assert value in status

    # 4. Stopped, the server is gone; started again, it shows the same history
    assert f"stopped the server at {url}" in ok(pixart("server", "stop", "--workdir", workdir, timeout=60))
    assert not alive(server.pid) and not record_path(home).exists()
    assert pixart("server", "status", "--workdir", workdir, timeout=60).returncode == 1
    assert "no server running" in ok(pixart("server", "stop", "--workdir", workdir, timeout=60))
    ok(pixart("server", "start", "--workdir", workdir))
    with temporary_settings({PREFECT_API_URL: read_record(home).api_url}), get_client(sync_client=True) as client:
        assert client.read_flow_run(first_run).state.is_completed()


@pytest.mark.slow
def test_a_stale_record_is_replaced_and_the_process_it_names_left_alone(workdir):
    home = workdir / ".server"
    home.mkdir(parents=True)
    # The recorded pid now belongs to some other program, and something else listens on the recorded port
    other = subprocess.Popen(["sleep", "300"])
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    try:
        port = squatter.getsockname()[1]
        record_path(home).write_text(
            json.dumps({"pid": other.pid, "port": port, "started": 0, "database": "", "log": ""})
        )
        assert pixart("server", "status", "--workdir", workdir, timeout=60).returncode == 1
        taken = pixart("server", "start", "--workdir", workdir, "--port", port, timeout=60)
        assert taken.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in taken.stderr

        out = ok(pixart("server", "start", "--workdir", workdir))
        server = read_record(home)
        assert "started" in out and server.pid != other.pid and server.port != port and server.url in out
        assert other.poll() is None  # not ours: never signalled
        assert f"pid       {server.pid}" in ok(pixart("server", "status", "--workdir", workdir, timeout=60))
    finally:
        other.kill()
        other.wait()
        squatter.close()

    # The server dies without a word (SIGKILL): its record is stale, and the next start replaces it
    os.killpg(server.pid, 9)
    deadline = time.monotonic() + 30
    while alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pixart("server", "status", "--workdir", workdir, timeout=60).returncode == 1
    ok(pixart("server", "start", "--workdir", workdir))
    assert read_record(home).pid != server.pid and server_processes(home) == [read_record(home).pid]


@pytest.mark.slow
def test_two_commands_starting_at_once_start_one_server(workdir):
    home = workdir / ".server"
    starts = [
        subprocess.Popen([PIXART, "server", "start", "--workdir", str(workdir)], env=env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in starts]
    assert [process.returncode for process in starts] == [0, 0], outputs
    server = read_record(home)
    assert sorted(("started: " in err, "already running: " in err) for _, err in outputs) == [
        (False, True),
        (True, False),
    ]
    assert all(f"pid       {server.pid}" in out for out, _ in outputs)
    assert server_processes(home) == [server.pid]
