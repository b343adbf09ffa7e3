"""The deployment path end to end: a real Prefect server, a process worker and a Ray head on loopback
(deploy/start_local.sh), `pixart deploy` from prefect.yaml, and the demo deployment triggered through the API."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from storage.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], env: dict, timeout: int, cwd: Path = REPO) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_demo_deployment_runs_on_a_local_server_worker_and_ray_head(tmp_path):
    state, port = tmp_path / "state", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env |= {  # the state and bin directories relative to where the script is started from, not the repository
        "PIXART_STATE": "state",
        "PIXART_BIN": os.path.relpath(BIN, tmp_path),
        "PREFECT_PORT": str(port),
        "RAY_PORT": str(free_port()),
        "RAY_NUM_CPUS": "2",
        "RAY_OBJECT_STORE_MB": "200",
        "PREFECT_UI_ENABLED": "false",
    }
    api = f"http://127.0.0.1:{port}/api"
    ray_address_file = Path("/tmp/ray/ray_current_cluster")  # where a later ray.init() would look for a cluster
    before = ray_address_file.read_text() if ray_address_file.exists() else None
    script = str(REPO / "deploy" / "start_local.sh")
    try:
        # 1. Server, Ray head and worker, started from outside the repository; then the deployments of prefect.yaml
        started = run(["bash", script], env, timeout=300, cwd=tmp_path)
        assert api in started.stdout and (state / "prefect" / "prefect.db").is_file()
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
        subprocess.run(["bash", script, "stop"], env=env, cwd=tmp_path, capture_output=True, timeout=180)
    assert not (state / "prefect" / "server.json").exists() and not (state / "worker.pid").exists()
    assert (ray_address_file.read_text() if ray_address_file.exists() else None) == before
