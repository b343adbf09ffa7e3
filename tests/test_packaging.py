"""A packaged install works: a wheel installed into a fresh virtualenv outside the repository finds the presets and
runs a flow from another directory."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repository_runs_ingest_on_a_preset(tmp_path, flows_env):
    # 1. The wheel, with the presets inside it
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=REPO,
        check=True,
    )
    (wheel,) = tmp_path.glob("pixart_pipeline-*.whl")
    assert {"configs/demo.yaml", "configs/pixart_256.yaml"} <= set(zipfile.ZipFile(wheel).namelist())

    # 2. A fresh virtualenv holding the wheel alone; its dependencies are this environment's installed packages
    #    (a .pth line adds their directory; the editable install of the repository is not processed from there)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = [venv / "bin/python", "-c"]
    site = subprocess.check_output([*python, "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True)
    site = Path(site.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([venv / "bin/pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    # 3. `pixart run ingest -c demo` from another directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS", "PYTHONPATH"))}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    where = subprocess.check_output(
        [*python, "import configs; print(configs.__file__)"], cwd=elsewhere, env=env, text=True
    )
    assert where.startswith(str(site)), f"configs imported from {where}, not from the installed wheel"
    overrides = ["--set", "ingest.source.count=16", "--set", "ingest.samples_per_shard=8", "--set", "ray.num_cpus=1"]
    command = [venv / "bin/pixart", "run", "ingest", "-c", "demo", "--workdir", "work", *overrides]
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (ingested,) = (elsewhere / "work").glob("ingest-*")
    assert (ingested / "manifest.json").is_file() and len(list(ingested.glob("shards/*.tar"))) == 2
