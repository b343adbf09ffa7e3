"""prefect.yaml's deployments: registering them on a Prefect server (`pixart deploy`), and the pull step with which
a worker runs them from the code at $PIXART_HOME.

`prefect deploy --all` ignores `--pool` (Prefect applies command-line options to single deployments only) and
recreates every schedule as the file declares it, switched off again if the file says `active: false`. So
`deploy` writes the file as it must be registered (the pool, each `config: {base: PRESET}` spelled out, each
schedule's current state) to a temporary copy, deploys that, and reads back through the API what the server holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def set_working_directory() -> dict[str, str]:
    """The pull step: enter $PIXART_HOME, where the worker's copy of this repository is. Prefect's own step, given
    an unset variable, would stay wherever the worker happened to start; this one fails the run, saying why."""
    home = os.environ.get("PIXART_HOME")
    if not home:
        fail_run(
            "PIXART_HOME is not set on this worker: export it as the directory holding the pixart-pipeline code "
            "before starting the worker (deploy/start_local.sh does; the image sets /opt/pixart)"
        )
    if not (Path(home) / "flows" / "pipeline.py").is_file():
        fail_run(f"PIXART_HOME={home} holds no flows/pipeline.py: point it at the pixart-pipeline code")
    os.chdir(home)
    return {"directory": os.getcwd()}


def fail_run(reason: str) -> None:
    """Raise `reason`, and put it in the flow run's log too: Prefect reports a failed pull step there only as
    the process's exit code (the traceback goes to the worker's output)."""
    from prefect.logging import get_logger

    get_logger("flow_runs").error(reason, extra={"flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID")})
    raise RuntimeError(reason)


def deploy(prefect_file: Path, pool: str) -> list[str]:
    """Register every deployment of `prefect_file` on process work pool `pool` (created if missing) with the
    server at PREFECT_API_URL; returns their names ("pipeline/demo", ...).

    A schedule keeps the state it has on the server (a user may have resumed or paused it); a new one starts
    as the file declares. Raises ValueError naming each deployment that did not end up as asked.
    """
    from prefect.client.orchestration import get_client

    # 1. The pool, and what the server holds now
    spec = yaml.safe_load(prefect_file.read_text())
    declared = spec.get("deployments") or []
    prefect = [sys.executable, "-m", "prefect"]
    if subprocess.run([*prefect, "work-pool", "inspect", pool], capture_output=True).returncode != 0:
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process"], check=True)
    with get_client(sync_client=True) as client:
        before = registered(client, {d["name"] for d in declared})

    # 2. The file as it is to be registered, deployed from a temporary copy (the entrypoints resolve in the repo)
    render(declared, pool, before, prefect_file)
    with tempfile.TemporaryDirectory(prefix="pixart-deploy-") as tmp:
        rendered = Path(tmp) / "prefect.yaml"
        rendered.write_text(yaml.safe_dump(spec, sort_keys=False))
        command = [*prefect, "deploy", "--all", "--no-prompt", "--prefect-file", str(rendered)]
        done = subprocess.run(command, cwd=REPO)
    if done.returncode != 0:
        raise ValueError(f"prefect deploy failed (exit {done.returncode}); see its output above")

    # 3. What the server holds now, deployment by deployment
    with get_client(sync_client=True) as client:
        after = registered(client, {d["name"] for d in declared})
    problems, names = [], []
    for d in declared:
        got = after.get((d["entrypoint"], d["name"]))
        if got is None:
            problems.append(f"{d['name']} ({d['entrypoint']}): not registered")
            continue
        names.append(got["full_name"])
        if got["pool"] != pool:
            problems.append(f"{got['full_name']}: on work pool {got['pool']!r}, not {pool!r}")
        for schedule in d.get("schedules") or []:
            expected = "active" if schedule.get("active", True) else "inactive"
            active = got["schedules"].get(schedule["slug"])
            found = "missing" if active is None else "active" if active else "inactive"
            if found != expected:
                problems.append(f"{got['full_name']}: schedule {schedule['slug']!r} is {found}, expected {expected}")
    if problems:
        raise ValueError(f"prefect deploy did not register {prefect_file} as asked:\n  " + "\n  ".join(problems))
    return names


def render(declared: list[dict], pool: str, before: dict, prefect_file: Path) -> None:
    """Turn prefect.yaml's `deployments` into what `deploy` registers: every one on `pool`; `config: {base:
    PRESET, ...}` as every field of the preset (the UI's form shows what runs); each schedule as active as it is
    on the server now (`before`, from `registered`)."""
    from tasks.config import deep_merge, expand_preset  # not at import: the pull step must not wait for torch

    for d in declared:
        d["work_pool"] = {**(d.get("work_pool") or {}), "name": pool}
        config = (d.get("parameters") or {}).get("config")
        if isinstance(config, dict) and config.get("base"):
            d["parameters"]["config"] = deep_merge(expand_preset(config["base"]), config)
        current = before.get((d["entrypoint"], d["name"]), {}).get("schedules", {})
        for schedule in d.get("schedules") or []:
            if not schedule.get("slug"):
                raise ValueError(
                    f"{prefect_file}: a schedule of deployment {d['name']!r} ({d['entrypoint']}) has no slug; "
                    "give it one, so that redeploying updates it in place and keeps it switched on or off"
                )
            # A schedule deployed before it had a slug is found by its cron expression.
            active = current.get(schedule["slug"], current.get(schedule.get("cron")))
            if active is not None:
                schedule["active"] = active


def registered(client, names: set[str]) -> dict[tuple[str, str], dict]:
    """{(entrypoint, name): {"full_name", "pool", "schedules": {slug (or cron): active}}} of the server's
    deployments named one of `names` (of any flow)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterId

    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(names))))
    flow_ids = FlowFilterId(any_=list({d.flow_id for d in found}))
    flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(id=flow_ids))}
    return {
        (d.entrypoint, d.name): {
            "full_name": f"{flows[d.flow_id]}/{d.name}",
            "pool": d.work_pool_name,
            "schedules": {(s.slug or getattr(s.schedule, "cron", None)): s.active for s in d.schedules},
        }
        for d in found
    }
