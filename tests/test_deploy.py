"""The deployment path against real Prefect servers: `pixart deploy` from prefect.yaml, work pools, schedules,
runs with a few fields overridden (from the CLI, and from the UI's form in a real browser), and process workers
with and without $PIXART_HOME. The first test runs the whole local topology (deploy/start_local.sh); the others
share one server of their own."""

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import deployments
from storage.artifacts import ArtifactStore
from tasks.config import PRESETS, expand_preset, load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "prefect.yaml"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    """This process's environment without Prefect, Ray or PIXART_HOME settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_")) and k != "PIXART_HOME"}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


def run(
    command: list[str], env: dict, timeout: int, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_demo_deployment_runs_on_a_local_server_worker_and_ray_head(tmp_path):
    state, port = tmp_path / "state", free_port()
    env = base_env(  # the state and bin directories relative to where the script is started from
        PIXART_STATE="state",
        PIXART_BIN=os.path.relpath(BIN, tmp_path),
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


@contextlib.contextmanager
def worker(api: str, pool: str, log: Path, home: Path | None):
    """A process worker on `pool`; its flow runs find the code at `home` (PIXART_HOME), or without it if None."""
    env = base_env(PREFECT_API_URL=api) | ({"PIXART_HOME": str(home)} if home else {})
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "started" in log.read_text(), 120, f"the worker ({log})")
        yield
    finally:
        stop(process)


def run_logs(api: str, flow_run_id) -> str:
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(entry.message for entry in logs)


# ---------------------------------------------------------------------------------------------------
#                                     Work pools and schedules
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


@pytest.mark.slow
def test_redeploying_keeps_a_schedule_someone_switched_on(deployed):
    env = base_env(PREFECT_API_URL=deployed)
    (schedule,) = read_deployments(deployed)["caption/nightly-recaption"].schedules
    assert not schedule.active  # as prefect.yaml declares it
    run([str(BIN / "prefect"), "deployment", "schedule", "resume", "caption/nightly-recaption", str(schedule.id)],
        env, timeout=120)  # fmt: skip

    pixart_deploy(deployed)
    (after,) = read_deployments(deployed)["caption/nightly-recaption"].schedules
    assert (after.id, after.active, after.schedule.cron) == (schedule.id, True, "0 2 * * *")


# ---------------------------------------------------------------------------------------------------
#                                     Parameters: the presets, overridden field by field
# ---------------------------------------------------------------------------------------------------


def test_a_preset_spelled_out_is_the_same_config():
    for name in PRESETS:
        expanded = expand_preset(name)
        assert load_config(expanded).model_dump(exclude={"base"}) == load_config(name).model_dump(exclude={"base"})
    assert expand_preset("demo")["workdir"] == "workdir"  # as written: it resolves where the flow runs
    with pytest.raises(ValueError, match=r"base='dem' is not a preset; choose one of \['demo'"):
        expand_preset("dem")


@pytest.mark.slow
def test_a_run_overrides_one_nested_field_of_the_preset(deployed):
    demo = read_deployments(deployed)["pipeline/demo"]
    assert demo.parameters == {"config": expand_preset("demo")}  # the form shows what runs
    env = base_env(PREFECT_API_URL=deployed)
    prefect_run = [str(BIN / "prefect"), "deployment", "run", "pipeline/demo", "--param"]

    done = run([*prefect_run, 'config={"base": "demo", "stage2": {"train": {"steps": 5}}}'], env, timeout=120)
    flow_run_id = re.search(r"UUID: (\S+)", done.stdout).group(1)
    with temporary_settings({PREFECT_API_URL: deployed}), get_client(sync_client=True) as client:
        config = load_config(client.read_flow_run(flow_run_id).parameters["config"])
        client.delete_flow_run(flow_run_id)  # no worker is to pick it up later
    assert config.stage2.train.steps == 5
    assert config.model_dump(exclude={"base", "stage2"}) == load_config("demo").model_dump(exclude={"base", "stage2"})

    bad = run([*prefect_run, 'config={"base": "dem"}'], env, timeout=120, check=False)
    assert bad.returncode != 0
    assert "'dem' is not one of ['demo', 'demo_long', 'pixart_1024_ms', 'pixart_256', 'pixart_512']" in " ".join(
        bad.stdout.split()
    )


@pytest.mark.slow
def test_the_demo_runs_from_the_ui_form_with_one_field_changed(deployed, tmp_path, capsys):
    """As an ML ops engineer would: the demo deployment's page, Run -> Custom run, `until` set to ingest, Submit,
    then the run's page until it shows Completed. Screenshots of the filled form and the finished run are kept."""
    if not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None:
        reason = f"needs {CHROMIUM} (apt-get install chromium) and the playwright package (the dev extras)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}; .ci/browser.sh installs chromium")
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    demo = read_deployments(deployed)["pipeline/demo"]
    ui = deployed.removesuffix("/api")
    # The worker's copy of the code: links to this repository, so that the demo's relative workdir lands here.
    home = tmp_path / "home"
    home.mkdir()
    for part in ("configs", "flows", "models", "storage", "tasks"):
        (home / part).symlink_to(REPO / part)

    with worker(deployed, demo.work_pool_name, tmp_path / "worker.log", home), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)

        # 1. The deployment's page -> Run -> Custom run: the form, filled with the preset's values
        page.goto(f"{ui}/deployments/deployment/{demo.id}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        until = form_field(page, "Until")
        expect(until.locator(".p-select-button__value")).to_have_text("evaluate")
        codec = form_field(page, "Codec").locator(".p-select-button__value")
        expect(codec).to_have_text("pixel")  # the demo's, not the schema's default (vae)

        # 2. One field changed: stop after ingest
        until.locator("button.p-select-button__control").focus()
        page.keyboard.press("ArrowDown")  # opens the options (a click opens and closes them again here)
        page.get_by_role("option", name="ingest", exact=True).click()
        expect(until.locator(".p-select-button__value")).to_have_text("ingest")
        form_png = tmp_path / "custom-run-form.png"
        page.set_viewport_size({"width": 1400, "height": 2400})  # the form from the top to the components
        page.screenshot(path=form_png)
        page.set_viewport_size({"width": 1400, "height": 1000})
        with capsys.disabled():  # shown in a passing run too
            print(f"\nscreenshot of the filled form: {form_png}")

        # 3. Submit, then watch the run's page until it completes
        with page.expect_response(lambda r: r.url.endswith("/create_flow_run")) as created:
            page.get_by_role("button", name="Submit").click()
        assert created.value.status == 201, created.value.text()
        flow_run_id = created.value.json()["id"]
        with temporary_settings({PREFECT_API_URL: deployed}), get_client(sync_client=True) as client:
            wait_until(lambda: client.read_flow_run(flow_run_id).state.is_final(), 900, "the flow run's end")
            flow_run = client.read_flow_run(flow_run_id)
        page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        expect(page.get_by_text(flow_run.state.name, exact=True).first).to_be_visible()
        page.screenshot(path=tmp_path / "flow-run.png")
        browser.close()

    logs = run_logs(deployed, flow_run_id)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{logs[-3000:]}\n{(tmp_path / 'worker.log').read_text()}"
    assert flow_run.parameters["config"] == expand_preset("demo") | {"until": "ingest"}  # the form sent the preset
    store = ArtifactStore(str(home / "workdir"))
    assert [a.stage for a in store.ls() if a.complete] == ["ingest"]


def form_field(page, title: str):
    """The innermost field of Prefect's parameter form whose label is `title`."""
    label = page.locator("span.schema-form-property__label", has_text=re.compile(rf"^{title} \(Optional\)$"))
    return page.locator("div.schema-form-property").filter(has=label).last


# ---------------------------------------------------------------------------------------------------
#                                     Workers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_without_pixart_home_fails_the_run_naming_it(deployed, tmp_path):
    ingest = read_deployments(deployed)["ingest/demo"]
    with worker(deployed, ingest.work_pool_name, tmp_path / "worker.log", home=None):
        with temporary_settings({PREFECT_API_URL: deployed}):
            flow_run = run_deployment("ingest/demo", timeout=300, poll_interval=2)
    assert flow_run.state.is_crashed() or flow_run.state.is_failed(), flow_run.state
    assert "PIXART_HOME is not set on this worker" in run_logs(deployed, flow_run.id)  # in the UI, not only the
    assert "PIXART_HOME is not set on this worker" in (tmp_path / "worker.log").read_text()  # worker's output
