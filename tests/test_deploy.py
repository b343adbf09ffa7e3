"""The deployment path against real Prefect servers: `pixart deploy` from prefect.yaml and work pools. The first
test runs the whole local topology (deploy/start_local.sh); the others share one server of their own."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import deployments
from storage.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "prefect.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    """This process's environment without Prefect, Ray or PIXART_HOME settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_")) and k != "PIXART_HOME"}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


def run(command: list[str], env: dict, timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_demo_deployment_runs_on_a_local_server_worker_and_ray_head(tmp_path):
    state, port = tmp_path / "state", free_port()
    env = base_env(
        PIXART_STATE=str(state),
        PIXART_BIN=str(BIN),
        PREFECT_PORT=str(port),
        RAY_PORT=str(free_port()),
        RAY_NUM_CPUS="2",
        RAY_OBJECT_STORE_MB="200",
        PREFECT_UI_ENABLED="false",
    )
    api = f"http://127.0.0.1:{port}/api"
    ray_address_file = Path("/tmp/ray/ray_current_cluster")  # where a later ray.init() would look for a cluster
    before = ray_address_file.read_text() if ray_address_file.exists() else None
    script = str(REPO / "deploy" / "start_local.sh")
    try:
        # 1. Server, Ray head and worker; then the deployments of prefect.yaml
        started = run(["bash", script], env, timeout=300)
        assert api in started.stdout
        deployed = run([str(BIN / "pixart"), "deploy"], env | {"PREFECT_API_URL": api}, timeout=300)
        assert "pipeline/demo" in deployed.stdout

        # 2. The demo deployment, with a smaller source and stopping after captions, through the API
        workdir = tmp_path / "work"
        config = {
            "base": "demo",
            "until": "caption",
            "workdir": str(workdir),
            "ingest": {"source": {"kind": "shapes", "count": 16, "image_size": 32}, "samples_per_shard": 8},
            "caption": {"generation": {"max_new_tokens": 4}},
        }
        with temporary_settings({PREFECT_API_URL: api}):
            flow_run = run_deployment("pipeline/demo", parameters={"config": config}, timeout=400, poll_interval=2)
            assert flow_run.state.is_completed(), f"{flow_run.state}\n{(state / 'worker.log').read_text()[-4000:]}"
            with get_client(sync_client=True) as client:
                nightly = client.read_deployment_by_name("caption/nightly-recaption")
        assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [("0 2 * * *", False)]

        # 3. What the run left in the workdir
        store = ArtifactStore(str(workdir))
        assert sorted(a.stage for a in store.ls() if a.complete) == ["caption", "ingest"]
    finally:
        subprocess.run(["bash", script, "stop"], env=env, cwd=REPO, capture_output=True, timeout=180)
    assert not (state / "server.pid").exists() and not (state / "worker.pid").exists()
    assert (ray_address_file.read_text() if ray_address_file.exists() else None) == before


# ---------------------------------------------------------------------------------------------------
#                                     One server for the rest
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server with its UI on a free loopback port, its database in a temporary directory; yields its
    API URL."""
    home, port = tmp_path_factory.mktemp("prefect"), free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=api)  # the UI calls the API at PREFECT_API_URL
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "server.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: healthy(api), 180, f"the Prefect server ({home / 'server.log'})")
        yield api
    finally:
        stop(process)


def healthy(api: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(f"{api}/health", timeout=5).status == 200
    except OSError:
        return False


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {seconds} s")
        time.sleep(1)


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
            return


def pixart_deploy(api: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "pixart"), "deploy", *args], base_env(PREFECT_API_URL=api), timeout=600, check=check)


@pytest.fixture(scope="module")
def deployed(server):
    """prefect.yaml's deployments on the server, as `pixart deploy` registers them (pool pixart-local)."""
    pixart_deploy(server)
    return server


def read_deployments(api: str) -> dict:
    """{"flow/name": deployment} of every deployment on the server."""
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}


# ---------------------------------------------------------------------------------------------------
#                                     Work pools
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pixart_deploy_puts_every_deployment_on_the_pool_it_is_given(deployed, monkeypatch):
    declared = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]

    done = pixart_deploy(deployed, "--pool", "pixart-gpu")  # they were on pixart-local
    on_server = read_deployments(deployed)
    assert len(on_server) == len(declared) == 10
    assert {name: d.work_pool_name for name, d in on_server.items()} == dict.fromkeys(on_server, "pixart-gpu")
    assert "10 deployments on work pool 'pixart-gpu'" in done.stderr

    # What `prefect deploy --all --pool` did before (the file's pool wins) now stops the command, naming each one.
    render = deployments.render
    monkeypatch.setattr(deployments, "render", lambda declared, pool, *rest: render(declared, "pixart-local", *rest))
    monkeypatch.setenv("PREFECT_API_URL", deployed)
    with temporary_settings({PREFECT_API_URL: deployed}), pytest.raises(ValueError) as failed:
        deployments.deploy(PREFECT_FILE, "pixart-gpu")
    assert "pipeline/demo: on work pool 'pixart-local', not 'pixart-gpu'" in str(failed.value)
    assert str(failed.value).count("not 'pixart-gpu'") == 10
